"""Text sources for calibration and evaluation, and seeded calibration samples.

A source is a name (`wikipedia`, `lee`, `wikitext2`, `ptb`, `c4`) or a local .txt/.raw/.json/.jsonl file.
`wikipedia`, `lee` (news) and `newsgroups` (posts of the 20 Newsgroups collection) are real English text
shipped in the `gensim` wheel, so the default works offline;
the hub names use the real `datasets` loading code and fail with a clear message when offline.
"""

from __future__ import annotations

import bz2
import json
import logging
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from llm_bip.errors import LlmBipError

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = "wikipedia"
# 256 samples of 256 tokens: the refit estimates down_proj's input Gram from these tokens, and each doubling
# (64 -> 128 -> 256) measured better on nearly every text at 20/30/50% on SmolLM2 and Qwen2.5-Coder
# (docs/results.md §11, Qwen at 30% a draw); the refit needs more tokens than the FFN inputs it keeps
# (Llama-2-70B at 20%: 22,938).
DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN = 256, 256
HUB_SOURCES = ("wikitext2", "ptb", "c4")
OFFLINE_SOURCES = ("wikipedia", "lee", "newsgroups")
_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def load_text(source: str | os.PathLike, split: str = "train") -> str:
    """The whole text of a source as one string; `split` picks train or test for hub sources."""
    name = str(source)
    if name in OFFLINE_SOURCES:
        return _gensim_text(name)
    if name in HUB_SOURCES:
        return _hub_text(name, split)
    return _file_text(check_text_source(name))


def check_text_source(source: str | os.PathLike) -> Path | None:
    """A cheap check, before any model loads: a known corpus name (None) or an existing text file (its path)."""
    name = str(source)
    if name in OFFLINE_SOURCES or name in HUB_SOURCES:
        return None
    path = Path(name).expanduser()
    if not path.exists():
        raise LlmBipError(
            f"text source '{name}' is neither a file nor a known name ({', '.join(OFFLINE_SOURCES + HUB_SOURCES)})"
        )
    if path.is_dir():
        raise LlmBipError(f"{path} is a directory: pass a .txt, .raw, .json or .jsonl file")
    return path


# Offline, WikiText-2 cannot be downloaded; the Lee news corpus in gensim's wheel is real text that
# the default calibration (Wikipedia) does not contain.
OFFLINE_EVAL_FALLBACK = "lee"


def hub_reachable() -> bool:
    """A quick look before `datasets` spends half a minute on retries."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def resolve_eval_source(source: str) -> str:
    """`auto` is WikiText-2 when the hub answers and the offline Lee corpus when it does not."""
    if source != "auto":
        return source
    try:
        if not hub_reachable():
            raise LlmBipError("offline")
        load_text("wikitext2", split="test")
        return "wikitext2"
    except LlmBipError:
        log.warning("WikiText-2 is not reachable (offline?): evaluating on the '%s' corpus instead",
                    OFFLINE_EVAL_FALLBACK)
        return OFFLINE_EVAL_FALLBACK


def resolve_eval_sources(requested: list[str]) -> list[str]:
    """Evaluation texts checked (cheaply, before any model loads) and `auto` resolved."""
    for source in requested:
        if source != "auto":
            check_text_source(source)
    return [resolve_eval_source(source) for source in requested]


def _file_text(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlmBipError(f"{path} is not UTF-8 text") from None
    if path.suffix in (".jsonl", ".json"):
        return _json_text(path, raw)
    return _join_lines(raw.splitlines())


def _json_text(path: Path, raw: str) -> str:
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            records = json.loads(raw)
            records = records if isinstance(records, list) else [records]
    except json.JSONDecodeError as exc:
        raise LlmBipError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    texts = []
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LlmBipError(f"{path}: every record needs a string field 'text'")
        texts.append(record["text"])
    return "\n\n".join(t for t in texts if t.strip())


def _hub_text(name: str, split: str) -> str:
    try:
        import datasets

        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            lines = ds["text"]
        elif name == "ptb":
            ds = datasets.load_dataset("ptb-text-only/ptb_text_only", "penn_treebank", split=split)
            lines = ds["sentence"]
        else:
            files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
            split = "validation" if split == "test" else split
            ds = datasets.load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
            lines = ds["text"][:20000]
    except Exception as exc:  # noqa: BLE001  (network, cache and schema errors all mean "not available")
        raise LlmBipError(
            f"cannot load '{name}' through datasets ({type(exc).__name__}); offline, pass a local text file "
            f"instead, or use one of {', '.join(OFFLINE_SOURCES)} for calibration"
        ) from None
    return _join_lines(lines)


def _join_lines(lines: list[str]) -> str:
    """The field's WikiText-2 protocol: non-empty lines, kept as they are (WikiText's lines start with
    a space, which changes their first token), joined by a blank line. Stripping them measured 5%
    lower perplexity on SmolLM2 than the peers' numbers."""
    return "\n\n".join(line.rstrip("\n") for line in lines if line.strip())


def _gensim_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LlmBipError("the offline calibration text comes with gensim: run `pip install gensim`")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def _gensim_text(name: str) -> str:
    folder = _gensim_dir()
    if name == "lee":
        return _file_text(folder / "lee_background.cor")
    if name == "newsgroups":
        return _newsgroups_text(folder / "mini_newsgroup")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(folder / _WIKI_DUMP, "rb") as dump:
        for _title, markup, _page_id in extract_pages(dump):
            plain = filter_wiki(markup)
            paragraphs = [p.strip() for p in plain.split("\n") if len(p.strip()) > 80]
            if not markup.lstrip().lower().startswith("#redirect") and paragraphs:
                articles.append("\n\n".join(paragraphs))
    return "\n\n".join(articles)


class _BunchUnpickler:
    """Reads gensim's 20 Newsgroups fixture (a pickled scikit-learn Bunch) without scikit-learn: dicts
    and strings come through; numpy arrays (the labels, unused) become inert placeholders; any other
    class is refused."""

    ALLOWED = {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("__builtin__", "dict"),
               ("builtins", "dict"), ("__builtin__", "object"), ("builtins", "object")}

    @classmethod
    def load(cls, raw: bytes):
        import copyreg
        import pickle

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if module.startswith("sklearn.") and name == "Bunch":
                    return dict
                if (module, name) in cls.ALLOWED:
                    return {"_reconstructor": copyreg._reconstructor, "dict": dict, "object": object}[name]
                if module.split(".")[0] == "numpy":
                    return _Inert
                raise pickle.UnpicklingError(f"{module}.{name} is not plain data")

        import io

        return Restricted(io.BytesIO(raw), encoding="latin1").load()


class _Inert:
    """Stands in for a numpy object while unpickling; holds nothing."""

    def __init__(self, *_args, **_kwargs) -> None:
        pass

    def __setstate__(self, _state) -> None:
        pass


def _newsgroups_text(path: Path) -> str:
    import zlib

    bunch = _BunchUnpickler.load(zlib.decompress(path.read_bytes()))
    posts = []
    for post in bunch["data"]:
        # the body after the headers: forum English, unlike Wikipedia and news agency text
        body = post.split("\n\n", 1)[1] if "\n\n" in post else post
        paragraphs = [p.strip() for p in body.split("\n\n") if len(p.strip()) > 40]
        if paragraphs:
            posts.append("\n\n".join(paragraphs))
    return "\n\n".join(posts)


def calibration_samples(
    tokenizer: PreTrainedTokenizerBase, text: str, num_samples: int, seq_len: int, seed: int = 0,
    bos_id: int | None = None,
) -> torch.Tensor:
    """`num_samples` random windows of `seq_len` tokens from `text` (as Wanda and SparseGPT draw them);
    with `bos_id`, each is that token and `seq_len - 1` tokens of text."""
    if num_samples < 1 or seq_len < 2:
        raise LlmBipError("calibration needs at least 1 sample of at least 2 tokens")
    ids = tokenize(tokenizer, text)
    length = text_length(seq_len, bos_id)
    if ids.numel() <= length:
        raise LlmBipError(
            f"calibration text has {ids.numel()} tokens, fewer than one sample of {seq_len}: "
            "give a longer text or a shorter --seq-len"
        )
    samples = torch.stack([ids[s : s + length] for s in calibration_starts(ids.numel(), num_samples, length, seed)])
    return with_bos(samples, bos_id)


def calibration_starts(num_tokens: int, num_samples: int, length: int, seed: int) -> list[int]:
    """Where calibration_samples' windows of `length` text tokens start in a text of `num_tokens`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_tokens - length, (num_samples,), generator=generator).tolist()


def held_out_windows(ids: torch.Tensor, seq_len: int, num_windows: int, taken: list[int], taken_length: int,
                     bos_id: int | None = None) -> torch.Tensor:
    """Up to `num_windows` non-overlapping windows of `seq_len` tokens of `ids` that share no token with the
    windows of `taken_length` starting at `taken` (the calibration samples), spread evenly over the text."""
    length = text_length(seq_len, bos_id)
    spans = sorted((s, s + taken_length) for s in taken)
    free = [s for s in range(0, ids.numel() - length + 1, length)
            if not any(a < s + length and s < b for a, b in spans)]
    if not free:
        raise LlmBipError(f"the calibration text has no {seq_len}-token window outside the calibration samples "
                          "to judge on: give a longer text or fewer --num-samples")
    step = len(free) / min(num_windows, len(free))
    picks = [free[int(i * step)] for i in range(min(num_windows, len(free)))]
    return with_bos(torch.stack([ids[s : s + length] for s in picks]), bos_id)


def calibration_held_out(ids: torch.Tensor, num_windows: int, num_samples: int, seq_len: int, seed: int,
                         bos_id: int | None = None) -> torch.Tensor:
    """held_out_windows of `seq_len` tokens of `ids` around the windows calibration_samples draws from the same
    ids with the same `num_samples`, `seq_len`, `seed` and `bos_id`."""
    length = text_length(seq_len, bos_id)
    taken = calibration_starts(ids.numel(), num_samples, length, seed)
    return held_out_windows(ids, seq_len, num_windows, taken, length, bos_id)


def text_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None, bos_id: int | None = None,
                 source: str = "the text") -> torch.Tensor:
    """The non-overlapping windows of `seq_len` tokens over `ids` that perplexity is measured on (at most
    `max_windows`); with `bos_id`, each window is that token and the next `seq_len - 1` tokens of text, so
    every text token after a window's first is predicted once, as without it."""
    length = text_length(seq_len, bos_id)
    windows = ids.numel() // length
    if windows == 0:
        raise LlmBipError(f"evaluation text '{source}' has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows:
        windows = min(windows, max_windows)
    return with_bos(ids[: windows * length].view(windows, length), bos_id)


def text_length(seq_len: int, bos_id: int | None) -> int:
    """Text tokens in a window of `seq_len` tokens: one fewer where every window starts with `bos_id`."""
    return seq_len - (bos_id is not None)


def with_bos(windows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos_id, dtype=windows.dtype), windows], dim=1)


_CHUNK_CHARS = 200_000  # a fast tokenizer's working memory grows to ~140 bytes per character of its input
_WINDOW = 256  # characters either side of a cut that must tokenize the same split or whole


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str, chunk_chars: int = _CHUNK_CHARS) -> torch.Tensor:
    """The token ids of `text`, exactly as one call of the tokenizer gives them, but tokenized in pieces
    of about `chunk_chars` characters so that its working memory stays small (a whole 3 MB text took
    390 MB). A piece ends at a line break where the text around it tokenizes the same split or whole;
    tokenizers work locally (a regex split into words, then merges inside each), so the ids are the
    same. If no such cut is found, the text is tokenized in one call."""
    if not text.strip():
        raise LlmBipError("the text is empty: give a file with some text in it")

    def encode(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    ids: list[int] = []
    start = 0
    while len(text) - start > 1.5 * chunk_chars:
        cut = _safe_cut(encode, text, start + chunk_chars)
        if cut is None:
            log.debug("no safe place to cut the text into pieces: tokenizing it whole")
            return torch.tensor(encode(text), dtype=torch.long)
        ids += encode(text[start:cut])
        start = cut
    ids += encode(text[start:])
    return torch.tensor(ids, dtype=torch.long)


def _safe_cut(encode, text: str, target: int, tries: int = 50) -> int | None:
    position = target
    for _ in range(tries):
        position = text.find("\n", position)
        if position < 0:
            return None
        left, right = text[max(0, position - _WINDOW) : position], text[position : position + _WINDOW]
        if encode(left + right) == encode(left) + encode(right):
            return position
        position += 1
    return None
