"""The lock of the default code corpus: the same bytes everywhere, or a refusal that says what moved.

The code corpus is read from Debian packages (whose archive replaces versions), an npm release and the
running Python's standard library, so a fresh machine may build another corpus from the same command: a
new upstream patch reshuffles the files, retrains the tokenizer and moves every figure. `code.lock.json`
(committed beside this file) records, for each locked build configuration (source, budget, seed,
languages), every input package with its exact version and the SHA-256 of the documents the corpus took
from it (sorted content digests, so machine paths do not matter), and of the whole corpus. `build_corpus`
checks a build against it; drift is refused with one line naming each package that moved unless
`allow_drift` (`--allow-drift`), and the manifest records the lock's hash and whether it held.

The documents' hash pins exactly the bytes that enter the corpus (after filtering, licence stripping and
the budget); it is checked without downloading anything, whatever the cache holds. `file_sha256` (the
downloaded .deb, when the cache recorded it) is kept beside it where known.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from monet.data.code import DEFAULT_LANGUAGES
from monet.data.documents import Document
from monet.errors import MonetError
from monet.io import atomic_write

LOCK_PATH = Path(__file__).with_name("code.lock.json")
LOCK_VERSION = 1


def _digest(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def corpus_entry(documents: list[Document], source: str, max_bytes: int, seed: int,
                 languages: list[str]) -> dict[str, Any]:
    """The lock entry of a built document list: per (package, version) its labels, document count and the
    SHA-256 of its sorted content digests; the same over the whole corpus."""
    packages: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in documents:
        key = (str(doc.meta.get("package", "?")), str(doc.meta.get("version", "?")))
        row = packages.setdefault(key, {"package": key[0], "version": key[1], "labels": set(), "digests": []})
        row["labels"].add(doc.label)
        row["digests"].append(doc.digest)
    rows = [{"package": row["package"], "version": row["version"], "labels": sorted(row["labels"]),
             "documents": len(row["digests"]), "documents_sha256": _digest(sorted(row["digests"]))}
            for _, row in sorted(packages.items())]
    return {"source": source, "max_bytes": int(max_bytes), "seed": int(seed), "languages": sorted(languages),
            "documents": len(documents), "documents_sha256": _digest(sorted(d.digest for d in documents)),
            "packages": rows}


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of an entry's canonical JSON (the `lock_sha256` that manifests and reports record)."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def read_lock(path: str | Path = LOCK_PATH) -> list[dict[str, Any]]:
    """The locked entries of a lock file ([] when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MonetError(f"cannot read the corpus lock {path}: {exc}") from exc
    if data.get("version") != LOCK_VERSION:
        raise MonetError(f"{path} has lock version {data.get('version')}; this monet reads version {LOCK_VERSION}")
    return list(data.get("corpora", []))


def find_entry(entries: list[dict[str, Any]], source: str, max_bytes: int, seed: int,
               languages: list[str]) -> dict[str, Any] | None:
    """The locked entry of this configuration, or None (an unlocked build: other budget, seed, languages)."""
    wanted = (source, int(max_bytes), int(seed), sorted(languages))
    return next((e for e in entries if (e["source"], e["max_bytes"], e["seed"], e["languages"]) == wanted), None)


def drift(locked: dict[str, Any], built: dict[str, Any]) -> list[str]:
    """What moved between a locked entry and a build, one phrase per package ([] when nothing did)."""
    old = {row["package"]: row for row in locked["packages"]}
    new = {row["package"]: row for row in built["packages"]}
    moved = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is None or b is None:
            moved.append(f"{name} {'appeared' if a is None else 'is missing'}")
        elif (a["version"], a["documents_sha256"]) != (b["version"], b["documents_sha256"]):
            version = a["version"] if a["version"] == b["version"] else f"{a['version']} -> {b['version']}"
            count = "" if a["documents"] == b["documents"] else f", {a['documents']} -> {b['documents']} documents"
            moved.append(f"{name} {version} (documents differ{count})")
    if not moved and locked["documents_sha256"] != built["documents_sha256"]:
        moved.append("the corpus's documents differ (same packages)")
    return moved


def check_lock(documents: list[Document], source: str, max_bytes: int, seed: int, languages: list[str] | None,
               allow_drift: bool = False, path: str | Path | None = None) -> dict[str, Any]:
    """Check a built code corpus against its lock; returns the manifest's "lock" record ({"status":
    "verified" | "drift allowed" | "unlocked", "lock_sha256", "built_sha256", "moved"}). Drift is a
    MonetError naming what moved, unless `allow_drift`. `languages` None: an explicit `roots` corpus
    (never locked)."""
    path = LOCK_PATH if path is None else path
    built = corpus_entry(documents, source, max_bytes, seed, languages or [])
    locked = None if languages is None else find_entry(read_lock(path), source, max_bytes, seed, languages)
    record: dict[str, Any] = {"lock_file": Path(path).name, "built_sha256": entry_hash(built),
                              "documents_sha256": built["documents_sha256"]}
    if locked is None:
        return {**record, "status": "unlocked", "lock_sha256": None, "moved": []}
    moved = drift(locked, built)
    record |= {"lock_sha256": entry_hash(locked), "moved": moved}
    if moved and not allow_drift:
        raise MonetError(f"the code corpus is not the locked one ({Path(path).name}, budget {max_bytes:,} bytes, "
                         f"seed {seed}): {'; '.join(moved)}. Results will not compare with the locked runs; "
                         "install the locked versions (the lock lists them) or pass --allow-drift to build anyway "
                         "(the manifest records the drift)")
    return {**record, "status": "drift allowed" if moved else "verified"}


def corpus_lock_record(source: str, documents: list[Document], max_bytes: int, seed: int,
                       source_options: dict | None, allow_drift: bool = False,
                       path: str | Path | None = None) -> dict[str, Any] | None:
    """`check_lock` for a `build_corpus` call: the code corpus from its packages (languages given or the
    defaults) is checked; explicit `roots` and other sources are recorded as unlocked; None for non-code."""
    if source != "code":
        return None
    options = source_options or {}
    languages = None if options.get("roots") else list(options.get("languages") or DEFAULT_LANGUAGES)
    return check_lock(documents, source, max_bytes, seed, languages, allow_drift, path)


def write_lock(entries: list[dict[str, Any]], path: str | Path = LOCK_PATH) -> Path:
    """Write (or replace) `entries` in a lock file, keyed by configuration."""
    kept = [e for e in read_lock(path)
            if not any((e["source"], e["max_bytes"], e["seed"], e["languages"]) ==
                       (n["source"], n["max_bytes"], n["seed"], n["languages"]) for n in entries)]
    text = json.dumps({"version": LOCK_VERSION, "corpora": [*kept, *entries]}, indent=1, sort_keys=True) + "\n"
    atomic_write(Path(path), text)
    return Path(path)


__all__ = ["LOCK_PATH", "check_lock", "corpus_entry", "corpus_lock_record", "drift", "entry_hash", "find_entry",
           "read_lock", "write_lock"]
