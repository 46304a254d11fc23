"""Where the work runs: `--device auto|cpu|cuda|cuda:N|mps`, checked before any long work.

CPU is the default (and what the tests use). `auto` takes the first GPU (CUDA, then Apple's MPS) and
falls back to the CPU. An out-of-memory error on a device becomes a message that says what to lower.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Iterator

import torch

from llm_bip.errors import LlmBipError

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N | mps"


def resolve_device(spec: str | torch.device | None = "cpu") -> torch.device:
    """The torch device `spec` names, or a clear error when this machine has no such device."""
    text = str(spec or "cpu").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise LlmBipError(f"--device {text}: {build}; use --device cpu (or install a CUDA build of torch)")
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise LlmBipError(f"--device {text}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if text == "mps":
        if not _mps_available():
            raise LlmBipError("--device mps: Apple's MPS backend is not available here; use --device cpu")
        return torch.device("mps")
    raise LlmBipError(f"unknown device '{spec}': use one of {DEVICE_CHOICES}")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (MemAvailable for the CPU), or None if unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            return None
    return None


def return_large_frees_at_once() -> None:
    """Let glibc hand every allocation of 1 MiB or more back to the system when it is freed (instead of
    keeping it in a heap that a streamed run's changing tensor sizes fragment): a streamed TinyLlama's
    peak fell from 1.49 to 1.30 GB with it. Process-wide, and only set for streamed runs."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed, so no longer adaptive)
    except (OSError, AttributeError):
        pass


def release_freed_memory(device: torch.device) -> None:
    """Hand memory freed since the last call back to the system. glibc keeps freed heap for reuse, and
    blocks of changing sizes (dense in, pruned out) fragment it: without this a streamed run's resident
    memory grows by about a block per block instead of staying at one block."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def out_of_memory_is_an_error(device: torch.device, what: str) -> Iterator[None]:
    """Turn an accelerator's out-of-memory error into advice."""
    try:
        yield
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise LlmBipError(f"out of memory on {device} while {what}: lower --batch-size or --num-samples, or prune with "
                          "--streaming (one block on the device at a time)") from None
