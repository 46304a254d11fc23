"""Real model sizes on a small machine: streamed pruning's peak memory and speed (the streaming issue).

    python benchmarks/bench_streaming.py tinyllama --out benchmarks/results/streaming_tinyllama.json
    python benchmarks/bench_streaming.py llama7b --out benchmarks/results/streaming_llama7b.json
    python benchmarks/bench_streaming.py qwen --out benchmarks/results/streaming_qwen.json
    python benchmarks/bench_streaming.py precision --out benchmarks/results/precision_smollm2.json

- tinyllama: a random-weight LLaMA of TinyLlama's shape (hidden 2048, 22 layers, 32/4 heads, FFN 5632,
  vocabulary 49152, untied) written to disk in bf16, pruned at 20% by streaming with the default recipe
  and calibration; then the same shape at twice the depth. Peak RSS against size on disk.
- llama7b: Llama-2-7B's shape (hidden 4096, 32 layers, 32 heads, FFN 11008, untied; vocabulary 49152
  for this machine's tokenizer), streamed at 20% with 32 x 128 calibration tokens; seconds per block,
  calibration tokens per second, and the whole prune against one plain forward pass over the same tokens
  (in memory: the model fits this machine's 24 GiB; and streamed, block by block from disk).
- qwen: Qwen2.5-Coder-0.5B from its GGUF (../shared/tools/get-qwen2.5-coder-0.5b.sh), pruned at 20% in
  memory and by streaming: the same pruned weights? Peak RSS of each.
- precision: SmolLM2 pruned at 20% and 50% with bf16 weights (the default) and with float32 weights;
  WikiText-2 perplexity of each.

Random weights do not change cost, so the synthetic checkpoints measure memory and time honestly (their
perplexity means nothing). Every measurement runs in a fresh process; peak RSS is that process's VmHWM.
Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
QWEN_TOOL = ROOT.parent / "shared" / "tools" / "get-qwen2.5-coder-0.5b.sh"
# The calibration these benches were measured with (the default until 2026-11-30), pinned so they reproduce.
PINNED_CALIBRATION = ("--num-samples", "64", "--seq-len", "256")


# ------------------------------------------------------------------------------------ child runs


def child_cli(argv: list[str]) -> None:
    """Run `llm-bip` in this (fresh) process and print its wall time and peak RSS as the last line."""
    from llm_bip.cli import main

    start = time.perf_counter()
    code = main(argv)
    print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_rss_mib": _vmhwm_mib()}))


def child_forward(model: str, num_samples: int, seq_len: int, batch_size: int, streamed: bool) -> None:
    """One plain forward pass of the blocks over random calibration-sized batches (timed without loading)."""
    import torch

    from llm_bip import api
    from llm_bip.activations import capture_block_inputs, run_block

    lm = api.load(model, streaming=streamed)
    samples = torch.randint(0, lm.model.config.vocab_size, (num_samples, seq_len), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        inputs = capture_block_inputs(lm.model, lm.adapter, samples, batch_size)
        if streamed:
            from llm_bip.streaming import StreamedBlocks

            blocks = StreamedBlocks(lm)
            for layer in range(lm.adapter.num_blocks):
                block = blocks.load(layer)
                inputs = run_block(block, inputs, layer=layer)
                blocks.done(layer, block)
        else:
            for layer, block in enumerate(lm.adapter.blocks(lm.model)):
                inputs = run_block(block, inputs, layer=layer)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": _vmhwm_mib()}))


def _vmhwm_mib() -> float:
    # VmHWM of this process (ru_maxrss would still count the forking parent's memory after exec).
    with open("/proc/self/status") as handle:
        return int(handle.read().split("VmHWM:")[1].split()[0]) / 1024


def run_child(*args: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- synthetic checkpoints


def write_random_checkpoint(path: Path, config, shard_bytes: int = 2 * 2**30) -> dict:
    """A random-weight checkpoint of `config`'s shape in bf16 (N(0, 0.02), norms 1), with SmolLM2's
    tokenizer, written shard by shard: never more than one shard in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from llm_bip.loading import default_model_gguf, skeleton

    if (path / "model.safetensors.index.json").is_file():
        return json.loads((path / "bench_info.json").read_text())
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    model = skeleton(config, torch.bfloat16)
    names = [(n, p.shape) for n, p in model.named_parameters()]
    generator = torch.Generator().manual_seed(0)
    shards, current, size, weight_map, total = [], {}, 0, {}, 0
    for name, shape in names:
        tensor = (torch.ones(shape) if "norm" in name else torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        current[name] = tensor
        size += tensor.numel() * 2
        total += tensor.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            _write_shard(path, len(shards), current, weight_map, save_file)
            current, size = {}, 0
    if current:
        shards.append(current)
        _write_shard(path, len(shards), current, weight_map, save_file)
    count = len(shards)
    for index in range(1, count + 1):
        (path / f"shard-{index}.safetensors").rename(path / f"model-{index:05d}-of-{count:05d}.safetensors")
    weight_map = {k: f"model-{int(v.split('-')[1].split('.')[0]):05d}-of-{count:05d}.safetensors" for k, v in weight_map.items()}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.dtype = torch.bfloat16
    config.save_pretrained(path)
    gguf = default_model_gguf()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(path)
    info = {"parameters": sum(math.prod(s) for _, s in names), "bytes_on_disk": sum(f.stat().st_size for f in path.glob("*.safetensors"))}
    (path / "bench_info.json").write_text(json.dumps(info))
    return info


def _write_shard(path: Path, index: int, tensors: dict, weight_map: dict, save_file) -> None:
    save_file(tensors, str(path / f"shard-{index}.safetensors"), metadata={"format": "pt"})
    weight_map.update({name: f"shard-{index}.safetensors" for name in tensors})
    tensors.clear()


def llama_config(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int = 49152):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       intermediate_size=ffn, vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=4096)


def block_bytes(hidden: int, heads: int, kv_heads: int, ffn: int) -> int:
    head_dim = hidden // heads
    return 2 * (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * ffn)


def prune_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["cli", "prune", "--model", str(model), "--output", str(out), "--overwrite", "--eval", "none", "--quiet",
            "--streaming", *extra]


# --------------------------------------------------------------------------------------- benches


def bench_tinyllama(work: Path) -> dict:
    shape = {"hidden": 2048, "heads": 32, "kv_heads": 4, "ffn": 5632}
    result: dict = {"shape": shape, "calibration": "64 x 256 tokens of Wikipedia", "ratio": 0.2, "runs": {}}
    for layers in (22, 44):
        model = work / f"tinyllama-{layers}"
        info = write_random_checkpoint(model, llama_config(shape["hidden"], layers, shape["heads"], shape["kv_heads"], shape["ffn"]))
        out = work / f"tinyllama-{layers}-pruned"
        run = run_child(*prune_args(model, out, "--ratio", "0.2", *PINNED_CALIBRATION))
        record = json.loads((out / "pruning_record.json").read_text())
        run.update(info, layers=layers, peak_over_size=run["peak_rss_mib"] * 2**20 / info["bytes_on_disk"],
                   prune_seconds=record["timings_seconds"]["prune"],
                   seconds_per_block=record["timings_seconds"]["prune"] / layers,
                   removed_non_embedding=record["removed_fraction"]["non_embedding"],
                   compensation=sorted({v for b in record["compensation"]["blocks"] for v in b.values()}))
        result["runs"][str(layers)] = run
        shutil.rmtree(out, ignore_errors=True)
    block = block_bytes(**shape)
    result["block_mib"] = block / 2**20
    result["depth_growth_mib"] = result["runs"]["44"]["peak_rss_mib"] - result["runs"]["22"]["peak_rss_mib"]
    result["targets"] = {
        "peak under 50% of size on disk": result["runs"]["22"]["peak_over_size"] < 0.5,
        "twice the depth adds less than a block + 10%": result["depth_growth_mib"] < 1.1 * block / 2**20,
    }
    return result


def bench_llama7b(work: Path) -> dict:
    shape = {"hidden": 4096, "heads": 32, "kv_heads": 32, "ffn": 11008}
    samples, seq_len, batch = 32, 128, 8
    model = work / "llama7b"
    info = write_random_checkpoint(model, llama_config(shape["hidden"], 32, shape["heads"], shape["kv_heads"], shape["ffn"]))
    result: dict = {"shape": shape, "layers": 32, **info, "calibration": f"{samples} x {seq_len} tokens", "ratio": 0.2}
    out = work / "llama7b-pruned"
    run = run_child(*prune_args(model, out, "--ratio", "0.2", "--num-samples", str(samples), "--seq-len", str(seq_len),
                                "--batch-size", str(batch)))
    record = json.loads((out / "pruning_record.json").read_text())
    loop = record["timings_seconds"]["prune"]
    result["prune"] = {**run, "loop_seconds": loop, "seconds_per_block": loop / 32,
                       "calibration_tokens_per_second": samples * seq_len / loop,
                       "compensation": sorted({v for b in record["compensation"]["blocks"] for v in b.values()}),
                       "removed_non_embedding": record["removed_fraction"]["non_embedding"]}
    shutil.rmtree(out, ignore_errors=True)
    result["forward_streamed"] = run_child("forward", str(model), str(samples), str(seq_len), str(batch), "1")
    result["forward_in_memory"] = run_child("forward", str(model), str(samples), str(seq_len), str(batch), "0")
    result["prune_over_forward"] = {
        "in_memory_forward": loop / result["forward_in_memory"]["seconds"],
        "streamed_forward": loop / result["forward_streamed"]["seconds"],
    }
    result["targets"] = {"peak RSS under 4 GiB": run["peak_rss_mib"] < 4096}
    return result


def bench_qwen(work: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    gguf_dir = work / "qwen-gguf"
    if not any(gguf_dir.glob("*.gguf")):
        subprocess.run(["bash", str(QWEN_TOOL), str(gguf_dir)], check=True)
    gguf = next(gguf_dir.glob("*.gguf"))
    result: dict = {"model": gguf.name, "ratio": 0.2, "calibration": "64 x 256 tokens of Wikipedia", "runs": {}}
    outputs = {}
    for mode in ("in_memory", "streamed"):
        out = work / f"qwen-{mode}"
        argv = prune_args(gguf, out, "--ratio", "0.2", *PINNED_CALIBRATION)
        if mode == "in_memory":
            argv.remove("--streaming")
        result["runs"][mode] = run_child(*argv)
        outputs[mode] = out
    tensors = [dict(kv for f in sorted(o.glob("*.safetensors")) for kv in load_file(str(f)).items()) for o in outputs.values()]
    same = set(tensors[0]) == set(tensors[1]) and all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    result["same_pruned_weights"] = same
    result["tensors"] = len(tensors[0])
    for out in outputs.values():
        shutil.rmtree(out, ignore_errors=True)
    return result


def bench_precision(work: Path) -> dict:
    result: dict = {"model": "smollm2-135m", "eval": f"{WIKITEXT.name}, at most 150 windows at each length: 150 @128, all 140 @2048", "runs": {}}
    for dtype in ("bfloat16", "float32"):
        for ratio in ("0.2", "0.5"):
            out = work / f"precision-{dtype}-{ratio}"
            argv = ["cli", "prune", "--ratio", ratio, "--weights-dtype", dtype, "--output", str(out), "--overwrite",
                    "--eval", str(WIKITEXT), "--eval-seq-len", "128", "2048", "--eval-max-windows", "150", "--quiet"]
            run = run_child(*argv)
            record = json.loads((out / "pruning_record.json").read_text())
            ppl = record["perplexity"]
            run["dense"] = {k: v["perplexity"] for k, v in ppl["dense"].items()}
            run["pruned"] = {k: v["perplexity"] for k, v in ppl["pruned"].items()}
            run["saved_dtype"] = record["saved_dtype"]
            result["runs"][f"{dtype}@{ratio}"] = run
            shutil.rmtree(out, ignore_errors=True)
    result["pruned_bf16_over_fp32"] = {
        ratio: {k: result["runs"][f"bfloat16@{ratio}"]["pruned"][k] / result["runs"][f"float32@{ratio}"]["pruned"][k]
                for k in result["runs"][f"float32@{ratio}"]["pruned"]}
        for ratio in ("0.2", "0.5")
    }
    return result


BENCHES = {"tinyllama": bench_tinyllama, "llama7b": bench_llama7b, "qwen": bench_qwen, "precision": bench_precision}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "cli":
        return child_cli(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "forward":
        model, samples, seq_len, batch, streamed = sys.argv[2:7]
        return child_forward(model, int(samples), int(seq_len), int(batch), streamed == "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=list(BENCHES))
    parser.add_argument("--work", default="/tmp/llm-bip-bench", help="where the checkpoints and outputs go (GBs)")
    parser.add_argument("--out", required=True, help="JSON results")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = BENCHES[args.bench](work)
    result["command"] = "python benchmarks/bench_streaming.py " + " ".join(sys.argv[1:])
    result["wall_seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if not args.keep and args.bench in ("tinyllama", "llama7b"):
        for path in work.glob(f"{args.bench}*"):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
