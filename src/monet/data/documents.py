"""Labelled documents and the rules every corpus shares: exact dedup, hash split, label budgets.

The split of a document depends only on its content (a SHA-256 of the text), so it is the same on
every machine and whatever order the files were found in. Which documents fill a label's byte
budget depends only on the content and the seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import groupby
from operator import attrgetter

VALIDATION_FRACTION = 0.05


@dataclass
class Document:
    """One labelled text; ``source`` says where it came from (path or id), ``meta`` holds extras."""

    text: str
    label: str
    source: str
    meta: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return content_hash(self.text)


def content_hash(text: str) -> str:
    """SHA-256 hex digest of the UTF-8 text: the identity used for dedup and the split."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_of(text: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
    """'validation' for about ``validation_fraction`` of contents, else 'train' (content-determined)."""
    bucket = int(content_hash(text)[:8], 16) / 2**32
    return "validation" if bucket < validation_fraction else "train"


def assign_splits(
    documents: list[Document], validation_fraction: float = VALIDATION_FRACTION
) -> dict[str, list[Document]]:
    """Split by content hash; a label left without validation documents gets its lowest-hash one.

    The rescue keeps per-label validation losses defined for small labels (a few dozen large files)
    and, like the hash split itself, depends only on the set of documents, not on their order.
    """
    splits: dict[str, list[Document]] = {"train": [], "validation": []}
    for doc in documents:
        splits[split_of(doc.text, validation_fraction)].append(doc)
    for label in sorted({d.label for d in splits["train"]} - {d.label for d in splits["validation"]}):
        candidates = [d for d in splits["train"] if d.label == label]
        if len(candidates) >= 2:
            moved = min(candidates, key=lambda d: d.digest)
            splits["train"] = [d for d in splits["train"] if d is not moved]
            splits["validation"].append(moved)
    return {name: _ordered(split) for name, split in splits.items()}


def seeded_key(seed: int, name: str) -> str:
    """Order-independent, seed-dependent sort key (used to pick which files fill a budget)."""
    return hashlib.sha256(f"{seed}\0{name}".encode()).hexdigest()


def truncate_utf8(text: str, max_bytes: int) -> str:
    """Cut ``text`` to at most ``max_bytes`` UTF-8 bytes, at a line end when there is one."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    cut = data[:max_bytes].decode("utf-8", errors="ignore")
    newline = cut.rfind("\n")
    return cut[: newline + 1] if newline > 0 else cut


def decode_text(data: bytes) -> str | None:
    """UTF-8 text of ``data``, or None for binary (NUL bytes) and non-UTF-8 content."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def dedup(documents: Iterable[Document]) -> list[Document]:
    """Drop exact duplicates (same text), keeping the copy with the smallest (source, label)."""
    best: dict[str, Document] = {}
    for doc in documents:
        kept = best.get(doc.digest)
        if kept is None or (doc.source, doc.label) < (kept.source, kept.label):
            best[doc.digest] = doc
    return _ordered(best.values())


def balance(documents: list[Document], budget_bytes: int, seed: int) -> list[Document]:
    """Keep, per label, documents in seeded-hash order until the label's byte budget is used; the first
    document of a label is always kept, so no label vanishes under a tiny budget."""
    kept: list[Document] = []
    for _, group in groupby(sorted(documents, key=attrgetter("label")), key=attrgetter("label")):
        used = 0
        for doc in sorted(group, key=lambda d: seeded_key(seed, d.digest)):
            size = len(doc.text.encode("utf-8"))
            if used and used + size > budget_bytes:
                continue
            kept.append(doc)
            used += size
            if used >= budget_bytes:
                break
    return _ordered(kept)


def _ordered(documents: Iterable[Document]) -> list[Document]:
    """The canonical order of documents: by label, source and content."""
    return sorted(documents, key=lambda d: (d.label, d.source, d.digest))
