"""Which dtype the work runs in: bfloat16 where the device multiplies it fast, float32 elsewhere.

bf16 halves the memory of weights and activations and, on hardware with bf16 matrix units (CUDA GPUs that
support it, x86 CPUs with AMX or AVX512-BF16), runs faster than float32. Without such units torch emulates
it: SmolLM2's FFN product took 62 ms in bf16 against 13 ms in float32 on a Xeon without them
(benchmarks/bench_bf16_matmul.py). So `auto`, the default compute dtype (`--dtype`), reads the device and the
weights: half-precision weights compute in their own dtype; float32 weights compute in bf16 (autocast)
where the device has bf16 units and in float32 where it has none. A GGUF file's quantized weights have no
float dtype of their own; `loading` dequantizes them by the same test.

Statistics, Gram matrices and refits accumulate in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from llm_bip.errors import LlmBipError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMPUTE_DTYPES = ("auto", *DTYPES)
# /proc/cpuinfo flags of x86 units that multiply bf16 matrices (oneDNN uses them; AMX tiles alone do not say bf16).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """This CPU's bf16 matrix-unit flags (empty: bf16 is emulated, or the flags cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in line.split())


def fast_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices at least as fast as float32 ones. Unknown kinds (MPS, or a
    CPU whose flags cannot be read) count as not: float32 is right everywhere, bf16 only where it is known to pay."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


def why_not_bfloat16(device: torch.device) -> str:
    """A phrase for the log: why `auto` computes in float32 on `device`."""
    if device.type == "cpu":
        return f"this CPU has no bf16 matrix units ({' or '.join(CPU_BF16_FLAGS)} in /proc/cpuinfo)"
    return f"{device} is not known to multiply bf16 fast"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compute_dtype(requested: str, weights: torch.dtype, device: torch.device, casts_weights: bool = False) -> str:
    """The compute dtype (a name in DTYPES) a run asked for as `requested` does its forward passes in.

    `auto`: half-precision weights compute in their own dtype; float32 weights in bf16 where `device` has bf16
    units, else in float32. An explicit float32 with half-precision weights is refused unless the caller casts
    the weights to it (`casts_weights`, as LoRA recovery does with its frozen base): autocast cannot compute
    bf16 weights in float32, and the record would say float32 for bf16 work."""
    if requested not in COMPUTE_DTYPES:
        raise LlmBipError(f"unknown dtype '{requested}': use one of {', '.join(COMPUTE_DTYPES)}")
    if requested == "auto":
        if weights != torch.float32:
            return dtype_name(weights)
        return "bfloat16" if fast_bfloat16(device) else "float32"
    if requested == "float32" and weights != torch.float32 and not casts_weights:
        raise LlmBipError(f"--dtype float32 cannot apply to {dtype_name(weights)} weights (they compute in their own "
                          "dtype): load them in float32 with --weights-dtype float32, or leave --dtype auto")
    return requested


# The command lines' words for both choices (llm-bip and llm-bip compare).
WEIGHTS_DTYPE_HELP = ("dtype of the weights in memory (default auto: the checkpoint's; a GGUF file dequantizes to "
                      "bfloat16 where the device has bf16 units or the model is streamed, else to float32 if that "
                      "fits)")
COMPUTE_DTYPE_HELP = ("compute dtype (default auto: the weights' own if half precision; for float32 weights bfloat16 "
                      "by autocast where the device has bf16 units, else float32); statistics are always float32")
