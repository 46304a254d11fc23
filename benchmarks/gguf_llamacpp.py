"""Perplexity of exported GGUF files in llama.cpp against their source model in transformers, on the
same WikiText-2 windows: the end-to-end proof that `llm-bip export` wrote what llama.cpp runs.

    llm-bip export --model out/m --gguf out/m.f16.gguf --type f16
    llm-bip export --model out/m --gguf out/m.q8_0.gguf --type q8_0
    python benchmarks/gguf_llamacpp.py --model out/m --gguf out/m.f16.gguf out/m.q8_0.gguf \
        --seq-len 512 --max-windows 20 --threads 1 --output benchmarks/results/gguf_llamacpp.json

Both sides score identical token ids: the text is tokenized once with the model directory's tokenizer
and cut into the same non-overlapping windows (each starting with BOS for Gemma, as llm-bip measures it); each window is evaluated from an empty context (KV cache
cleared), and perplexity is exp(mean next-token NLL) over every predicted token, log-softmax in float64
on both sides. transformers runs the saved model (stock or per-block widths) in float32; llama.cpp runs
each GGUF file on the CPU with its default f16 KV cache (--kv-type f32 for a float32 one).

llama.cpp is reached through its C API, with one of:
- `cffi` (default): the libllama that the `llama-cpp-cffi` wheel bundles (`llama/_llama_cpp_cpu*.so`),
  called directly through that module's `lib`/`ffi` -- the wheel's own Python wrapper (and its
  transformers<5 pin) is never imported, so `pip install --no-deps llama-cpp-cffi cffi` is enough, or
  point --llamacpp-lib at an unpacked wheel. The 0.4.x wheels are built with GCC 14 and reference
  `__cxa_call_terminate`, which older libstdc++ (GCC < 14, e.g. Debian 12) lacks; the script then
  compiles a one-function stand-in (it only aborts, as std::terminate would) with `cc` and preloads it.
- `llama-cpp-python` (`--backend llama-cpp-python`), if installed.
Alongside the perplexities it records the llama.cpp build (build number and commit compiled into the
library), what llama.cpp reports of the file (architecture, description, parameters), the export type,
and whether llama.cpp's tokenizer reproduces transformers' ids on a sample of the text. For an f32/f16
export the two perplexities should agree to a few tenths of a percent; q8_0 adds its quantization error.
--output gathers runs in one JSON file (a run of the same GGUF file replaces its earlier entry).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
TOKENIZER_SAMPLE_CHARS = 20_000


def windows(model_dir: Path, text_source: str, seq_len: int, max_windows: int) -> tuple[list[list[int]], str]:
    """The windows llm-bip measures perplexity on: bare, or BOS-first for the families that need it (Gemma)."""
    from transformers import AutoConfig, AutoTokenizer

    import llm_bip  # noqa: F401  (registers the per-block-widths classes)
    from llm_bip.adapters import adapter_for
    from llm_bip.data import load_text, text_windows, tokenize

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    bos = adapter_for(AutoConfig.from_pretrained(str(model_dir))).window_bos(tokenizer)
    text = load_text(text_source, split="test")
    ids = tokenize(tokenizer, text)
    return text_windows(ids, seq_len, max_windows, bos).tolist(), text


def nll_sum(logits: np.ndarray, tokens: list[int]) -> float:
    """Summed NLL of tokens[1:] given the logits at positions [:-1] (float64 log-softmax)."""
    scores = logits[: len(tokens) - 1].astype(np.float64)
    scores -= scores.max(axis=1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(tokens) - 1), tokens[1:]].sum())


def transformers_ppl(model_dir: Path, chunks: list[list[int]], device: str) -> dict:
    from transformers import AutoModelForCausalLM

    import llm_bip  # noqa: F401  (registers the per-block-widths classes)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    total, count, started = 0.0, 0, time.perf_counter()
    with torch.no_grad():
        for tokens in chunks:
            logits = model(torch.tensor([tokens], device=device)).logits[0].float().cpu().numpy()
            total += nll_sum(logits, tokens)
            count += len(tokens) - 1
    return {"perplexity": math.exp(total / count), "tokens": count, "seconds": time.perf_counter() - started,
            "dtype": "float32", "device": device}


# ------------------------------------------------------------------------- llama.cpp through cffi

_SHIM_SOURCE = "#include <stdlib.h>\nvoid __cxa_call_terminate(void *exception) { (void)exception; abort(); }\n"


def _find_cffi_library(hint: str | None) -> Path:
    """The CPU extension module of llama-cpp-cffi: --llamacpp-lib (the .so, its `llama` folder or the folder
    holding that), $LLAMA_CPP_CFFI_LIB, or the installed `llama` package (located, not imported)."""
    candidates = [hint, os.environ.get("LLAMA_CPP_CFFI_LIB")]
    try:
        spec = importlib.util.find_spec("llama")
        candidates += list(spec.submodule_search_locations or []) if spec else []
    except (ImportError, ValueError):
        pass
    for candidate in filter(None, candidates):
        path = Path(candidate).expanduser()
        if path.is_file():
            return path
        for folder in (path, path / "llama"):
            found = sorted(folder.glob("_llama_cpp_cpu*.so")) if folder.is_dir() else []
            if found:
                return found[0]
    raise FileNotFoundError("no llama-cpp-cffi CPU library (_llama_cpp_cpu*.so): pip install --no-deps "
                            "llama-cpp-cffi cffi, or pass --llamacpp-lib DIR of an unpacked wheel")


def _preload_shim() -> str:
    """Build (once, cached in the temp folder) and globally load a library defining __cxa_call_terminate."""
    folder = Path(tempfile.gettempdir()) / f"llm-bip-cxa-shim-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    library = folder / "libcxa_call_terminate.so"
    if not library.is_file():
        source = folder / "shim.c"
        source.write_text(_SHIM_SOURCE)
        subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O2", "-o", str(library), str(source)],
                       check=True)
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    return str(library)


def _load_cffi(library: Path) -> tuple[object, object, dict]:
    def load():
        spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    notes = {"library": str(library)}
    try:
        module = load()
    except ImportError as error:
        if "__cxa_call_terminate" not in str(error):
            raise
        notes["libstdcxx_shim"] = _preload_shim()
        module = load()
    build = ctypes.CDLL(str(library))
    notes["build_number"] = ctypes.c_int.in_dll(build, "LLAMA_BUILD_NUMBER").value
    for key, symbol in (("commit", "LLAMA_COMMIT"), ("compiler", "LLAMA_COMPILER"), ("target", "LLAMA_BUILD_TARGET")):
        value = ctypes.c_char_p.in_dll(build, symbol).value
        notes[key] = value.decode() if value else None
    notes["build"] = f"b{notes['build_number']} ({notes['commit']})"
    try:
        from importlib.metadata import version

        notes["llama_cpp_cffi"] = version("llama-cpp-cffi")
    except Exception:  # noqa: BLE001  (an unpacked wheel is not an installed distribution)
        dist = sorted(library.parent.parent.glob("llama_cpp_cffi-*.dist-info"))
        notes["llama_cpp_cffi"] = dist[0].name.removesuffix(".dist-info").split("-")[1] if dist else None
    return module.lib, module.ffi, notes


class CffiLlama:
    """One GGUF file loaded by llama.cpp's C API, scoring whole windows from an empty KV cache."""

    def __init__(self, lib, ffi, gguf_path: Path, seq_len: int, threads: int, gpu_layers: int, kv_type: str):
        self.lib, self.ffi, self.seq_len = lib, ffi, seq_len
        self.log: list[str] = []

        def on_log(level, text, data):  # keep llama.cpp quiet, but keep what it said for a failure
            self.log.append(ffi.string(text).decode(errors="replace"))
            del self.log[:-200]

        self._callback = ffi.callback("void(enum ggml_log_level, char *, void *)", on_log)
        lib.llama_log_set(self._callback, ffi.NULL)
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        load = getattr(lib, "llama_model_load_from_file", None) or lib.llama_load_model_from_file
        self.model = load(str(gguf_path).encode(), params)
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}:\n" + "".join(self.log[-15:]))
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = seq_len
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.type_k = cparams.type_v = {"f16": 1, "f32": 0}[kv_type]  # GGML_TYPE_F16 / GGML_TYPE_F32
        new_context = getattr(lib, "llama_init_from_model", None) or lib.llama_new_context_with_model
        self.ctx = new_context(self.model, cparams)
        if self.ctx == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not create a context for {gguf_path}:\n" + "".join(self.log[-15:]))
        if hasattr(lib, "llama_model_get_vocab"):
            self.vocab = lib.llama_model_get_vocab(self.model)
            self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        else:
            self.vocab, self.n_vocab = self.model, lib.llama_n_vocab(self.model)
        self.clear = getattr(lib, "llama_kv_self_clear", None) or lib.llama_kv_cache_clear
        self.batch = lib.llama_batch_init(seq_len, 0, 1)

    def describe(self) -> dict:
        ffi, lib = self.ffi, self.lib
        buffer = ffi.new("char[]", 256)

        def meta(key: str) -> str | None:
            return ffi.string(buffer).decode() if lib.llama_model_meta_val_str(self.model, key.encode(), buffer,
                                                                                 256) >= 0 else None

        lib.llama_model_desc(self.model, buffer, 256)
        info = {"description": ffi.string(buffer).decode(), "architecture": meta("general.architecture"),
                "parameters": int(lib.llama_model_n_params(self.model)), "n_vocab": int(self.n_vocab)}
        return info

    def logits(self, tokens: list[int]) -> np.ndarray:
        lib, ffi, batch = self.lib, self.ffi, self.batch
        if len(tokens) > self.seq_len:
            raise ValueError(f"a window of {len(tokens)} tokens exceeds the context of {self.seq_len}")
        self.clear(self.ctx)  # every window from an empty context, as transformers sees it
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        status = lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}:\n" + "".join(self.log[-10:]))
        pointer = lib.llama_get_logits(self.ctx)  # one row per token that asked for logits, in batch order
        size = len(tokens) * self.n_vocab
        return np.frombuffer(ffi.buffer(pointer, size * 4), dtype=np.float32).reshape(len(tokens), self.n_vocab).copy()

    def tokenize(self, text: str) -> list[int]:
        lib, ffi = self.lib, self.ffi
        data = text.encode()
        capacity = len(data) + 16
        out = ffi.new("llama_token[]", capacity)
        count = lib.llama_tokenize(self.vocab, data, len(data), out, capacity, False, False)
        if count < 0:
            raise RuntimeError(f"llama_tokenize needs {-count} tokens")
        return list(out[0:count])

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        (getattr(self.lib, "llama_model_free", None) or self.lib.llama_free_model)(self.model)


def llamacpp_cffi_ppl(gguf_path: Path, chunks: list[list[int]], seq_len: int, threads: int, gpu_layers: int,
                      kv_type: str, library: Path, sample: tuple[str, list[int]] | None) -> dict:
    lib, ffi, build = _load_cffi(library)
    llm = CffiLlama(lib, ffi, gguf_path, seq_len, threads, gpu_layers, kv_type)
    try:
        result = {"backend": "cffi", "build": build, "model": llm.describe(), "kv_type": kv_type, "threads": threads}
        if sample is not None:
            text, expected = sample
            got = llm.tokenize(text)
            prefix = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                          min(len(got), len(expected)))
            result["tokenizer"] = {"sample_chars": len(text), "hf_tokens": len(expected),
                                   "llama_cpp_tokens": len(got), "identical": got == expected,
                                   "matching_prefix": prefix}
        total, count, started = 0.0, 0, time.perf_counter()
        for tokens in chunks:
            total += nll_sum(llm.logits(tokens), tokens)
            count += len(tokens) - 1
        result.update({"perplexity": math.exp(total / count), "tokens": count,
                       "seconds": time.perf_counter() - started})
        return result
    finally:
        llm.close()


# --------------------------------------------------------------- llama.cpp through llama-cpp-python


def llamacpp_python_ppl(gguf_path: Path, chunks: list[list[int]], seq_len: int, gpu_layers: int,
                        threads: int | None) -> dict:
    from llama_cpp import Llama

    options = {"model_path": str(gguf_path), "n_ctx": seq_len, "n_batch": seq_len, "logits_all": True,
               "n_gpu_layers": gpu_layers, "verbose": False}
    if threads:
        options["n_threads"] = threads
    llm = Llama(**options)
    vocab = llm.n_vocab()
    total, count, started = 0.0, 0, time.perf_counter()
    for tokens in chunks:
        llm.reset()  # every window from an empty context, as transformers sees it
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float32).reshape(len(tokens), vocab)
        total += nll_sum(logits, tokens)
        count += len(tokens) - 1
    return {"backend": "llama-cpp-python", "perplexity": math.exp(total / count), "tokens": count,
            "seconds": time.perf_counter() - started,
            "build": {"llama_cpp_python": __import__("llama_cpp").__version__}}


# --------------------------------------------------------------------------------------------- main


def gguf_summary(path: Path) -> dict:
    """What the file says of itself: architecture, file type, tensor types, per-layer widths."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def value(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    file_type = value("general.file_type")
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    heads = value(f"{arch}.attention.head_count")
    return {"architecture": arch, "file_type": gguf.LlamaFileType(file_type).name if file_type is not None else None,
            "tensor_types": counts, "bytes": path.stat().st_size,
            "per_layer_widths": any(isinstance(value(f"{arch}.{key}"), list) for key in
                                    ("attention.head_count", "attention.head_count_kv", "feed_forward_length")),
            "head_count": heads, "head_count_kv": value(f"{arch}.attention.head_count_kv"),
            "feed_forward_length": value(f"{arch}.feed_forward_length")}


def write_runs(output: Path, runs: list[dict]) -> None:
    """Merge runs into output's list: a run of the same GGUF file replaces the earlier one."""
    existing = []
    if output.is_file():
        data = json.loads(output.read_text())
        existing = data.get("runs", []) if isinstance(data, dict) else []
    paths = {run["gguf"] for run in runs}
    merged = [run for run in existing if run.get("gguf") not in paths] + runs
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"runs": merged}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="the saved model directory that was exported")
    parser.add_argument("--gguf", required=True, type=Path, nargs="+", help="its GGUF export(s)")
    parser.add_argument("--text", default=str(WIKITEXT) if WIKITEXT.is_file() else "wikitext2",
                        help="evaluation text: a file or a corpus name (default: WikiText-2 test)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--device", default="cpu", help="transformers' device")
    parser.add_argument("--backend", choices=("cffi", "llama-cpp-python"), default="cffi")
    parser.add_argument("--llamacpp-lib", help="llama-cpp-cffi's _llama_cpp_cpu*.so, or the folder of an unpacked "
                                               "wheel (default: $LLAMA_CPP_CFFI_LIB or the installed package)")
    parser.add_argument("--gpu-layers", type=int, default=0, help="llama.cpp layers to offload (-1: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    parser.add_argument("--kv-type", choices=("f16", "f32"), default="f16",
                        help="llama.cpp's KV cache type (default f16, llama.cpp's own default)")
    parser.add_argument("--output", type=Path, help="also record the runs in this JSON file")
    args = parser.parse_args()

    library = _find_cffi_library(args.llamacpp_lib) if args.backend == "cffi" else None
    chunks, text = windows(args.model, args.text, args.seq_len, args.max_windows)
    if not chunks:
        raise SystemExit(f"{args.text} has fewer than {args.seq_len} tokens")
    sample = None
    if args.backend == "cffi":
        from transformers import AutoTokenizer

        sample_text = text[:TOKENIZER_SAMPLE_CHARS]
        tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        sample = (sample_text, tokenizer(sample_text, add_special_tokens=False)["input_ids"])
    print(f"{len(chunks)} windows of {args.seq_len} tokens from {args.text}")
    hf = transformers_ppl(args.model, chunks, args.device)
    print(f"transformers ({args.model}): ppl {hf['perplexity']:.4f}  ({hf['seconds']:.1f}s)")
    command = " ".join(shlex.quote(part) for part in [Path(sys.executable).name, *sys.argv])
    runs = []
    for gguf_path in args.gguf:
        if args.backend == "cffi":
            cpp = llamacpp_cffi_ppl(gguf_path, chunks, args.seq_len, args.threads, args.gpu_layers, args.kv_type,
                                    library, sample)
        else:
            cpp = llamacpp_python_ppl(gguf_path, chunks, args.seq_len, args.gpu_layers, args.threads)
        summary = gguf_summary(gguf_path)
        run = {"model": str(args.model), "gguf": str(gguf_path), "export": summary, "text": args.text,
               "seq_len": args.seq_len, "windows": len(chunks), "transformers": hf, "llama.cpp": cpp,
               "ratio": cpp["perplexity"] / hf["perplexity"],
               "relative_difference": cpp["perplexity"] / hf["perplexity"] - 1, "command": command}
        runs.append(run)
        tok = cpp.get("tokenizer")
        print(f"llama.cpp {cpp['build'].get('build', '')} ({gguf_path}: {summary['architecture']}, "
              f"{summary['file_type']}): ppl {cpp['perplexity']:.4f}  ({cpp['seconds']:.1f}s)  "
              f"difference {run['relative_difference']:+.3%}"
              + (f"; tokenizer {'identical' if tok['identical'] else 'DIFFERS'} on {tok['hf_tokens']} tokens"
                 if tok else ""))
    if args.output:
        write_runs(args.output, runs)


if __name__ == "__main__":
    main()
