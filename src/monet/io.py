"""Files: atomic writes, one strict JSON encoder, content hashes, and command output directories that are
filled beside their target and swapped in only on success, never destroying what the command did not
create (`output_directory`). Everything the package writes goes through here. No torch here: the data
layer and the command line use it too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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
    """`out` as a Path, refused (MonetError) if writing a `kind` output there could destroy something. The one
    rule for what `--out` may replace (`--force` included, docs/cli.md "What --out may replace"): a missing
    path, an empty directory, or an earlier `kind` output (its marker says so) holding only the files that
    command wrote; with `replace_own=False` the earlier output only with `force`. Never a file, a symbolic
    link, an output of another command (a training run, a dataset, an atlas, a report of another kind), a
    folder without a marker that holds anything, or the command's own input (`command_inputs`), its parent or
    something inside it. `noun` ("an atlas") names the output in the messages; no message suggests --force
    where --force would not be allowed.
    """
    out = check_writable(out)
    if out.is_symlink():
        raise MonetError(f"--out {out} is a symbolic link (to {os.readlink(out)}); pass a real directory "
                         "(the link and its target are left alone)")
    if not out.exists():
        return out
    if not out.is_dir():
        raise MonetError(f"{out} is a file; choose another --out (a file is never replaced by a directory)")
    made_by = marker_kind(out)
    if made_by is None:
        if any(out.iterdir()):
            raise MonetError(f"{out} exists and is not {noun} (it has no `monet {kind}` marker, so it may hold "
                             "files of yours); choose another --out, or empty it yourself")
        check_not_input(out)
        return out
    if made_by != kind:
        raise MonetError(f"{out} holds the output of `monet {made_by}`, not {noun}; it is never replaced: "
                         "choose another --out")
    foreign = foreign_entries(out)
    if foreign:
        raise MonetError(f"{out} is {noun} but also holds {', '.join(foreign[:3])}, which monet did not write; "
                         "move them out or choose another --out")
    check_not_input(out)
    if not replace_own and not force:
        raise MonetError(f"{out} already exists; pass --force to replace it or choose another --out")
    return out


# The existing paths the running command reads (set by the command line, `command_inputs`): an output may
# never be one of them, a folder holding one, or a path inside one that already exists.
_INPUTS: ContextVar[tuple[Path, ...]] = ContextVar("monet_inputs", default=())


@contextmanager
def command_inputs(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Declare the paths the running command reads, for `check_output` (only those that exist count)."""
    resolved = tuple(Path(p).expanduser().resolve() for p in paths if str(p) and Path(p).expanduser().exists())
    token = _INPUTS.set(resolved)
    try:
        yield
    finally:
        _INPUTS.reset(token)


def check_not_input(out: Path) -> None:
    """MonetError when `out` is an input of the running command, a folder holding one, or (when it exists)
    a path inside one: replacing it would delete what the command reads."""
    target = out.expanduser().resolve()
    for source in _INPUTS.get():
        inside = source in target.parents and target.exists()
        if target == source or target in source.parents or inside:
            relation = "is" if target == source else "holds" if target in source.parents else "is inside"
            raise MonetError(f"--out {out} {relation} this command's input {source}; choose another --out")


def foreign_entries(directory: Path) -> list[str]:
    """Names in an output directory that its marker does not list (files someone else put there). Markers
    of older versions list nothing: then nothing is known to be foreign."""
    try:
        lines = (directory / MARKER).read_text(encoding="utf-8").splitlines()[1:]
    except OSError:
        return []
    written = {line for line in lines if line}
    if not written:
        return []
    return sorted(child.name for child in directory.iterdir()
                  if child.name not in written and child.name != MARKER and not child.name.startswith(".tmp-"))


def check_writable(out: str | os.PathLike) -> Path:
    """`out` as a Path, or MonetError when it cannot be created: a file on the way, or a directory we may not
    write into."""
    out = Path(out).expanduser()
    if out.is_symlink() and not out.exists():
        raise MonetError(f"{out} is a symbolic link to {os.readlink(out)}, which does not exist; pass a real path")
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
        lines = marker.read_text(encoding="utf-8").splitlines() if marker.is_file() else []
    except (OSError, UnicodeDecodeError):
        return None
    return lines[0].strip() or None if lines else None


def write_marker(directory: Path, kind: str) -> None:
    """The marker of an output directory: the command's name, then the names it wrote (one a line), so a
    later `--force` can tell its own files from files someone else put there."""
    names = sorted(child.name for child in directory.iterdir() if child.name != MARKER)
    (directory / MARKER).write_text("\n".join([kind, *names]) + "\n", encoding="utf-8")


@contextmanager
def output_directory(out: str | os.PathLike, kind: str, force: bool = False, noun: str = "an output",
                     replace_own: bool = True) -> Iterator[Path]:
    """Write a command's output directory atomically: yields a temporary sibling to fill; on success the
    marker is added and the sibling replaces `out` (an old output is moved aside, then deleted); on failure
    the sibling is removed and `out` is untouched. See `check_output` for what may be replaced."""
    check_output(out, kind, force, noun, replace_own)     # before the lock creates any folder
    with exclusive_lock(out):
        out = check_output(out, kind, force, noun, replace_own)   # again: another process may have just finished
        sweep_temporaries(out.parent, out.name)
        tmp = temporary_sibling(out)
        try:
            yield tmp
            write_marker(tmp, kind)
            replace_directory(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def exclusive_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of the output `out` (the file `.NAME.monet-lock` beside it) for the block, so a second
    monet process writing the same output is refused at once instead of overwriting or pruning the first's
    files. The lock is flock(2)'s: the kernel drops it when its process dies, so a killed run leaves no stale
    lock (at most the empty file, reused by the next run). Yields `out` as a Path."""
    out = check_writable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.monet-lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise MonetError(f"{out} is being written by another monet process"
                             f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to finish, or choose "
                             "another --out") from None
        try:   # the previous holder may have removed the file between our open and our lock: then retry
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield out
    finally:
        path.unlink(missing_ok=True)   # still locked here, so no one else holds this file
        os.close(fd)


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


def stale_temporary(name: str) -> bool:
    """Whether the `.tmp-*` / `.trash-*` entry `name` is a leftover: a `.trash-*` always (already renamed
    aside); a `.tmp-NAME-PID-XXXX` of `temporary_sibling` when process PID is gone (a live process may be
    writing it); any other `.tmp-*` (older versions) too."""
    if name.startswith(".trash-"):
        return True
    found = re.fullmatch(r"\.tmp-.*-(\d+)-[a-z0-9_]+", name)
    return name.startswith(".tmp-") and (found is None or not _alive(found.group(1)))


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
