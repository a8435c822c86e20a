"""The ``code`` corpus: real, hand-written source files labelled by programming language.

Each language comes from named registry packages (Debian, npm) or the running Python's standard library
(``SOURCES``; the table is in docs/data.md), unpacked once into the cache by ``--fetch``; each document
records its package, version and licence. Only real source is kept (`reject_reason`): no vendored,
test-fixture or third-party trees, no generated, minified or data-table files. A file's leading licence
comment is dropped (the same boilerplate in every file would be a large, language-agnostic part of the
corpus), and a long file gives one seeded excerpt of ``CODE_DOCUMENT_BYTES``, so more files (and more
projects) fit in the budget and the validation split holds many files. java is optional, not a default
(docs/experts.md says why). ``roots`` (label -> directories) replaces the packages.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import sysconfig
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate, dropwhile, takewhile
from pathlib import Path

from tqdm import tqdm

from monet.data.documents import Document, content_hash, decode_text, seeded_key, truncate_utf8
from monet.data.packages import deb_root, extract_tar, fetch_deb, npm_package
from monet.errors import MonetError

MIN_DOCUMENT_CHARS = 200
CODE_DOCUMENT_BYTES = 6 * 1024
READ_LIMIT = 512 * 1024          # larger files are not read (they are generated or tables in practice)
SHELLS = ("sh", "bash", "dash", "ksh", "zsh")

# Directory names never entered: build outputs, vendored and third-party code, test fixtures and data.
SKIP_DIRS = {
    "__pycache__", "site-packages", "dist-packages", ".git", "node_modules", "vendor", "third_party",
    "thirdparty", "third-party", "external", "testdata", "test", "tests", "testsuite", "__tests__", "fixtures",
    "benches", "unicore", "localedata", "iconvdata", "timezone", "benchtests", "idlelib", "encodings",
}
GENERATED = re.compile(
    r"code generated .{0,80}do not edit|do not edit|@generated|auto-?generated|automatically generated"
    r"|generated (?:by|from|with) ", re.IGNORECASE)
WORD = re.compile(r"0[xX][0-9a-fA-F]+|\d+(?:\.\d+)?|[A-Za-z_][A-Za-z0-9_]*")
KEPT_HEAD_LINES = ("<?php", "<?", "# -*- coding: utf-8 -*-")   # kept above a dropped licence header
BLOCK_COMMENTS = {"/*": "*/", "--[[": "]]", "=begin": "=end"}   # opener -> closer
LICENCE_WORDS = re.compile(r"copyright|licen[cs]e|SPDX|all rights reserved|free software", re.IGNORECASE)


@dataclass(frozen=True)
class CodeSource:
    """Where one language's files come from.

    kind: "deb" (Debian package, unpacked with dpkg -x), "npm" (``npm pack`` tarball), "stdlib" (the
    running Python's standard library) or "system" (directories already on a Debian machine).
    inner: glob of the source tree (or .zip / .tar.xz archive) inside the unpacked package.
    """

    label: str
    kind: str
    package: str
    inner: str
    license: str
    extensions: tuple[str, ...]
    skip_files: str = ""         # regex on the file name (e.g. tests named *_test.go)


_SOURCES = (
    CodeSource("c", "deb", "glibc-source", "usr/src/glibc/glibc-*.tar.xz", "LGPL-2.1-or-later", (".c", ".h"),
               r"^(tst|test|bug)-|-tables?\.c$|^(e_|s_)?\w*_data\.c$"),
    CodeSource("go", "deb", "golang-1.19-src", "usr/share/go-1.19/src", "BSD-3-Clause", (".go",), r"_test\.go$"),
    CodeSource("java", "deb", "openjdk-17-source", "usr/lib/jvm/openjdk-17/lib/src.zip",
               "GPL-2.0-only WITH Classpath-exception-2.0", (".java",)),
    CodeSource("javascript", "npm", "eslint@8.57.0", "lib", "MIT", (".js", ".mjs", ".cjs"), r"\.min\.js$"),
    CodeSource("php", "deb", "php-pear", "usr/share/php", "BSD-2-Clause", (".php",)),
    CodeSource("php", "deb", "phpunit", "usr/share/php", "BSD-3-Clause", (".php",)),
    CodeSource("php", "deb", "php-doctrine-dbal", "usr/share/php", "MIT", (".php",)),
    CodeSource("python", "stdlib", "python-stdlib", "", "PSF-2.0", (".py",), r"^test_"),
    CodeSource("ruby", "deb", "libruby3.1", "usr/lib/ruby/3.1.0", "BSD-2-Clause OR Ruby", (".rb",)),
    CodeSource("rust", "deb", "rust-src", "usr/src/rustc-*/library", "MIT OR Apache-2.0", (".rs",)),
    CodeSource("lua", "deb", "nmap-common", "usr/share/nmap", "NPSL (Nmap Public Source License, GPL-2.0 based)",
               (".lua", ".nse")),
    CodeSource("perl", "system", "perl-modules", "/usr/share/perl/*", "Artistic-1.0 OR GPL-1.0-or-later",
               (".pm", ".pl")),
    CodeSource("shell", "system", "shell-scripts", "/usr/bin", "various (Debian packages' scripts)", (".sh", ".bash")),
)
# label -> its sources (a language may draw on several packages).
SOURCES: dict[str, tuple[CodeSource, ...]] = {
    label: tuple(s for s in _SOURCES if s.label == label) for label in sorted({s.label for s in _SOURCES})
}
DEFAULT_LANGUAGES = ("c", "go", "javascript", "lua", "php", "python", "ruby", "rust")


# ------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class FileRef:
    """A file on disk, or a member of a zip or tar archive."""

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
    try:
        with open(path, "rb") as fh:
            head = fh.read(128)
    except OSError:
        return ""
    if not head.startswith(b"#!"):
        return ""
    words = head[2:].split(b"\n", 1)[0].decode("latin-1").split() or [""]
    name = os.path.basename(words[0])
    if name == "env" and len(words) > 1:
        name = words[1]
    return name.rstrip("0123456789.")


def _wanted(source: CodeSource, path: str) -> bool:
    """A file of the language (by extension, or a shell shebang) whose name is not skipped."""
    if source.skip_files and re.search(source.skip_files, os.path.basename(path)):
        return False
    ext = os.path.splitext(path)[1].lower()
    return ext in source.extensions or (source.label == "shell" and ext == "" and _shebang(path) in SHELLS)


def _wanted_member(source: CodeSource, name: str) -> bool:
    """An archive member of the language, not under a skipped directory."""
    return _wanted(source, name) and not SKIP_DIRS.intersection(name.split("/")[:-1])


def _safe_member(name: str) -> bool:
    """An archive member name that stays inside its archive: relative, without `..`, NUL or backslashes."""
    return not (name.startswith("/") or "\\" in name or "\0" in name or ".." in name.split("/"))


def walk(root: str, source: CodeSource) -> Iterator[FileRef]:
    """Files of ``source``'s language under ``root`` (a directory or a .zip); symlinks not followed."""
    if os.path.isfile(root):
        if root.endswith(".zip"):
            with zipfile.ZipFile(root) as archive:
                for member in sorted(archive.namelist()):   # read in place, never extracted; odd names skipped
                    if not member.endswith("/") and _safe_member(member) and _wanted_member(source, member):
                        yield FileRef(root, member)
        elif _wanted(source, root):
            yield FileRef(root)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and _wanted(source, path):
                yield FileRef(path)


def _extract_tar(archive: str, source: CodeSource, out: Path) -> Path:
    """Unpack the wanted files of a .tar.xz (glibc ships its source so) into ``out`` once; returns ``out``.
    Through `extract_tar`: a member that would land outside ``out`` refuses the archive."""
    if (out / ".complete").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    try:
        with open(archive, "rb") as handle:
            extract_tar(handle, tmp, archive, lambda member: member.isfile() and _wanted_member(source, member.name))
        (tmp / ".complete").write_text(archive, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------ packages


def _dpkg_version(package: str) -> str | None:
    """The version of an installed Debian package, from dpkg's status file; None when not installed."""
    status = Path("/var/lib/dpkg/status")
    text = status.read_text(encoding="utf-8", errors="replace") if status.is_file() else ""
    # Within the package's own paragraph (`.+` never crosses the blank line between paragraphs).
    found = re.search(rf"^Package: {re.escape(package)}\n(?:.+\n)*?Version: (.+)", text, re.MULTILINE)
    return found.group(1) if found else None


def locate(source: CodeSource, cache: Path, fetch: bool) -> tuple[list[str], str] | None:
    """(roots, version) of a source, fetching its package when ``fetch``; None when it is not available."""
    if source.kind == "stdlib":
        return [sysconfig.get_paths()["stdlib"]], ".".join(map(str, sys.version_info[:3]))
    if source.kind == "system":
        roots = sorted(glob.glob(source.inner))
        return (roots, "system") if roots else None
    if source.kind == "npm":
        package = npm_package(source.package, cache, fetch)
        if package is None:
            return None
        meta = json.loads((package / "package.json").read_text(encoding="utf-8"))
        roots = sorted(glob.glob(str(package / source.inner)))
        return (roots, str(meta.get("version", "unknown"))) if roots else None
    version = _dpkg_version(source.package)
    found = sorted(glob.glob(f"/{source.inner}")) if version else []
    root = deb_root(source.package, cache)
    if not found:
        if not root.is_dir() and fetch:
            fetch_deb(source.package, cache)
        found = sorted(glob.glob(str(root / source.inner)))
        marker = root / ".monet-package.json"   # written by fetch_deb, from the .deb file name
        if marker.is_file():
            version = str(json.loads(marker.read_text(encoding="utf-8")).get("version", ""))
    if not found:
        return None
    tars = (".tar.xz", ".tar.gz", ".tar.bz2", ".tar")
    extracted = root.with_name(f"{source.package}.src")
    roots = [str(_extract_tar(path, source, extracted)) if path.endswith(tars) else path for path in found]
    return roots, version or "unknown"


def _check_languages(labels: Iterable[str]) -> None:
    unknown = [label for label in labels if label not in SOURCES]
    if unknown:
        raise MonetError(f"unknown code language {unknown[0]!r}; known: {', '.join(sorted(SOURCES))}")


def resolve_sources(languages: tuple[str, ...] | list[str], cache: Path, fetch: bool) -> dict[str, list[dict]]:
    """label -> one entry per source: {"roots", "version", "source"}; a clear error for what is missing."""
    _check_languages(languages)
    resolved: dict[str, list[dict]] = {}
    missing = []
    for label in languages:
        for source in SOURCES[label]:
            found = locate(source, cache, fetch)
            if found is None:
                missing.append(f"{label} ({source.kind} package {source.package})")
            else:
                resolved.setdefault(label, []).append({"roots": found[0], "version": found[1], "source": source})
    if missing:
        raise MonetError(
            "the code corpus needs these packages, not found on this machine or in the cache: "
            + ", ".join(missing) + ". Rerun with --fetch (downloads them from the package registries into "
            "the cache) or choose other languages with source option languages=..."
        )
    return resolved


# ------------------------------------------------------------------------------------ filtering


def strip_licence_header(text: str) -> str:
    """Drop a leading comment block (after an optional shebang / PHP open tag) that is a licence or
    copyright notice; other leading comments (docstrings, descriptions) are kept."""
    lines = text.split("\n")
    keep_head = list(takewhile(lambda line: line.startswith("#!") or line.strip() in KEPT_HEAD_LINES, lines))
    lines = lines[len(keep_head):]
    i = start = next((j for j, line in enumerate(lines) if line.strip()), len(lines))   # first non-blank line
    opener = next((o for o in BLOCK_COMMENTS if i < len(lines) and lines[i].lstrip().startswith(o)), None)
    if opener:
        closer = BLOCK_COMMENTS[opener]
        while i < len(lines) and closer not in lines[i][(lines[i].find("/*") + 2) if i == start else 0:]:
            i += 1
        i += 1
    else:
        while i < len(lines) and lines[i].lstrip().startswith(("//", "#", "--", ";", "*")) \
                and not lines[i].lstrip().startswith(("#include", "#define", "#if", "#import", "#[", "#!")):
            i += 1
    if LICENCE_WORDS.search("\n".join(lines[start:i])):
        return "\n".join(keep_head + list(dropwhile(lambda line: not line.strip(), lines[i:])))
    return text


def reject_reason(text: str) -> str | None:
    """Why a file is not hand-written source ('generated', 'minified', 'data table'), or None."""
    if GENERATED.search(text[:1500]):
        return "generated"
    lines = text.split("\n")
    if max((len(line) for line in lines), default=0) > 1000 or len(text) / max(len(lines), 1) > 150:
        return "minified"
    words = WORD.findall(text)
    numeric = sum(w[0].isdigit() for w in words)
    if words and numeric / len(words) > 0.3:
        return "data table"
    return None


def excerpt(text: str, key: str, max_bytes: int = CODE_DOCUMENT_BYTES) -> tuple[str, int]:
    """At most ``max_bytes`` of whole lines, starting at a line chosen from ``key`` (0 when it all fits)."""
    if len(text.encode("utf-8")) <= max_bytes:
        return text, 0
    lines = text.split("\n")
    # Start positions from which at least ~max_bytes remain, chosen deterministically.
    remaining = list(accumulate(len(line.encode("utf-8")) + 1 for line in reversed(lines)))[::-1]   # bytes to the end
    candidates = [i for i, r in enumerate(remaining) if r >= max_bytes] or [0]
    start = candidates[int(seeded_key(0, key)[:8], 16) % len(candidates)]
    return truncate_utf8("\n".join(lines[start:]), max_bytes), start


def read_document(ref: FileRef, label: str, provenance: dict | None = None, seed: int = 0) -> Document | None:
    """The file as a document (licence header dropped, an excerpt when long), or None if it is binary, not
    UTF-8, too short, generated, minified or a data table."""
    try:
        data = ref.read_bytes(READ_LIMIT + 1)
    except (OSError, zipfile.BadZipFile):
        return None
    text = decode_text(data) if len(data) <= READ_LIMIT else None
    if text is None or reject_reason(text) is not None:
        return None
    text = strip_licence_header(text).strip("\n") + "\n"
    if len(text.strip()) < MIN_DOCUMENT_CHARS:
        return None
    text, start = excerpt(text, f"{seed}:{content_hash(text)}")   # by content: copies give one excerpt
    meta = ({"first_line": start} if start else {}) | (provenance or {})
    return Document(text=text, label=label, source=ref.name, meta=meta)


def discover(roots: dict[str, list[str]], sources: dict[str, list[dict]] | None = None
             ) -> dict[str, list[tuple[FileRef, dict | None]]]:
    """Candidate files per label, each with its provenance (None for explicit ``roots``). A path seen
    under two labels is kept by the first label in sorted order."""
    if sources is None:
        _check_languages(roots)
        sources = {label: [{"roots": dirs, "source": SOURCES[label][0]}] for label, dirs in roots.items()}
    found: dict[str, list[tuple[FileRef, dict | None]]] = {}
    seen: set[str] = set()
    for label in sorted(sources):
        refs = []
        for entry in sources[label]:
            source = entry["source"]
            info = None if "version" not in entry else {
                "package": source.package, "version": entry["version"], "license": source.license}
            for root in filter(os.path.exists, entry["roots"]):
                for ref in walk(root, source):
                    if ref.name not in seen:
                        seen.add(ref.name)
                        refs.append((ref, info))
        if refs:
            found[label] = refs
    return found


def code_documents(
    max_bytes: int, seed: int = 0, *, cache: Path, fetch: bool = False, roots: dict[str, list[str]] | None = None,
    languages: tuple[str, ...] | list[str] | None = None, progress: bool = True,
) -> list[Document]:
    """Read files per language in seeded order until each language's byte budget (max_bytes / languages)
    is filled. ``roots`` (label -> directories) replaces the packages; ``languages`` picks the labels
    (default: the 8 of ``DEFAULT_LANGUAGES``)."""
    sources = None if roots is not None else resolve_sources(tuple(languages or DEFAULT_LANGUAGES), cache, fetch)
    candidates = discover(roots or {}, sources)
    if not candidates:
        raise MonetError("no source files found for any language; check the roots or rerun with --fetch")
    budget = max(1, max_bytes // len(candidates))
    seen: set[str] = set()
    documents: list[Document] = []
    with tqdm(total=budget * len(candidates), unit="B", unit_scale=True, desc="code", disable=not progress) as bar:
        for label in sorted(candidates):
            used, misses = 0, 0
            for ref, info in sorted(candidates[label], key=lambda c: seeded_key(seed, c[0].name)):
                doc = read_document(ref, label, info, seed)
                if doc is None or doc.digest in seen:
                    continue
                size = len(doc.text.encode("utf-8"))
                if used and used + size > budget:
                    misses += 1
                    if misses >= 50:   # the budget is nearly full: stop looking for small enough files
                        break
                    continue
                seen.add(doc.digest)
                documents.append(doc)
                used += size
                bar.update(size)
                if used >= 0.98 * budget:
                    break
    return documents


__all__ = ["CODE_DOCUMENT_BYTES", "DEFAULT_LANGUAGES", "SOURCES", "CodeSource", "code_documents", "discover",
           "excerpt", "read_document", "reject_reason", "resolve_sources", "strip_licence_header"]
