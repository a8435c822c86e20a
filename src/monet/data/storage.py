"""Memory-mapped token storage: one token stream per split with per-document offsets and labels.

The directory layout (format version 1) is described in docs/data.md. Every document is stored as
``<s> text </s>``; documents are contiguous and in order, so the token stream of a split is exactly the
concatenation of its documents.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monet.errors import MonetError
from monet.io import atomic_write, marker_kind

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for the ids of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def spread_order(count: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation of range(count). Documents are stored by label and path, so the first windows
    of a label all come from its first files; any prefix of this order is a uniform sample of the windows
    instead (spread over the documents in proportion to their length), the same on every machine."""
    return np.random.default_rng(seed).permutation(count)


def write_split(
    out_dir: Path, split: str, token_lists: Sequence[Sequence[int]], label_ids: Sequence[int], metas: Sequence[dict],
    vocab_size: int,
) -> dict:
    """Write one split's three files; returns its document and token counts."""
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    ends = np.cumsum(lengths)
    docs = np.stack([ends - lengths, ends, np.asarray(label_ids, dtype=np.int64)], axis=1)
    tokens = np.fromiter((i for t in token_lists for i in t), dtype=token_dtype(vocab_size), count=int(lengths.sum()))
    atomic_write(out_dir / f"{split}.tokens", lambda fh: np.save(fh, tokens, allow_pickle=False))
    atomic_write(out_dir / f"{split}.docs.npy", lambda fh: np.save(fh, docs, allow_pickle=False))
    lines = "".join(json.dumps(m, sort_keys=True, ensure_ascii=False) + "\n" for m in metas)
    atomic_write(out_dir / f"{split}.meta.jsonl", lambda fh: fh.write(lines.encode("utf-8")))
    return {"documents": int(len(docs)), "tokens": int(tokens.size)}


class SplitWriter:
    """Writes one split document by document, in bounded memory, into the files `write_split` writes.

    Tokens, document rows and metadata go to scratch files as they come; `close` turns them into
    ``SPLIT.tokens`` / ``SPLIT.docs.npy`` (streamed through, never loaded whole) and maps the label ids,
    given in order of first appearance, onto the sorted label list. Use it inside a temporary directory.
    """

    CHUNK = 1 << 20   # document rows / tokens copied per step in `close`

    def __init__(self, out_dir: Path, split: str, vocab_size: int):
        self.out_dir, self.split, self.dtype = Path(out_dir), split, token_dtype(vocab_size)
        self._tokens = open(self.out_dir / f".{split}.tokens.raw", "wb")   # noqa: SIM115 - closed in close()
        self._docs = open(self.out_dir / f".{split}.docs.raw", "wb")       # noqa: SIM115
        self._meta = open(self.out_dir / f"{split}.meta.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self.documents = self.tokens = 0

    def add(self, token_ids: Sequence[int], label_id: int, meta: dict) -> None:
        ids = np.asarray(token_ids, dtype=self.dtype)
        self._tokens.write(ids.tobytes())
        self._docs.write(np.array([self.tokens, self.tokens + len(ids), label_id], dtype=np.int64).tobytes())
        self._meta.write(json.dumps(meta, sort_keys=True, ensure_ascii=False) + "\n")
        self.documents += 1
        self.tokens += len(ids)

    def close(self, label_order: Sequence[int]) -> dict:
        """Finish the files; ``label_order[first-seen id]`` is the label's index in the sorted labels."""
        for handle in (self._tokens, self._docs, self._meta):
            handle.close()
        raw_tokens, raw_docs = self.out_dir / f".{self.split}.tokens.raw", self.out_dir / f".{self.split}.docs.raw"
        # Plain reads and writes (not memory maps, whose pages would count as the process's memory).
        with open(self.out_dir / f"{self.split}.tokens", "wb") as out, open(raw_tokens, "rb") as source:
            _write_npy_header(out, self.dtype, (self.tokens,))
            shutil.copyfileobj(source, out, 1 << 22)
        mapping = np.asarray(label_order, dtype=np.int64)
        with open(self.out_dir / f"{self.split}.docs.npy", "wb") as out, open(raw_docs, "rb") as source:
            _write_npy_header(out, np.dtype(np.int64), (self.documents, 3))
            while chunk := source.read(self.CHUNK * 24):
                rows = np.frombuffer(chunk, dtype=np.int64).reshape(-1, 3).copy()
                rows[:, 2] = mapping[rows[:, 2]]
                out.write(rows.tobytes())
        raw_tokens.unlink()
        raw_docs.unlink()
        return {"documents": self.documents, "tokens": self.tokens}


def _write_npy_header(handle, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """The .npy header of a C-order array of ``dtype`` and ``shape`` (its data follows, written by the caller)."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(handle, header)


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a dataset directory, validated; MonetError says what is wrong and what to do."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise MonetError(f"{path} is a file, not a dataset directory; pass the directory that `monet data build` wrote")
    if not path.is_dir():
        raise MonetError(f"dataset directory {path} does not exist; build one with `monet data build --out {path}`")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():   # maybe a run, an atlas, or the user's folder: never suggest --force here
        raise MonetError(f"{path} has no {MANIFEST}, so it is not a (complete) dataset; pass the directory that "
                         "`monet data build` wrote, or build one into a new directory")
    rebuild = rebuild_hint(path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MonetError(f"{manifest_path} is corrupt ({exc}); {rebuild}") from exc
    required = ("format_version", "labels", "vocab_size", "splits", "source")
    missing = [k for k in required if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise MonetError(f"{manifest_path} lacks {', '.join(missing)}; {rebuild}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise MonetError(f"{manifest_path} has format version {manifest['format_version']!r}, this monet reads "
                         f"version {FORMAT_VERSION}; {rebuild}")
    problem = manifest_problem(manifest)
    if problem:
        raise MonetError(f"{manifest_path} is damaged: {problem}; {rebuild}")
    return manifest


def rebuild_hint(path: Path) -> str:
    """How to repair a damaged dataset: `--force` only where `monet data build` wrote the directory (it
    would refuse anything else, and must never be suggested for a run or an atlas)."""
    if marker_kind(path) == "data build":
        return f"rebuild it with `monet data build --out {path} --force`"
    return "pass the directory that `monet data build` wrote"


MAX_VOCAB = 1 << 24   # far above any tokenizer in use (GPT-2: 50,257); token ids are stored as uint16 / uint32


def manifest_problem(manifest: dict) -> str | None:
    """What makes a dataset manifest unusable (field types and ranges), or None: every field a reader uses."""
    labels, vocab, splits = manifest["labels"], manifest["vocab_size"], manifest["splits"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        return f"labels must be a non-empty list of names, got {str(labels)[:60]!r}"
    if len(set(labels)) != len(labels):
        return "labels repeat a name"
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= MAX_VOCAB:
        return f"vocab_size must be an integer in 1..{MAX_VOCAB:,}, got {str(vocab)[:40]!r}"
    if not isinstance(splits, dict) or not all(isinstance(splits.get(split), dict) for split in SPLITS):
        return f"splits must hold {' and '.join(SPLITS)}, got {str(splits)[:60]!r}"
    if not isinstance(manifest["source"], str):
        return "source must be a name"
    return None


class TokenDataset:
    """One split of a built dataset: memory-mapped tokens, document offsets, labels and metadata."""

    def __init__(self, directory: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise MonetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.directory = Path(directory)
        self.split = split
        self.manifest = read_manifest(self.directory)
        rebuild = rebuild_hint(self.directory)
        self.labels: list[str] = list(self.manifest["labels"])
        self.vocab_size: int = int(self.manifest["vocab_size"])
        try:
            self.tokens = np.load(self.directory / f"{split}.tokens", mmap_mode="r", allow_pickle=False)
            self.docs = np.load(self.directory / f"{split}.docs.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:   # EOFError: an empty file
            raise MonetError(f"cannot read the {split} split of {self.directory}: {exc or 'empty file'}; "
                             f"{rebuild}") from exc
        self._check()
        self._meta: list[dict] | None = None

    def _check(self) -> None:
        docs, tokens = self.docs, self.tokens
        problem = None
        if tokens.ndim != 1 or tokens.dtype != token_dtype(self.vocab_size):
            problem = f"tokens have shape {tokens.shape} and dtype {tokens.dtype}"
        elif docs.ndim != 2 or docs.shape[1] != 3 or docs.dtype.kind not in "iu":
            problem = f"document table has shape {docs.shape} and dtype {docs.dtype}, expected integers [n_docs, 3]"
        elif len(docs) and (docs[0, 0] != 0 or docs[-1, 1] != len(tokens) or np.any(docs[1:, 0] != docs[:-1, 1])):
            problem = "document offsets do not cover the token stream"
        elif len(docs) and (docs[:, 2].min() < 0 or docs[:, 2].max() >= len(self.labels)):
            problem = "document label ids are out of range"
        elif len(docs) == 0 and len(tokens):
            problem = "tokens without documents"
        elif len(docs) == 0:
            problem = "the split holds no documents"
        if problem:
            raise MonetError(f"{self.directory} ({self.split}) is corrupt: {problem}; {rebuild_hint(self.directory)}")

    @property
    def num_documents(self) -> int:
        return int(len(self.docs))

    @property
    def num_tokens(self) -> int:
        return int(len(self.tokens))

    def __len__(self) -> int:
        return self.num_documents

    def _index(self, i: int) -> int:
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"document {i} out of range for {self.num_documents} documents")
        return i % self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (a view into the memory map, ``<s>`` ... ``</s>``)."""
        start, end, _ = self.docs[self._index(i)]
        return self.tokens[start:end]

    def document_label(self, i: int) -> str:
        return self.labels[int(self.docs[self._index(i), 2])]

    def document_meta(self, i: int) -> dict:
        """Source, label and extra metadata (e.g. ``headword``, ``score``) of document ``i``."""
        if self._meta is None:
            path = self.directory / f"{self.split}.meta.jsonl"
            try:
                with open(path, encoding="utf-8") as fh:
                    self._meta = [json.loads(line) for line in fh]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise MonetError(f"cannot read {path}: {exc}; {rebuild_hint(self.directory)}") from exc
            if len(self._meta) != self.num_documents:
                raise MonetError(f"{path} has {len(self._meta)} lines for {self.num_documents} documents; rebuild")
        return self._meta[self._index(i)]

    def label_id(self, label: str) -> int:
        """Index of ``label`` in ``labels``; MonetError listing the valid labels otherwise."""
        try:
            return self.labels.index(label)
        except ValueError:
            raise MonetError(f"unknown label {label!r}; this dataset has: {', '.join(self.labels)}") from None

    def documents_with_label(self, label: str) -> np.ndarray:
        """Indices of the documents labelled ``label`` (in stream order)."""
        return np.flatnonzero(self.docs[:, 2] == self.label_id(label))

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.directory)!r}, split={self.split!r}, documents={self.num_documents}, "
            f"tokens={self.num_tokens}, labels={self.labels})"
        )


class PackedSequences(torch.utils.data.Dataset):
    """Fixed-length training windows over the concatenated documents (optionally of one label).

    Window ``i`` is tokens ``[i * seq_len, i * seq_len + seq_len + 1)`` of the stream, so inputs are
    ``x[:-1]`` and targets ``x[1:]``; consecutive windows share one token and together cover the
    stream except for a tail shorter than a window. The order is fixed: the trainer shuffles indices.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, label: str | None = None):
        if seq_len < 1:
            raise MonetError(f"seq_len must be a positive integer, got {seq_len}")
        self.dataset = dataset
        self.seq_len = int(seq_len)
        self.label = label
        self._documents = (np.arange(dataset.num_documents) if label is None
                           else dataset.documents_with_label(label))   # split index of each document here
        spans = dataset.docs[self._documents]
        lengths = spans[:, 1] - spans[:, 0]
        self._starts = spans[:, 0]
        self._labels = spans[:, 2]
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # stream position of each doc
        self.num_tokens = int(self._offsets[-1])
        if self.num_tokens < self.seq_len + 1:
            what = f"label {label!r}" if label else "the dataset"
            raise MonetError(f"{what} has {self.num_tokens} tokens in the {dataset.split} split, fewer than one "
                             f"window of {self.seq_len + 1}; use a shorter seq_len or a larger corpus")

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def _span(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.seq_len
        return start, start + self.seq_len + 1

    def _pieces(self, begin: int, end: int) -> list[tuple[int, int, int]]:
        """(document position, token start, token end) of the stream slice [begin, end)."""
        pieces = []
        pos = int(np.searchsorted(self._offsets, begin, side="right")) - 1
        while begin < end:
            take = min(end, int(self._offsets[pos + 1])) - begin
            start = int(self._starts[pos]) + begin - int(self._offsets[pos])
            pieces.append((pos, start, start + take))
            begin += take
            pos += 1
        return pieces

    def __getitem__(self, i: int) -> torch.Tensor:
        begin, end = self._span(int(i))
        if self.label is None:   # the whole stream: one slice
            window = self.dataset.tokens[begin:end]
        else:
            window = np.concatenate([self.dataset.tokens[s:e] for _, s, e in self._pieces(begin, end)])
        return torch.from_numpy(window.astype(np.int64))

    def document_of(self, i: int) -> int:
        """The document (its index in the split) covering most tokens of window ``i``; the first on a tie.
        Windows cut from one document are correlated: statistics resample documents, not windows."""
        counts: Counter[int] = Counter()
        for pos, start, end in self._pieces(*self._span(i)):
            counts[pos] += end - start
        pos = max(counts, key=lambda k: (counts[k], -k))
        return int(self._documents[pos])

    def label_of(self, i: int) -> str:
        """The label covering most tokens of window ``i``."""
        counts: Counter[int] = Counter()
        for pos, start, end in self._pieces(*self._span(i)):
            counts[int(self._labels[pos])] += end - start
        return self.dataset.labels[max(counts, key=lambda k: (counts[k], -k))]
