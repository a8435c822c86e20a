"""A user's own text as labelled documents: JSONL/JSON, CSV, Parquet, plain text, a folder per label, a
`datasets` dataset saved to disk, or (online) a Hugging Face hub dataset name.

Reading goes through Hugging Face ``datasets`` in streaming mode (rows are produced a file chunk at a
time), so a corpus of any size is read in bounded memory. ``iter_documents`` yields ``Document``s lazily;
``monet.data.build.build_files_corpus`` tokenizes and writes them in chunks. A row's label is the value of
``label_field`` (or, for a folder of label folders, the folder's name); without a label field every
document gets the one label ``UNLABELLED`` and the dataset is marked unlabelled (the atlas then has no
per-label statistics worth reading and ``monet unlearn`` refuses it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monet.data.documents import Document
from monet.errors import MonetError

UNLABELLED = "all"
# file suffix -> datasets builder
FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
SAVED_DATASET = ("dataset_info.json", "state.json", "dataset_dict.json")   # what `save_to_disk` writes


def file_format(path: Path) -> str:
    """The ``datasets`` builder of a file from its suffix (a trailing .gz/.bz2/.xz/.zst is looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    builder = FORMATS.get(suffixes[-1]) if suffixes else None
    if builder is None:
        raise MonetError(f"unknown format of {path}: the files source reads {', '.join(sorted(FORMATS))} "
                         "(optionally compressed), a folder with one subfolder of text files per label, or a "
                         "saved `datasets` directory")
    return builder


def iter_documents(inputs: Iterable[str | Path], text_field: str = "text",
                   label_field: str | None = None) -> Iterator[Document]:
    """Documents of every input in order (empty and whitespace-only texts are skipped)."""
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET):
            yield from _saved_dataset(path, text_field, label_field)
        elif path.is_dir() and _label_folders(path):
            if label_field is not None:
                raise MonetError(f"{path} is a folder of label folders (the folder names are the labels); "
                                 "drop --label-field")
            yield from _label_folder_documents(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise MonetError(f"{path} is an empty folder; pass files, a folder of files, or a folder of "
                                 "label folders")
            for file in files:
                yield from _file_documents(file, text_field, label_field)
        elif path.is_file():
            yield from _file_documents(path, text_field, label_field)
        elif _looks_like_hub_name(str(spec)):
            yield from _hub_documents(str(spec), text_field, label_field)
        else:
            raise MonetError(f"{spec} does not exist (pass files, folders, a saved `datasets` directory or a "
                             "hub dataset name such as `user/name`)")


def _label_folders(path: Path) -> list[Path]:
    """Subfolders of ``path`` when it holds only folders (one per label) and no data files of its own."""
    children = [p for p in path.iterdir() if not p.name.startswith(".")]
    folders = [p for p in children if p.is_dir()]
    return sorted(folders) if folders and len(folders) == len(children) else []


def _label_folder_documents(path: Path) -> Iterator[Document]:
    """One document per text file, labelled with the name of the subfolder it lies in."""
    for folder in _label_folders(path):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue   # a binary or non-UTF-8 file in a label folder is not text
            if text.strip():
                yield Document(text, folder.name, str(file.relative_to(path)))


def _file_documents(path: Path, text_field: str, label_field: str | None) -> Iterator[Document]:
    builder = file_format(path)
    if path.stat().st_size == 0:
        raise MonetError(f"{path} is empty; remove it from --from or fill it")
    from datasets import load_dataset

    options: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    if builder == "csv" and ".tsv" in [s.lower() for s in path.suffixes]:
        options["sep"] = "\t"
    try:
        rows = load_dataset(builder, data_files=str(path), split="train", streaming=True, **options)
    except Exception as exc:  # datasets raises many types for unreadable files
        raise MonetError(f"cannot read {path} as {builder}: {exc}") from exc
    field = "text" if builder == "text" else text_field
    yield from _row_documents(rows, str(path), field, None if builder == "text" else label_field)


def _saved_dataset(path: Path, text_field: str, label_field: str | None) -> Iterator[Document]:
    """Rows of a `Dataset.save_to_disk` directory (every split of a saved DatasetDict, in name order)."""
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:
        raise MonetError(f"cannot load the saved dataset {path}: {exc}") from exc
    parts = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, DatasetDict) else [loaded]
    for part in parts:
        yield from _row_documents(part, str(path), text_field, label_field)


def _looks_like_hub_name(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) <= 2 and all(parts) and not spec.startswith((".", "~")) and Path(spec).suffix == ""


def _hub_documents(name: str, text_field: str, label_field: str | None) -> Iterator[Document]:
    """A hub dataset's train split, streamed (needs the network and the hub's `datasets` scripts-free format)."""
    from datasets import load_dataset

    try:
        rows = load_dataset(name, split="train", streaming=True)
    except Exception as exc:
        raise MonetError(f"{name} is not a local path, and loading it from the Hugging Face hub failed ({exc}); "
                         "check the name and the network, or download it and pass the files") from exc
    yield from _row_documents(rows, name, text_field, label_field)


@contextmanager
def _datasets_quiet() -> Iterator[None]:
    """No log lines from `datasets` inside the block: a malformed file is reported once, by our one-line error
    (its JSON reader logs "Failed to load JSON ..." before raising)."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _row_documents(rows: Iterable[dict], where: str, text_field: str, label_field: str | None) -> Iterator[Document]:
    with _datasets_quiet():
        yield from _checked_rows(rows, where, text_field, label_field)


def _checked_rows(rows: Iterable[dict], where: str, text_field: str, label_field: str | None) -> Iterator[Document]:
    count = 0
    try:
        for index, row in enumerate(rows):
            if index == 0:
                for name, what in ((text_field, "--text-field"), (label_field, "--label-field")):
                    if name is not None and name not in row:
                        raise MonetError(f"{where} has no field {name!r} ({what}); its fields are: "
                                         f"{', '.join(map(str, row)) or 'none'}")
            text = row[text_field]
            if not isinstance(text, str) or not text.strip():
                continue
            label = UNLABELLED
            if label_field is not None:
                value = row[label_field]
                if value is None or str(value).strip() == "":
                    raise MonetError(f"row {index} of {where} has no value in the label field {label_field!r}")
                label = str(value).strip()
            count += 1
            yield Document(text, label, f"{where}:{index}")
    except MonetError:
        raise
    except Exception as exc:  # a malformed row deep in a file surfaces here, from datasets or pyarrow
        raise MonetError(f"cannot read {where}: {exc}") from exc
    if count == 0:
        raise MonetError(f"{where} has no non-empty text in the field {text_field!r}")
