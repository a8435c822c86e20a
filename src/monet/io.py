"""Files: atomic writes, one strict JSON encoder, content hashes, and command output directories that are
filled beside their target and swapped in only on success, never destroying what the command did not
create (`output_directory`). Everything the package writes goes through here. No torch here: the data
layer and the command line use it too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monet.errors import MonetError

MARKER = ".monet-output"            # in every output directory a command writes: the command's name


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Any], None]) -> Path:
    """Write `data` (bytes, text, or a callback receiving a binary file) to `path` atomically: to a temporary
    sibling, then `os.replace`, so a killed process leaves the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars/arrays turned into Python numbers and lists, tuples into lists, dict keys
    into strings, and NaN / infinity into None: strict JSON that browsers and `json.loads` accept."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):   # numpy scalar or array
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def printable(value: Any) -> Any:
    """Corpus text made safe to show: control characters as their pictures (ESC as \u241b) and bidirectional
    or invisible formatting characters as ⟨U+202E⟩, so a terminal or a page never interprets them (no
    escape sequences, no reversed text). Newlines and tabs are kept. Applies to strings inside dicts and
    lists too."""
    if isinstance(value, str):
        return _HIDDEN.sub(_show, value)
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable(v) for v in value]
    return value


def _show(match: re.Match) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)
    return "\u2421" if code == 0x7F else f"⟨U+{code:04X}⟩"


def dumps(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text of `jsonable(value)`: UTF-8 kept readable, but control and bidirectional characters
    written as \\u escapes (the same data; safe to print on a terminal)."""
    text = json.dumps(jsonable(value), indent=indent, ensure_ascii=False, allow_nan=False)
    return _HIDDEN.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """`dumps(value)` to `path`, atomically."""
    return atomic_write(path, dumps(value) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Output directories


def check_output(out: str | os.PathLike, kind: str, force: bool = False, noun: str = "an output",
                 replace_own: bool = True) -> Path:
    """`out` as a Path, refused (MonetError) if writing a `kind` output there would replace something this
    command did not make: only a missing path, an empty directory or (with `replace_own`) a previous `kind`
    output (its marker says so) may be used without `force`. `noun` ("an atlas") names it in the messages.
    """
    out = check_writable(out)
    if out.exists() and not force:
        if not out.is_dir():
            raise MonetError(f"{out} is a file; pass another --out (or --force to replace it)")
        made_by = marker_kind(out)
        if made_by == kind and not replace_own:
            raise MonetError(f"{out} already exists; pass --force to replace it or choose another --out")
        if made_by is None and any(out.iterdir()):
            raise MonetError(f"{out} exists and is not {noun} (it has no `monet {kind}` marker); choose another "
                             "--out, or pass --force to replace it (its contents will be deleted)")
        if made_by not in (None, kind):
            raise MonetError(f"{out} holds the output of `monet {made_by}`, not {noun}; choose another --out, "
                             "or pass --force to replace it")
    return out


def check_writable(out: str | os.PathLike) -> Path:
    """`out` as a Path, or MonetError when it cannot be created: a file on the way, or a directory we may not
    write into."""
    out = Path(out).expanduser()
    for ancestor in out.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise MonetError(f"cannot write {out}: {ancestor} is a file, not a directory")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise MonetError(f"cannot write {out}: {ancestor} is not writable; choose another --out")
            break
    return out


def marker_kind(directory: Path) -> str | None:
    """The command that wrote `directory` (from its marker), or None."""
    marker = directory / MARKER
    try:
        return marker.read_text(encoding="utf-8").strip() or None if marker.is_file() else None
    except OSError:
        return None


@contextmanager
def output_directory(out: str | os.PathLike, kind: str, force: bool = False, noun: str = "an output",
                     replace_own: bool = True) -> Iterator[Path]:
    """Write a command's output directory atomically: yields a temporary sibling to fill; on success the
    marker is added and the sibling replaces `out` (an old output is moved aside, then deleted); on failure
    the sibling is removed and `out` is untouched. See `check_output` for what may be replaced."""
    out = check_output(out, kind, force, noun, replace_own)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out.parent, out.name)
    tmp = temporary_sibling(out)
    try:
        yield tmp
        (tmp / MARKER).write_text(kind + "\n", encoding="utf-8")
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: Path, out: Path) -> None:
    """Move the finished `new` to `out`; whatever was at `out` is renamed aside first, then deleted, so a
    kill at any moment leaves a complete `out` or a hidden `.trash-*` sibling, never half of one."""
    if not (out.exists() or out.is_symlink()):
        os.replace(new, out)
        return
    trash = out.with_name(f".trash-{out.name}-{os.getpid()}-{time.time_ns()}")
    os.replace(out, trash)
    os.replace(new, out)
    _delete(trash)


def sweep_temporaries(directory: Path, name: str) -> None:
    """Remove `.tmp-NAME-PID-*` / `.trash-NAME-*` siblings left by killed runs of this output: a temporary
    whose process is gone is stale (one still being written by a live process is left alone)."""
    for child in directory.iterdir():
        if child.name.startswith(f".trash-{name}-") or (child.name.startswith(f".tmp-{name}-")
                                                        and not _alive(child.name[len(f".tmp-{name}-"):])):
            _delete(child)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporary_sibling(out: Path) -> Path:
    """A new empty directory `.tmp-NAME-PID-XXXX` beside `out` (the pid lets a later run spot it as stale)."""
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-{os.getpid()}-"))


def _alive(suffix: str) -> bool:
    pid = suffix.split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:   # exists but belongs to someone else
        return True
    return True
