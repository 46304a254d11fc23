"""Training data for LoRA recovery: Alpaca-style instructions or plain text, tokenized and split.

Sources: a local .json (a list of objects, or JSON lines), .jsonl, .txt or .raw file, or any dataset name on the
Hugging Face hub (its `train` split, through `datasets.load_dataset`). Records are either Alpaca-style
(instruction, optional input, output), formatted with the Alpaca prompt template that LLM-Pruner uses, or
have one `text` field; text is packed into blocks of `cutoff_len` tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from llm_bip.data import text_length
from llm_bip.errors import LlmBipError

DEFAULT_DATASET = "yahma/alpaca-cleaned"
TEXT_SUFFIXES = (".txt", ".raw")
JSON_SUFFIXES = (".json", ".jsonl")

# Alpaca's template, as used by alpaca-lora and LLM-Pruner's post-training.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

EXPECTED_FIELDS = "Alpaca-style fields instruction, input (optional), output; or a single field text"
IGNORE_INDEX = -100
# Characters per tokenizer call when reading a large text file: big enough to be fast, small enough to
# keep the tokenizer's memory modest.
_TEXT_PIECE_CHARS = 200_000

Kind = Literal["instruction", "text"]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        """Tokens that contribute to the loss (the first token is never predicted)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass
class RecoveryData:
    kind: Kind
    source: str
    train: list[Example]
    val: list[Example]
    fingerprint: str
    dropped: int = 0


def alpaca_prompt(instruction: str, input_text: str = "", output: str = "") -> str:
    template = PROMPT_WITH_INPUT if input_text else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input_text) + output


def load_recovery_data(
    data: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    cutoff_len: int,
    val_set_size: int,
    train_on_inputs: bool = False,
    seed: int = 42,
    bos_id: int | None = None,
) -> RecoveryData:
    """Read, tokenize and split `data` into train and held-out examples.

    The held-out part is `val_set_size` examples, at most a tenth of the data (none below ten examples).
    With `bos_id` (families whose every window starts with BOS, Gemma), each block of packed text starts
    with it, as the model is calibrated, evaluated and run; prompts get it from the tokenizer itself.
    """
    kind, payload, source = _read(data)
    if kind == "text":
        examples = _pack_text(payload, tokenizer, cutoff_len, bos_id)
        dropped = 0
    else:
        examples, dropped = _tokenize_instructions(payload, tokenizer, cutoff_len, train_on_inputs)
    if not examples:
        raise LlmBipError(f"{source}: no usable training examples (empty data, or every prompt is cut off)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(val_set_size, len(examples) // 10)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return RecoveryData(kind, source, train, val, _fingerprint(train, val), dropped)


def _read(data: str | Path) -> tuple[Kind, Any, str]:
    """(kind, records-or-texts, source description) for a local file or a hub dataset name."""
    name = str(data)
    path = Path(name).expanduser()
    if path.exists():
        return _read_file(path)
    if _looks_like_path(name):
        raise LlmBipError(f"recovery data file not found: {name}")
    return _read_hub(name)


def _looks_like_path(name: str) -> bool:
    # Hub names contain "/", so only a known suffix or an explicit relative/absolute prefix marks a file.
    return name.lower().endswith(TEXT_SUFFIXES + JSON_SUFFIXES) or name.startswith(("/", "./", "../", "~"))


def _read_file(path: Path) -> tuple[Kind, Any, str]:
    source = str(path)
    if path.is_dir():
        raise LlmBipError(f"{path} is a directory: pass a .json, .jsonl, .txt or .raw file")
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSON_SUFFIXES:
        raise LlmBipError(f"{path}: unsupported recovery data file type; use .json, .jsonl, .txt or .raw")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlmBipError(f"{path} is not UTF-8 text") from None
    if suffix in TEXT_SUFFIXES:
        if not raw.strip():
            raise LlmBipError(f"{path}: the file is empty")
        return "text", [raw], source
    records = _parse_json(path, raw)
    kind, payload = _records(records, source)
    return kind, payload, source


def _parse_json(path: Path, raw: str) -> list[Any]:
    if not raw.strip():
        raise LlmBipError(f"{path}: the file is empty")
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = None  # often JSON lines saved as .json; parsed below
        if isinstance(value, list):
            return value
        if value is not None:
            raise LlmBipError(f"{path}: expected a JSON list of objects with {EXPECTED_FIELDS}")
    records = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise LlmBipError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
    return records


def _read_hub(name: str) -> tuple[Kind, Any, str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        # Offline, `datasets` raises several different types (ConnectionError, LocalEntryNotFoundError, ...).
        raise LlmBipError(
            f"could not load dataset '{name}' from the Hugging Face hub ({type(e).__name__}); "
            "if you are offline, pass a local .json/.jsonl/.txt file instead"
        ) from e
    kind, payload = _records(ds.to_list(), f"hub dataset {name}")
    return kind, payload, f"hub:{name}"


def _records(records: Sequence[Any], source: str) -> tuple[Kind, list[Any]]:
    if not records:
        raise LlmBipError(f"{source}: no records; expected {EXPECTED_FIELDS}")
    first = records[0]
    if not isinstance(first, dict):
        raise LlmBipError(f"{source}: records must be JSON objects with {EXPECTED_FIELDS}")
    kind: Kind = "instruction" if "instruction" in first and "output" in first else "text"
    required = ("instruction", "output") if kind == "instruction" else ("text",)
    out: list[Any] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or any(k not in rec for k in required):
            fields = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise LlmBipError(f"{source}: record {i} has fields {fields}; expected {EXPECTED_FIELDS}")
        values = [rec[k] for k in required] + ([rec.get("input") or ""] if kind == "instruction" else [])
        if not all(isinstance(v, str) for v in values):
            raise LlmBipError(f"{source}: record {i} has a non-string value in {', '.join(required)}")
        if kind == "instruction":
            out.append((rec["instruction"], rec.get("input") or "", rec["output"]))
        elif rec["text"].strip():
            out.append(rec["text"])
    if not out:
        raise LlmBipError(f"{source}: every text field is empty")
    return kind, out


def _tokenize_instructions(
    records: list[tuple[str, str, str]],
    tokenizer: PreTrainedTokenizerBase,
    cutoff_len: int,
    train_on_inputs: bool,
) -> tuple[list[Example], int]:
    """LLM-Pruner's tokenization: the full prompt plus EOS when it fits; the prompt part masked unless
    `train_on_inputs`. Examples whose response is cut off entirely are dropped (they carry no loss)."""
    eos = tokenizer.eos_token_id
    full = tokenizer([alpaca_prompt(*r) for r in records], truncation=True, max_length=cutoff_len).input_ids
    prompts = None
    if not train_on_inputs:
        user = [alpaca_prompt(instruction, input_text) for instruction, input_text, _ in records]
        prompts = tokenizer(user, truncation=True, max_length=cutoff_len).input_ids
    examples, dropped = [], 0
    for k, ids in enumerate(full):
        ids = list(ids)
        if eos is not None and ids and ids[-1] != eos and len(ids) < cutoff_len:
            ids.append(eos)
        labels = list(ids)
        if prompts is not None:
            n = len(prompts[k])
            labels[:n] = [IGNORE_INDEX] * min(n, len(labels))
        ex = Example(ids, labels)
        if ex.n_targets == 0:
            dropped += 1
            continue
        examples.append(ex)
    return examples, dropped


def _pack_text(texts: list[str], tokenizer: PreTrainedTokenizerBase, cutoff_len: int,
               bos_id: int | None = None) -> list[Example]:
    """Concatenate the documents (EOS between them) and cut the token stream into blocks of `cutoff_len`
    (the BOS token and `cutoff_len - 1` tokens of text, with `bos_id`)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            stream.append(eos)
        for piece_ids in _tokenize_pieces(text, tokenizer):
            stream.extend(piece_ids)
    length = text_length(cutoff_len, bos_id)
    blocks = [stream[s : s + length] for s in range(0, len(stream), length)]
    if bos_id is not None:
        blocks = [[bos_id, *b] for b in blocks]
    return [Example(b, list(b)) for b in blocks if len(b) >= 2]


def _tokenize_pieces(text: str, tokenizer: PreTrainedTokenizerBase) -> Iterable[list[int]]:
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + _TEXT_PIECE_CHARS)
        if end < len(text):
            # Cut at a line break so no word is split across two tokenizer calls.
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        pieces.append(text[start:end])
        start = end
    for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]:
        yield list(ids)


def _fingerprint(train: list[Example], val: list[Example]) -> str:
    h = hashlib.sha256()
    for part in (train, val):
        h.update(len(part).to_bytes(8, "little"))
        for ex in part:
            h.update(array("q", ex.input_ids).tobytes())
            h.update(array("q", ex.labels).tobytes())
    return h.hexdigest()
