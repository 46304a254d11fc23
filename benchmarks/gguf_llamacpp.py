"""Perplexity of an exported GGUF file in llama.cpp against its source model in transformers, on the
same WikiText-2 windows: the end-to-end proof that `llm-bip export` wrote what llama.cpp runs.

    llm-bip export --model out/m --gguf out/m.gguf --type f16
    python benchmarks/gguf_llamacpp.py --model out/m --gguf out/m.gguf --seq-len 512 --max-windows 40 \
        --output benchmarks/results/gguf_llamacpp.json

Both sides score identical token ids: the text is tokenized once with the model directory's tokenizer
and cut into the same non-overlapping windows; each window is evaluated from an empty context, and
perplexity is exp(mean next-token NLL) over every predicted token. transformers runs the saved model
(stock or per-block widths) in float32; llama.cpp runs the GGUF file through llama-cpp-python (skipped,
with a note, when that package is not installed). For an f32/f16 export the two should agree to a few
tenths of a percent; q8_0 adds its quantization error.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def windows(model_dir: Path, text_source: str, seq_len: int, max_windows: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from llm_bip.data import load_text, tokenize

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenize(tokenizer, load_text(text_source, split="test"))
    count = min(ids.numel() // seq_len, max_windows)
    return [ids[i * seq_len:(i + 1) * seq_len].tolist() for i in range(count)]


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
    return {"perplexity": math.exp(total / count), "tokens": count, "seconds": time.perf_counter() - started}


def llamacpp_ppl(gguf_path: Path, chunks: list[list[int]], seq_len: int, gpu_layers: int, threads: int | None) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
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
    return {"perplexity": math.exp(total / count), "tokens": count, "seconds": time.perf_counter() - started,
            "llama_cpp_python": __import__("llama_cpp").__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="the saved model directory that was exported")
    parser.add_argument("--gguf", required=True, type=Path, help="its GGUF export")
    parser.add_argument("--text", default=str(WIKITEXT) if WIKITEXT.is_file() else "wikitext2",
                        help="evaluation text: a file or a corpus name (default: WikiText-2 test)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--device", default="cpu", help="transformers' device")
    parser.add_argument("--gpu-layers", type=int, default=0, help="llama.cpp layers to offload (-1: all)")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: its own choice)")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    chunks = windows(args.model, args.text, args.seq_len, args.max_windows)
    if not chunks:
        raise SystemExit(f"{args.text} has fewer than {args.seq_len} tokens")
    results = {"model": str(args.model), "gguf": str(args.gguf), "text": args.text, "seq_len": args.seq_len,
               "windows": len(chunks), "transformers": transformers_ppl(args.model, chunks, args.device),
               "llama.cpp": llamacpp_ppl(args.gguf, chunks, args.seq_len, args.gpu_layers, args.threads)}
    hf, cpp = results["transformers"], results["llama.cpp"]
    print(f"{len(chunks)} windows of {args.seq_len} tokens from {args.text}")
    print(f"transformers ({args.model}): ppl {hf['perplexity']:.4f}  ({hf['seconds']:.1f}s)")
    if "skipped" in cpp:
        print(f"llama.cpp: skipped: {cpp['skipped']}")
    else:
        results["relative_difference"] = cpp["perplexity"] / hf["perplexity"] - 1
        print(f"llama.cpp    ({args.gguf}): ppl {cpp['perplexity']:.4f}  ({cpp['seconds']:.1f}s)  "
              f"difference {results['relative_difference']:+.3%}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
