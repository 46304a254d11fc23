"""The Hugging Face model card (`README.md`) of every model directory llm-bip saves, made from its record.

Data in, text out: `render_card` turns a pruning record (`pruning_record.json`) into the card's text and
nothing else, so the same record always gives the same card, whichever path saved the model (in memory,
`--streaming` or `recover`). `write_model_card` adds the files around it: a plot of the per-layer widths
(`widths.png`, when matplotlib is installed) and the card itself. It runs inside the save's staging
directory before the record lists the files, so the card is in the manifest that `--overwrite` checks,
and `refreshed_card` remakes it when llm-bip adds to the record later (perplexities measured after
saving). The record keeps the card's checksum: a README.md that llm-bip did not write, or one edited
since, is never replaced (`outputs.files_not_ours`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from llm_bip.loading import DEFAULT_MODEL
from llm_bip.outputs import RECORD_FILE, sha256_of, write_atomic

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
PLOT_FILE = "widths.png"
PAPER = "https://arxiv.org/abs/2412.06419"
TAGS = ("llm-bip", "pruned", "structured-pruning")
# Written right after the front matter, for people: the record's checksum of the card is what tells an
# unedited card of llm-bip's from a README someone wrote or edited.
MARKER = (f"<!-- model card written by llm-bip from {RECORD_FILE}; llm-bip rewrites or replaces it only while it "
          "is unedited -->")
# The default model is an alias of llm-bip's; the hub knows it under its real id.
_DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What a per-block save's config carries (saving.PER_BLOCK_FORMAT starts with this); not imported, because
# saving imports this module.
_PER_BLOCK_PREFIX = "per-block"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_LOAD_DIR = "path/to/this/model"  # the card travels with the directory (and to the hub): no local path in it


def base_model(record: dict) -> str | None:
    """The source model as the user gave it (hub id, directory or .gguf file); the default's hub id."""
    source = record.get("model")
    if not source:
        return None
    return _DEFAULT_BASE if str(source) == DEFAULT_MODEL else str(source)


def is_custom_format(record: dict, config: dict | None) -> bool:
    """Per-block widths saved with `modeling_llm_bip.py`: loading needs trust_remote_code (or llm_bip imported)."""
    fmt = record.get("saved_format")
    if fmt is not None:
        return str(fmt).startswith(_PER_BLOCK_PREFIX)
    return bool(config and (config.get("auto_map") or config.get("layer_widths")))


def source_layers(record: dict, num_saved: int) -> list[int]:
    """For each saved block, its layer in the source model (they differ once whole blocks were removed)."""
    plan = record.get("plan") or []
    kept = [b["layer"] for b in plan if isinstance(b, dict) and not b.get("removed")]
    if len(kept) == num_saved:
        return kept
    removed = set(record.get("removed_blocks") or [])
    return [i for i in range(num_saved + len(removed)) if i not in removed][:num_saved]


def render_card(record: dict, config: dict | None = None, plot: bool = False, ggufs: tuple[str, ...] = (),
                tokenizer: bool = True) -> str:
    """The card's text for this record. `config` is the saved config.json (a license it names is used);
    `plot`: widths.png is in the directory; `ggufs`: GGUF files in it; `tokenizer`: a tokenizer was saved."""
    sections = [
        _front_matter(record, config),
        MARKER,
        _intro(record),
        _how_to_load(record, config, ggufs, tokenizer),
        _method(record),
        _parameters(record),
        _widths(record, plot),
        _perplexity(record),
        _recovery(record),
        _commands(record),
    ]
    return "\n\n".join(s for s in sections if s).rstrip() + "\n"


def write_model_card(out_dir: str | Path, record: dict) -> list[str]:
    """Write the plot and the card into `out_dir` (a save's staging directory, before the record lists
    its files); returns the names written. The card's checksum goes into `record["checksums"]`, which is
    how later runs tell it from a README that llm-bip did not write (or one edited since): such a file
    is never replaced."""
    out = Path(out_dir)
    card = out / CARD_FILE
    if card.exists() and not is_our_card(card, record):
        log.warning("%s was not written by llm-bip: it is left alone and no model card is written", card)
        return []
    written = []
    layout = record.get("layer_widths") or []
    if draw_widths(out / PLOT_FILE, layout, source_layers(record, len(layout))):
        written.append(PLOT_FILE)
    text = _card_for(out, record)
    record.setdefault("checksums", {})[CARD_FILE] = checksum(text)
    write_card(card, text)
    return [*written, CARD_FILE]


def refreshed_card(model_dir: str | Path, record: dict) -> str | None:
    """The card of a saved model whose record changed (the plot does not depend on what changes), with its
    checksum set in `record`; None when there is no card of llm-bip's to rewrite (none, not listed, or
    edited since). The caller writes the record, then the card."""
    directory = Path(model_dir)
    card = directory / CARD_FILE
    if CARD_FILE not in (record.get("files") or []) or not card.is_file() or not is_our_card(card, record):
        return None
    text = _card_for(directory, record)
    record.setdefault("checksums", {})[CARD_FILE] = checksum(text)
    return text


def is_our_card(path: Path, record: dict) -> bool:
    """The card llm-bip wrote, unedited: its checksum is the one the record holds."""
    expected = (record.get("checksums") or {}).get(CARD_FILE)
    try:
        return expected is not None and checksum(path.read_bytes()) == expected
    except OSError:
        return False


def write_card(path: Path, text: str) -> None:
    # UTF-8 whatever the locale: the checksum in the record is of these bytes.
    write_atomic(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def checksum(content: str | bytes) -> str:
    return sha256_of(content.encode("utf-8") if isinstance(content, str) else content)


def _card_for(directory: Path, record: dict) -> str:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    return render_card(record, config, plot=(directory / PLOT_FILE).is_file(),
                       ggufs=tuple(sorted(p.name for p in directory.glob("*.gguf"))),
                       tokenizer=any((directory / f).is_file() for f in _TOKENIZER_FILES))


def draw_widths(path: Path, layout: list[dict], layers: list[int]) -> bool:
    """Query heads, KV heads and FFN channels per saved block, as bars; False (nothing written) when
    matplotlib is not installed or there is nothing to draw."""
    if not layout:
        return False
    try:
        # The object API with the Agg canvas: no pyplot state, and the user's own backend stays as it is.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log.info("matplotlib is not installed: the model card has no plot of the widths")
        return False
    x = list(range(len(layout)))
    fig = Figure(figsize=(8.0, 3.2))
    FigureCanvasAgg(fig)
    heads, channels = fig.subplots(1, 2)
    width = 0.4
    heads.bar([i - width / 2 for i in x], [w["num_attention_heads"] for w in layout], width, label="query heads")
    heads.bar([i + width / 2 for i in x], [w["num_key_value_heads"] for w in layout], width, label="KV heads")
    heads.set_ylabel("heads")
    heads.set_ylim(0, max(w["num_attention_heads"] for w in layout) * 1.35)  # room for the legend above the bars
    heads.legend(fontsize=8, loc="upper center", ncol=2)
    channels.bar(x, [w["intermediate_size"] for w in layout], color="tab:green")
    channels.set_ylabel("FFN channels")
    label = "layer" if layers == x else "layer (source layer)"
    ticks = [str(i) if i == s else f"{i} ({s})" for i, s in zip(x, layers, strict=False)]
    step = -(-len(x) // 32)  # at most 32 labels: an 80-layer model stays readable
    for ax in (heads, channels):
        ax.set_xlabel(label)
        ax.set_xticks(x[::step], ticks[::step], fontsize=7, rotation=90 if len(x) > 16 else 0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("widths per layer after pruning")
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, dpi=100, format="png")

    write_atomic(path, save)
    return True


# ------------------------------------------------------------------------------------------- sections


def _yaml_string(text: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar: any path or id is quoted safely.
    return json.dumps(str(text))


def _front_matter(record: dict, config: dict | None) -> str:
    lines = ["---"]
    base = base_model(record)
    if base:
        lines.append(f"base_model: {_yaml_string(base)}")
    lines.append("library_name: transformers")
    license_ = record.get("license") or (config or {}).get("license")
    if license_:  # only what the source says: a wrong license is worse than none
        lines.append(f"license: {_yaml_string(license_)}")
    lines += ["tags:", *(f"- {t}" for t in TAGS), "pipeline_tag: text-generation", "---"]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _removed_fraction(record: dict, key: str = "non_embedding") -> float | None:
    before, after = record.get("parameters_before") or {}, record.get("parameters_after") or {}
    if before.get(key) and key in after:
        return 1 - after[key] / before[key]
    return None


def _options(record: dict) -> dict:
    """The options that decided the structures: the plan's own when a saved plan was applied."""
    options = dict(record.get("config") or {})
    applied = record.get("applied_plan")
    if applied:
        options = {**(applied.get("meta", {}).get("config") or {}), **options}
    return options


def _scorer(record: dict) -> str | None:
    applied = record.get("applied_plan") or {}
    return record.get("method") or applied.get("meta", {}).get("method")


def _title(record: dict) -> str:
    base = base_model(record) or "model"
    name = Path(base).name.removesuffix(".gguf") if not base.startswith(("http://", "https://")) else base
    fraction = _removed_fraction(record)
    if fraction is None or not record.get("parameters_before"):
        return f"# {name}, saved by llm-bip"
    return f"# {name}, structurally pruned ({_pct(fraction)} of non-embedding parameters removed)"


def _intro(record: dict) -> str:
    base = base_model(record)
    source = f"`{base}`" if base else "a model"
    if str(record.get("model")) == DEFAULT_MODEL:
        source += f" (llm-bip's bundled default `{DEFAULT_MODEL}`, from its GGUF file)"
    pruned = bool(record.get("parameters_before") or record.get("plan"))
    paper = f"LLM-BIP block-output importance metric ([arXiv 2412.06419]({PAPER}))"
    if pruned:
        removed = record.get("removed_blocks") or []
        cuts = []
        if _options(record).get("ratio") is not None or record.get("applied_plan"):
            cuts.append("whole attention heads (KV groups) and FFN channels were cut out")
        if removed:
            cuts.append(f"{len(removed)} whole transformer block{'s were' if len(removed) != 1 else ' was'} removed")
        what = " and ".join(cuts) or "nothing was cut"
        text = (f"{source} pruned with llm-bip: structured pruning with the {paper}. "
                f"{what[0].upper() + what[1:]}, so this is a smaller dense model that runs faster everywhere, "
                "without sparse kernels.")
        scorer = _scorer(record)
        if scorer and scorer != "llm-bip":
            text += f" The structures were chosen with the `{scorer}` scores (a baseline llm-bip ships)."
    else:
        text = (f"{source}, saved by llm-bip (structured pruning with the "
                f"{paper}); its record describes no pruning.")
    recovery = record.get("recovery")
    if recovery:
        when = "After pruning it was" if pruned else "It was"
        text += f" {when} fine-tuned to recover quality ({_recovery_how(recovery)}; see below)."
    return _title(record) + "\n\n" + text


def _how_to_load(record: dict, config: dict | None, ggufs: tuple[str, ...], tokenizer: bool) -> str:
    custom = is_custom_format(record, config)
    flag = ", trust_remote_code=True" if custom else ""
    code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{_LOAD_DIR}"{flag})']
    if tokenizer:
        code.append(f'tokenizer = AutoTokenizer.from_pretrained("{_LOAD_DIR}")')
    lines = ["## How to load", "", "```python", *code, "```", ""]
    if custom:
        lines.append("The blocks have different widths, which no stock config can describe: `config.json` lists "
                     "the widths of every block and this directory ships `modeling_llm_bip.py`, so "
                     "`trust_remote_code=True` loads it from the directory alone (or, without the flag, "
                     "`import llm_bip` first).")
    else:
        lines.append("Every block has the same widths, so the model is saved with the family's stock config and "
                     "loads with plain `AutoModelForCausalLM.from_pretrained` (no remote code; serving engines "
                     "that read the stock config, such as vLLM, load it too).")
    if not tokenizer:
        lines.append("\nNo tokenizer was saved with it: use the base model's.")
    if ggufs:
        names = ", ".join(f"`{g}`" for g in ggufs)
        lines.append(f"\nThis directory also holds a GGUF export ({names}) for llama.cpp-compatible runtimes.")
    return "\n".join(lines)


def _method(record: dict) -> str:
    if not (record.get("parameters_before") or record.get("plan")):
        return ""
    options = _options(record)
    items = []
    scorer = _scorer(record)
    if scorer:
        extra = f" (Lipschitz estimate: `{options['lipschitz']}`)" if scorer == "llm-bip" and options.get("lipschitz") else ""
        items.append(f"scores: `{scorer}`{extra}")
    applied = record.get("applied_plan")
    if applied:
        items.append(f"a saved plan was applied (fingerprint `{applied.get('fingerprint', '?')}`)")
    ratio = options.get("ratio", "?")
    if ratio is None:
        items.append("ratio: none (only whole blocks were removed)")
    else:
        achieved = _removed_fraction(record, "total" if options.get("ratio_of") == "total" else "non_embedding")
        got = f" (removed: {_pct(achieved)})" if achieved is not None else ""
        items.append(f"ratio: {ratio} of the {options.get('ratio_of', 'non-embedding')} parameters{got}")
    for key, name in (("allocation", "allocation"), ("head_ratio", "head ratio"), ("gqa_mode", "GQA mode"),
                      ("round_to", "FFN widths rounded to a multiple of"), ("selection", "selection")):
        if key in options and not (key == "round_to" and options[key] == 1):
            if key == "round_to" and options[key] == "auto":
                rounded = (record.get("rounding") or {}).get("rounded") or {}
                moves = ", ".join(f"{a} → {b}" for a, b in rounded.items()) or "none"
                items.append(f"FFN widths rounded by the device's timing (`round-to auto`): {moves}")
                continue
            value = "same as channels" if key == "head_ratio" and options[key] is None else options[key]
            items.append(f"{name}: `{value}`")
    if options.get("prunable_layers"):
        items.append(f"prunable layers: {_layer_list(options['prunable_layers'])}")
    compensation = (record.get("compensation") or {}).get("method") or options.get("compensation")
    if compensation:
        target = f", refit target `{options['refit_target']}`" if compensation == "refit" and options.get("refit_target") else ""
        items.append(f"compensation: `{compensation}`{target}")
    reconstruction = record.get("reconstruction")
    if reconstruction:
        items.append(f"block reconstruction: each cut block trained towards the dense block's outputs (Adam, lr "
                     f"{reconstruction['lr']}, {reconstruction['epochs']} pass(es)); the trained weights kept in "
                     f"{reconstruction['blocks_kept']} of {reconstruction['blocks_trained']} blocks (the others' "
                     "held-out error did not fall)")
    calibration = record.get("calibration") or {}
    if calibration.get("source"):
        items.append(f"calibration: `{calibration['source']}` × {calibration.get('num_samples', '?')} samples × "
                     f"{calibration.get('seq_len', '?')} tokens (seed {calibration.get('seed', '?')}), "
                     f"`{record.get('calibration_mode', options.get('calibration_mode', '?'))}` mode")
    else:
        items.append("calibration: none (no forward pass was needed)")
    removed = record.get("removed_blocks") or []
    if removed:
        criterion = (record.get("depth") or {}).get("criterion")
        how = f", lowest block score first (block score: {criterion})" if criterion else ""
        items.append(f"removed blocks: {len(removed)} (source layers {_layer_list(removed)}){how}")
    if record.get("saved_format"):
        dtype = f", {record['saved_dtype']}" if record.get("saved_dtype") else ""
        items.append(f"saved as: {record['saved_format']}{dtype}")
    lines = ["## Method and options", "", *(f"- {item}" for item in items)]
    if options:
        lines += ["", "<details><summary>All options (the record's <code>config</code>)</summary>", "",
                  "```json", json.dumps(options, indent=1, default=str), "```", "", "</details>"]
    return "\n".join(lines)


def _layer_list(layers) -> str:
    return ", ".join(str(i) for i in layers)


def _parameters(record: dict) -> str:
    before, after = record.get("parameters_before") or {}, record.get("parameters_after") or {}
    if not after:
        return ""
    lines = ["## Parameters", "", "| | total | non-embedding |", "|---|---:|---:|"]
    if before:
        lines.append(f"| before | {before['total']:,} | {before['non_embedding']:,} |")
    lines.append(f"| after | {after['total']:,} | {after['non_embedding']:,} |")
    if before:
        lines.append(f"| removed | {_pct(_removed_fraction(record, 'total'))} | "
                     f"{_pct(_removed_fraction(record, 'non_embedding'))} |")
    lines += ["", f"Embeddings ({after.get('embedding', 0):,} parameters) are never pruned. Counts are of the "
                  "tensors saved here."]
    return "\n".join(lines)


def _widths(record: dict, plot: bool) -> str:
    layout = record.get("layer_widths") or []
    if not layout:
        return ""
    layers = source_layers(record, len(layout))
    moved = layers != list(range(len(layout)))
    lines = ["## Per-layer widths", ""]
    lines.append(f"![query heads, KV heads and FFN channels per layer]({PLOT_FILE})" if plot else
                 "(matplotlib is not installed, so no plot of the widths was drawn.)")
    lines += ["", "| layer |" + (" source layer |" if moved else "") + " query heads | KV heads | FFN channels |",
              "|---:|" + ("---:|" if moved else "") + "---:|---:|---:|"]
    for i, (w, source) in enumerate(zip(layout, layers, strict=False)):
        lines.append(f"| {i} |" + (f" {source} |" if moved else "") +
                     f" {w['num_attention_heads']} | {w['num_key_value_heads']} | {w['intermediate_size']} |")
    return "\n".join(lines)


def _ppl_table(columns: dict[str, dict]) -> list[str]:
    """One row per text and length, one column per model state ("dense", "pruned", ...)."""
    keys = list(dict.fromkeys(k for results in columns.values() for k in results))
    names = list(columns)
    lines = ["| text | tokens per window | windows | " + " | ".join(names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for key in keys:
        entry = next(results[key] for results in columns.values() if key in results)
        text, _, length = key.rpartition("@")
        cells = [f"{columns[n][key]['perplexity']:.2f}" if key in columns[n] else "–" for n in names]
        lines.append(f"| `{entry.get('source', text)}` | {entry.get('seq_len', length)} | {entry.get('windows', '?')} | "
                     + " | ".join(cells) + " |")
    return lines


def _perplexity(record: dict) -> str:
    measured = {k: v for k, v in (record.get("perplexity") or {}).items() if v}
    if not (record.get("parameters_before") or record.get("plan")):
        return ""
    lines = ["## Perplexity", ""]
    if not measured:
        lines.append("No perplexity was measured when it was pruned (e.g. `--eval none`); "
                     "`llm-bip eval --model DIR` measures it.")
        return "\n".join(lines)
    dtypes = sorted({r.get("dtype") for results in measured.values() for r in results.values() if r.get("dtype")})
    lines += _ppl_table(measured)
    lines += ["", "Lower is better; the same windows of the same text for every column"
              + (f", computed in {', '.join(dtypes)}" if dtypes else "") + "."]
    return "\n".join(lines)


def _recovery_how(recovery: dict) -> str:
    trainer = {"lora": "LoRA, merged into the weights", "full": "full fine-tuning"}.get(
        recovery.get("trainer"), str(recovery.get("trainer", "fine-tuning")))
    kind = (recovery.get("objective") or {}).get("kind")
    return trainer + (f", {kind} objective" if kind and kind != "lm" else "")


def _recovery(record: dict) -> str:
    recovery = record.get("recovery")
    if not recovery:
        return ""
    lines = ["## Recovery fine-tuning", "",
             f"- how: {_recovery_how(recovery)}",
             f"- data: `{recovery.get('data', '?')}` ({recovery.get('n_train', '?')} training examples)",
             f"- steps: {recovery.get('steps', '?')} of {recovery.get('total_steps', '?')}"]
    measured = {k: v for k, v in (record.get("recovery_perplexity") or {}).items() if v}
    if measured:
        lines += ["", *_ppl_table({f"{k} recovery": v for k, v in measured.items()})]
    return "\n".join(lines)


def _commands(record: dict) -> str:
    commands = [c for c in (record.get("command"), record.get("recovery_command")) if c]
    if not commands:
        return (f"## How it was made\n\nWith the llm-bip Python API; `{RECORD_FILE}` in this directory holds the "
                "complete record (options, plan, parameter counts, timings).")
    return ("## How it was made\n\n```bash\n" + "\n".join(commands) + "\n```\n\n"
            f"`{RECORD_FILE}` in this directory holds the complete record (options, plan, parameter counts, timings).")
