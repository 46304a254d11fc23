"""Writing outputs safely: checked before any long work, written atomically, never over a user's file.

Rules every command follows:
- an output that exists is replaced only with `--overwrite`, and only if llm-bip wrote it (a model
  directory whose record lists every file in it, or a scores / plan / report file of ours);
- an output is never one of the run's inputs (the model, its scores, its plan, its calibration text);
- everything is written under a temporary name in the same directory and renamed into place, so an
  interrupted run leaves no half-written output; leftovers of an earlier killed run are marked as ours
  and removed by the next run to the same output;
- files get the user's normal mode (safetensors writes 0600).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from llm_bip.errors import LlmBipError

RECORD_FILE = "pruning_record.json"
# Files in which an llm-bip output directory lists what llm-bip wrote there.
MANIFESTS = (RECORD_FILE, "compare.json")
PARTIAL_MARKER = ".llm-bip-partial"  # inside every temporary directory we create
_TMP_TAG, _OLD_TAG = ".tmp-", ".old-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def normal_modes(path: Path) -> None:
    """Give a written file (or every file under a written directory) the user's normal mode."""
    if path.is_dir():
        path.chmod(dir_mode())
        for child in path.rglob("*"):
            child.chmod(dir_mode() if child.is_dir() else file_mode())
    else:
        path.chmod(file_mode())


def os_error(exc: OSError, path: Path) -> LlmBipError:
    """A one-line message for an OS error while writing `path`."""
    if exc.errno == errno.ENOSPC:
        return LlmBipError(f"no space left on the device while writing {path}: free some space or choose another output")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return LlmBipError(f"cannot write {path}: the place is read-only or not yours; choose another output")
    return LlmBipError(f"cannot write {path} ({os.strerror(exc.errno) if exc.errno else exc}): choose another output")


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_writable_place(path: Path, what: str) -> None:
    """The directory that will hold `path` exists or can be created, and can be written (probed)."""
    anchor = _existing_ancestor(path.parent)
    if not anchor.is_dir():
        raise LlmBipError(f"{what} {path}: {anchor} is a file, not a directory; choose another output")
    probe = anchor / f".llm-bip-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LlmBipError(f"{what} {path}: cannot write in {anchor} ({os.strerror(exc.errno or 0)}); "
                          "choose another output") from None


def _same_or_inside(path: Path, other: Path) -> bool:
    return path == other or path in other.parents


def check_not_input(path: Path, inputs: Iterable[str | Path | None], what: str) -> None:
    for item in inputs:
        if not item:
            continue
        source = Path(item).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if _same_or_inside(source, path):
            raise LlmBipError(f"{what} {path} is {'an input' if source == path else 'a folder holding an input'} "
                              f"of this run ({source}): choose another output; llm-bip never overwrites its inputs")


def check_output_file(path: str | Path, overwrite: bool, inputs: Iterable = (), what: str = "output",
                      ours: Callable[[Path], bool] | None = None) -> Path:
    """Fail before any long work if a file output cannot (or must not) be written."""
    out = Path(path).expanduser().resolve()
    check_not_input(out, inputs, what)
    if out.is_dir():
        raise LlmBipError(f"{what} {out} is a directory: give a file name")
    if out.exists():
        if not overwrite:
            raise LlmBipError(f"{what} {out} already exists: choose another name or pass --overwrite")
        if ours is not None and not ours(out):
            raise LlmBipError(f"{what} {out} exists and was not written by llm-bip: it is left alone; choose another name")
    check_writable_place(out, what)
    return out


def check_output_dir(path: str | Path, overwrite: bool, inputs: Iterable = (), what: str = "--output") -> Path:
    """Fail before any long work if a directory output cannot (or must not) be written."""
    out = Path(path).expanduser().resolve()
    check_not_input(out, inputs, what)
    if out.exists():
        if not out.is_dir():
            raise LlmBipError(f"{what} {out} exists and is not a directory: choose another output")
        if not overwrite:
            raise LlmBipError(f"{what} {out} already exists: choose another output or pass --overwrite")
        foreign = files_not_ours(out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise LlmBipError(f"{what} {out} holds files llm-bip did not write ({shown}): --overwrite replaces only "
                              "outputs of llm-bip; choose another output")
    check_writable_place(out / "x", what)
    return out


def files_not_ours(directory: Path) -> list[str]:
    """Files in `directory` that no llm-bip manifest there lists (all of them if it has none), and listed
    files whose content no longer has the checksum the manifest holds for it (a model card someone edited)."""
    present = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    listed: set[str] = set()
    checksums: dict[str, str] = {}
    for manifest in MANIFESTS:
        try:
            data = json.loads((directory / manifest).read_text())
            listed |= set(data.get("files", [])) | {manifest}
            checksums.update(data.get("checksums") or {})
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return [name for name in present if name not in listed
            or (name in checksums and _sha256(directory / name) != checksums[name])]


def sha256_of(data: bytes) -> str:
    """A file's checksum as manifests hold it."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    try:
        return sha256_of(path.read_bytes())
    except OSError:
        return ""


def clean_debris(out: Path) -> list[Path]:
    """Remove the temporary directories and files an earlier, killed run left beside `out` (only
    those marked as ours)."""
    removed = []
    for leftover in out.parent.glob(f".{out.name}{_TMP_TAG}*"):
        if (leftover.is_dir() and (leftover / PARTIAL_MARKER).exists()) or (
                leftover.is_file() and leftover.name.endswith(".llm-bip")):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
            removed.append(leftover)
    for leftover in out.parent.glob(f".{out.name}{_OLD_TAG}*"):
        if leftover.is_dir() and (leftover / PARTIAL_MARKER).exists():
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A marked temporary sibling of `out` to write into; removed if the block fails."""
    clean_debris(out)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        (tmp / PARTIAL_MARKER).write_text("written by llm-bip; removed when the run finishes or the next run starts\n")
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(exc, out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename a finished staging directory to `out` (replacing an earlier llm-bip output there)."""
    (tmp / PARTIAL_MARKER).unlink()
    normal_modes(tmp)
    if out.exists():
        old = out.parent / f".{out.name}{_OLD_TAG}{uuid.uuid4().hex[:8]}"
        out.rename(old)
        (old / PARTIAL_MARKER).write_text("replaced output; removed next\n")
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp_path)`, then rename over `path`; nothing is left behind if it fails."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{_TMP_TAG}{uuid.uuid4().hex[:8]}.llm-bip"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        tmp.chmod(file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(exc, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def is_json_with(path: Path, key: str, prefix: str) -> bool:
    """A JSON file whose `key` starts with `prefix` (how llm-bip recognises its plans and reports)."""
    try:
        data = json.loads(path.read_text())
        return isinstance(data, dict) and str(data.get(key, "")).startswith(prefix)
    except (OSError, ValueError):
        return False
