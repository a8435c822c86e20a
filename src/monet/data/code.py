"""The ``code`` corpus: real source files found on the machine, labelled by programming language.

Eight languages are always there on a Debian machine with Python and Node.js (Python stdlib, C and
C++ headers, npm's JavaScript, Perl modules, shell scripts, Vim script, Tcl). Go, Lua, Rust and Java
come from Debian source packages unpacked into the cache with ``--fetch`` (or already unpacked).
"""

from __future__ import annotations

import glob
import os
import shutil
import sysconfig
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from monet.data.documents import (
    MAX_DOCUMENT_BYTES,
    Document,
    decode_text,
    seeded_key,
    truncate_utf8,
)
from monet.data.packages import deb_root, fetch_deb
from monet.errors import MonetError

MIN_DOCUMENT_CHARS = 64
SHELLS = ("sh", "bash", "dash", "ksh", "zsh")


@dataclass(frozen=True)
class FileRef:
    """A file on disk, or a member of a zip archive (Java sources ship as src.zip)."""

    path: str
    member: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path}!{self.member}" if self.member else self.path

    def read_bytes(self, limit: int) -> bytes:
        if self.member is None:
            with open(self.path, "rb") as fh:
                return fh.read(limit)
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as fh:
            return fh.read(limit)


def _shebang(path: str) -> str:
    """Interpreter name from a ``#!`` line ('' when there is none)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(128)
    except OSError:
        return ""
    if not head.startswith(b"#!"):
        return ""
    words = head[2:].split(b"\n", 1)[0].decode("latin-1").split()
    if not words:
        return ""
    name = os.path.basename(words[0])
    if name == "env" and len(words) > 1:
        name = words[1]
    return name.rstrip("0123456789.")


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


# Per label: does this file (found under one of the label's roots) belong to it?
PREDICATES: dict[str, Callable[[str], bool]] = {
    "python": lambda p: _ext(p) == ".py",
    "c": lambda p: _ext(p) in (".h", ".c"),
    "cpp": lambda p: _ext(p) in ("", ".h", ".hpp", ".hh", ".tcc", ".cc", ".cpp", ".cxx"),
    "javascript": lambda p: _ext(p) in (".js", ".mjs", ".cjs"),
    "perl": lambda p: _ext(p) in (".pm", ".pl") or (_ext(p) == "" and _shebang(p) == "perl"),
    "shell": lambda p: _ext(p) in (".sh", ".bash") or (_ext(p) == "" and _shebang(p) in SHELLS),
    "vim": lambda p: _ext(p) == ".vim",
    "tcl": lambda p: _ext(p) == ".tcl",
    "go": lambda p: _ext(p) == ".go",
    "lua": lambda p: _ext(p) in (".lua", ".nse"),
    "rust": lambda p: _ext(p) == ".rs",
    "java": lambda p: _ext(p) == ".java",
}

# Directory names never entered (compiled caches, other languages' trees inside a root).
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}
C_SKIP_DIRS = {"c++"}

# Optional languages: Debian package -> (label, path inside the package; a glob pattern).
FETCHABLE = {
    "golang-1.19-src": ("go", "usr/share/go-1.19/src"),
    "nmap-common": ("lua", "usr/share/nmap"),
    "rust-src": ("rust", "usr/src/rustc-*/library"),
    "openjdk-17-source": ("java", "usr/lib/jvm/openjdk-17/lib/src.zip"),
}


def _node_modules() -> list[str]:
    node = shutil.which("node")
    roots = ["/usr/share/nodejs", "/usr/lib/node_modules"]
    if node:
        roots.insert(0, os.path.join(os.path.dirname(os.path.realpath(node)), "..", "lib", "node_modules"))
    return [os.path.normpath(r) for r in roots]


def system_roots() -> dict[str, list[str]]:
    """Where each always-available language lives on a Debian machine (checked 2026-11)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return {
        "python": [stdlib],
        "c": ["/usr/include"],
        "cpp": sorted(glob.glob("/usr/include/c++/*")) + sorted(glob.glob("/usr/include/llvm-[0-9]*")),
        "javascript": _node_modules(),
        "perl": sorted(glob.glob("/usr/share/perl*") + glob.glob("/usr/lib/*-linux-gnu/perl*")) + ["/usr/bin"],
        "shell": ["/usr/bin", "/usr/sbin", "/usr/share", "/usr/lib/git-core"],
        "vim": ["/usr/share/vim"],
        "tcl": ["/usr/share/tcltk"] + sorted(glob.glob("/usr/lib/tcl*")),
    }


def fetched_roots(cache: Path, fetch: bool) -> dict[str, list[str]]:
    """Roots of the optional languages: system copy, else the cache (downloading when ``fetch``)."""
    roots: dict[str, list[str]] = {}
    for package, (label, inner) in FETCHABLE.items():
        found = sorted(glob.glob(f"/{inner}")) or sorted(glob.glob(str(deb_root(package, cache) / inner)))
        if not found and fetch:
            fetch_deb(package, cache)
            found = sorted(glob.glob(str(deb_root(package, cache) / inner)))
        if found:
            roots[label] = found
    return roots


def _walk(root: str, label: str) -> Iterator[FileRef]:
    """Files under ``root`` that belong to ``label`` (symlinks not followed, no duplicates by path)."""
    predicate = PREDICATES[label]
    if os.path.isfile(root):
        if root.endswith(".zip"):
            with zipfile.ZipFile(root) as archive:
                for member in sorted(archive.namelist()):
                    if predicate(member) and not member.endswith("/"):
                        yield FileRef(root, member)
        elif predicate(root):
            yield FileRef(root)
        return
    skip = SKIP_DIRS | (C_SKIP_DIRS if label == "c" else set())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in skip and not (label == "c" and d.startswith(("llvm-1", "clang")))
        )
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and predicate(path):
                yield FileRef(path)


def discover(roots: dict[str, list[str]]) -> dict[str, list[FileRef]]:
    """Candidate files per label (a path found under two labels' roots is kept by the first label)."""
    found: dict[str, list[FileRef]] = {}
    seen: set[str] = set()
    for label in sorted(roots):
        if label not in PREDICATES:
            raise MonetError(f"unknown code language {label!r}; known: {', '.join(sorted(PREDICATES))}")
        refs = []
        for root in roots[label]:
            if not os.path.exists(root):
                continue
            for ref in _walk(root, label):
                if ref.name not in seen:
                    seen.add(ref.name)
                    refs.append(ref)
        if refs:
            found[label] = refs
    return found


def read_document(ref: FileRef, label: str) -> Document | None:
    """The file as a document, or None if binary, not UTF-8, or (nearly) empty."""
    try:
        data = ref.read_bytes(4 * MAX_DOCUMENT_BYTES)
    except (OSError, zipfile.BadZipFile):
        return None
    text = decode_text(data)
    if text is None:
        # A read limit may have cut a multi-byte character: retry without the last few bytes.
        text = decode_text(data[:-3]) if len(data) == 4 * MAX_DOCUMENT_BYTES else None
    if text is None or len(text.strip()) < MIN_DOCUMENT_CHARS:
        return None
    text, truncated = truncate_utf8(text)
    meta = {"truncated": True} if truncated else {}
    return Document(text=text, label=label, source=ref.name, meta=meta)


def code_documents(
    max_bytes: int,
    seed: int = 0,
    *,
    cache: Path,
    fetch: bool = False,
    roots: dict[str, list[str]] | None = None,
    progress: bool = True,
) -> list[Document]:
    """Read files per language in seeded order until each language's byte budget is filled.

    ``roots`` (label -> directories) replaces the machine's default locations, e.g. in tests.
    Exact duplicates are skipped while reading; balancing happens here so that only the files
    that are kept are read.
    """
    if roots is None:
        roots = {**system_roots(), **fetched_roots(cache, fetch)}
    candidates = discover(roots)
    if not candidates:
        raise MonetError("no source files found for any language; check the roots or install python3")
    budget = max(1, max_bytes // len(candidates))
    seen: set[str] = set()
    documents: list[Document] = []
    bar = tqdm(total=budget * len(candidates), unit="B", unit_scale=True, desc="code", disable=not progress)
    for label in sorted(candidates):
        used, misses = 0, 0
        for ref in sorted(candidates[label], key=lambda r: seeded_key(seed, r.name)):
            doc = read_document(ref, label)
            if doc is None or doc.digest in seen:
                continue
            size = len(doc.text.encode("utf-8"))
            if used and used + size > budget:
                misses += 1
                if misses >= 50:  # the budget is as full as it will reasonably get
                    break
                continue
            seen.add(doc.digest)
            documents.append(doc)
            used += size
            bar.update(size)
            if used >= 0.98 * budget:
                break
    bar.close()
    return documents
