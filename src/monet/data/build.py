"""Build a labelled, tokenized dataset directory from one corpus source, atomically.

``build_corpus`` collects documents from a source, drops exact duplicates, balances labels with a
byte budget of ``max_bytes / n_labels`` each, splits by content hash, trains (or loads) the
tokenizer on the training split only, and writes everything into ``OUT.tmp-XXXX`` which is renamed
to ``OUT`` at the very end: a failed or interrupted build leaves no half-written dataset.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from monet.data.code import code_documents
from monet.data.documents import VALIDATION_FRACTION, Document, assign_splits, balance, dedup, split_of
from monet.data.domains import domain_documents
from monet.data.files import UNLABELLED, iter_documents
from monet.data.languages import language_documents
from monet.data.lock import corpus_lock_record
from monet.data.packages import cache_dir as default_cache_dir
from monet.data.storage import FORMAT_VERSION, MANIFEST, SPLITS, SplitWriter, read_manifest, token_dtype, write_split
from monet.data.tasks import TASK_SPLITS, checked_manager, iter_task_documents, parse_task_specs
from monet.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    copy_tokenizer,
    document_ids,
    gpt2_tokenizer,
    has_tokenizer,
    load_raw_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)
from monet.data.toxicity import toxicity_documents
from monet.errors import MonetError
from monet.io import check_output, jsonable, output_directory, sha256_file, write_json

Builder = Callable[..., list[Document]]

# source -> (document builder, default max_bytes). Defaults build in seconds on a laptop CPU.
SOURCES: dict[str, tuple[Builder, int]] = {
    "code": (code_documents, 8_000_000),
    "domains": (domain_documents, 4_000_000),
    "languages": (language_documents, 4_000_000),
    "toxicity": (toxicity_documents, 4_000_000),
}
TOKENIZERS = ("bpe", "gpt2")   # or a directory holding a tokenizer (a checkpoint's, a tokenizer's)
ENCODE_BATCH = 512


def check_tokenizer(tokenizer: str) -> None:
    """MonetError unless ``tokenizer`` is bpe, gpt2 or a directory with tokenizer files."""
    if tokenizer in TOKENIZERS:
        return
    path = Path(tokenizer).expanduser()
    if not path.exists():
        raise MonetError(f"unknown tokenizer {tokenizer!r}: choose bpe, gpt2 or an existing directory (a checkpoint or "
                         "tokenizer directory with tokenizer.json or tokenizer.model)")
    if not has_tokenizer(path):
        raise MonetError(f"{path} holds no tokenizer.json or tokenizer.model; pass a checkpoint or tokenizer directory")


def check_source(source: str) -> Builder:
    if source not in SOURCES:
        raise MonetError(f"unknown corpus source {source!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[source][0]


def collect_documents(
    source: str, max_bytes: int | None = None, seed: int = 0, *, cache: Path | None = None, fetch: bool = False,
    source_options: dict | None = None, progress: bool = True,
) -> list[Document]:
    """Deduplicated, label-balanced documents of a source (before the split)."""
    builder = check_source(source)
    max_bytes = SOURCES[source][1] if max_bytes is None else int(max_bytes)
    if max_bytes <= 0:
        raise MonetError(f"max_bytes must be positive, got {max_bytes}")
    cache = default_cache_dir(cache)
    documents = builder(max_bytes, seed, cache=cache, fetch=fetch, progress=progress, **(source_options or {}))
    documents = dedup(d for d in documents if d.text.strip())
    labels = sorted({d.label for d in documents})
    if len(labels) < 2:
        raise MonetError(f"the {source} source gave {len(labels)} label(s) ({', '.join(labels) or 'none'}); at "
                         "least 2 are needed. Install the packages it reads (see docs/data.md) or rerun with --fetch")
    return balance(documents, max(1, max_bytes // len(labels)), seed)


def _encode(tokenizer_dir: Path, texts: list[str], progress: bool) -> tuple[list[list[int]], int, int]:
    """Token ids of ``<s> text </s>`` for each text, plus the bos and eos ids."""
    raw = load_raw_tokenizer(tokenizer_dir)
    bos, eos = raw.token_to_id("<s>"), raw.token_to_id("</s>")
    if bos is None or eos is None:  # GPT-2 vocabulary: one special token for both
        bos = eos = raw.token_to_id("<|endoftext|>")
    out: list[list[int]] = []
    with tqdm(total=len(texts), unit="doc", desc="tokenize", disable=not progress) as bar:
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = raw.encode_batch(texts[start : start + ENCODE_BATCH], add_special_tokens=False)
            out.extend([bos, *enc.ids, eos] for enc in batch)
            bar.update(len(batch))
    return out, bos, eos


def check_fits_model(tokenizer: str, vocab: int) -> None:
    """When --tokenizer is a checkpoint directory: MonetError if its tokenizer has more tokens than the model's
    embedding (the ids past the embedding would index nothing)."""
    if tokenizer in TOKENIZERS:
        return
    config = Path(tokenizer).expanduser() / "config.json"
    try:
        model_vocab = int(json.loads(config.read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return   # a tokenizer directory, not a checkpoint: nothing to compare with
    if vocab > model_vocab:
        raise MonetError(f"the tokenizer in {config.parent} has {vocab} tokens but the model's embedding has "
                         f"{model_vocab}: it is not this model's tokenizer")


def _encode_with(tokenizer, texts: list[str], progress: bool) -> tuple[list[list[int]], int | None, int]:
    """`document_ids` of every text, in batches, with a progress bar."""
    out: list[list[int]] = []
    bos = eos = None
    with tqdm(total=len(texts), unit="doc", desc="tokenize", disable=not progress) as bar:
        for start in range(0, len(texts), ENCODE_BATCH):
            ids, bos, eos = document_ids(tokenizer, texts[start : start + ENCODE_BATCH])
            out.extend(ids)
            bar.update(len(ids))
    return out, bos, (eos if eos is not None else tokenizer.eos_token_id)


def tokenizer_name(tokenizer: str) -> str:
    """What the manifest records as the tokenizer: bpe, gpt2, or the directory it came from."""
    return tokenizer if tokenizer in TOKENIZERS else str(Path(tokenizer).expanduser().resolve())


def _label_counts(documents: list[Document], token_lists: list[list[int]], labels: list[str]) -> dict:
    counts = {label: {"documents": 0, "tokens": 0, "bytes": 0} for label in labels}
    for doc, ids in zip(documents, token_lists, strict=True):
        entry = counts[doc.label]
        entry["documents"] += 1
        entry["tokens"] += len(ids)
        entry["bytes"] += len(doc.text.encode("utf-8"))
    return counts


def build_corpus(
    source: str, out_dir: str | Path, max_bytes: int | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer: str = "bpe", seed: int = 0, fetch: bool = False, *, cache_dir: str | Path | None = None,
    force: bool = False, validation_fraction: float = VALIDATION_FRACTION, source_options: dict | None = None,
    progress: bool = True, allow_drift: bool = False,
) -> Path:
    """Build dataset ``out_dir`` from ``source`` (code, domains, languages, toxicity); returns its path.

    An existing complete dataset is returned untouched unless ``force``. ``source_options`` are
    passed to the source's builder (e.g. ``roots`` for code, ``dict_path`` for domains,
    ``locale_dir``/``languages`` for languages, ``texts`` for toxicity).
    """
    check_source(source)
    check_tokenizer(tokenizer)
    if tokenizer == "bpe" and vocab_size < 512:
        raise MonetError(f"vocab size {vocab_size} is too small for a byte-level BPE; use at least 512")
    if not 0 < validation_fraction < 1:
        raise MonetError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    out = Path(out_dir).expanduser()
    if (out / MANIFEST).is_file() and not force:
        read_manifest(out)  # a corrupt manifest is an error, not "already built"
        return out
    check_output(out, "data build", force, "a dataset")   # before any download or reading
    cache = default_cache_dir(cache_dir)
    documents = collect_documents(source, max_bytes, seed, cache=cache, fetch=fetch, source_options=source_options,
                                  progress=progress)
    # The default code corpus must match its committed lock (monet.data.lock), unless allow_drift.
    lock = corpus_lock_record(source, documents, SOURCES[source][1] if max_bytes is None else int(max_bytes), seed,
                              source_options, allow_drift)
    by_split = assign_splits(documents, validation_fraction)
    if not by_split["train"] or not by_split["validation"]:
        raise MonetError(f"only {len(documents)} documents: both splits need at least one; "
                         "raise --max-bytes or add inputs")
    labels = sorted({d.label for d in documents})
    wanted = set((source_options or {}).get("languages") or labels)
    lacking = sorted(wanted - {d.label for d in by_split["train"]})
    if lacking:   # a label without training text would be evaluated but never learned
        raise MonetError(f"no training documents for {', '.join(lacking)} within the byte budget; raise --max-bytes "
                         "or leave those labels out")

    with output_directory(out, "data build", force, "a dataset") as tmp:
        if tokenizer not in TOKENIZERS:   # a checkpoint's or tokenizer's directory: its files, as they are
            copy_tokenizer(Path(tokenizer).expanduser(), tmp)
            actual_vocab = len(load_tokenizer(tmp))
            check_fits_model(tokenizer, actual_vocab)
        elif tokenizer == "bpe":
            model = train_bpe((d.text for d in by_split["train"]), vocab_size)
        else:
            model = gpt2_tokenizer(cache, fetch)
        if tokenizer in TOKENIZERS:
            save_tokenizer(model, tmp, kind=tokenizer)
            actual_vocab = model.get_vocab_size()
        splits = {}
        special = {}
        for split in SPLITS:
            docs = by_split[split]
            if tokenizer in TOKENIZERS:
                ids, bos, eos = _encode(tmp, [d.text for d in docs], progress)
            else:
                ids, bos, eos = _encode_with(load_tokenizer(tmp), [d.text for d in docs], progress)
            special = {"bos_id": bos, "eos_id": eos}
            metas = [{"source": d.source, "label": d.label, "sha256": d.digest, **d.meta} for d in docs]
            counts = write_split(tmp, split, ids, [labels.index(d.label) for d in docs], metas, actual_vocab)
            splits[split] = {**counts, "labels": _label_counts(docs, ids, labels)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "labels": labels,
            "vocab_size": actual_vocab,
            "tokenizer": tokenizer_name(tokenizer),
            "tokenizer_sha256": sha256_file(tmp / "tokenizer.json"),   # checked against models that use this data
            "special_tokens": special,
            "dtype": token_dtype(actual_vocab).name,
            "splits": splits,
            "provenance": provenance(documents),
            **({"lock": lock, "lock_sha256": lock["lock_sha256"]} if lock else {}),
            "options": {
                "max_bytes": SOURCES[source][1] if max_bytes is None else int(max_bytes),
                "vocab_size": vocab_size,
                "tokenizer": tokenizer,
                "seed": seed,
                "fetch": fetch,
                "validation_fraction": validation_fraction,
                "source_options": jsonable(dict(sorted((source_options or {}).items()))),
            },
        }
        write_json(tmp / MANIFEST, manifest)
    return out


def build_files_corpus(
    inputs: list[str], out_dir: str | Path, tokenizer: str, *, text_field: str = "text", label_field: str | None = None,
    max_bytes: int | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0, fetch: bool = False,
    cache_dir: str | Path | None = None, force: bool = False, validation_fraction: float = VALIDATION_FRACTION,
    progress: bool = True,
) -> Path:
    """Build dataset ``out_dir`` from a user's files (``monet.data.files``); see ``build_streamed_corpus``."""
    if not inputs:
        raise MonetError("--source files needs --from PATH [PATH ...] (files, folders or a saved datasets directory)")
    return build_streamed_corpus(
        lambda: iter_documents(inputs, text_field, label_field), out_dir, tokenizer, source="files",
        labelled=label_field is not None or None, where=", ".join(map(str, inputs)),
        options={"inputs": [str(p) for p in inputs], "text_field": text_field, "label_field": label_field},
        max_bytes=max_bytes, vocab_size=vocab_size, seed=seed, fetch=fetch, cache_dir=cache_dir, force=force,
        validation_fraction=validation_fraction, progress=progress)


def build_task_corpus(
    specs: list[str], out_dir: str | Path, tokenizer: str, *, include_path: str | Path | None = None,
    split: str = "validation", max_bytes: int | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0,
    fetch: bool = False, cache_dir: str | Path | None = None, force: bool = False,
    validation_fraction: float = VALIDATION_FRACTION, progress: bool = True,
) -> Path:
    """Build dataset ``out_dir`` from lm-eval tasks' documents (``monet.data.tasks``): LABEL=TASK specs, each
    task's `split` documents as prompt + gold answer, labelled LABEL. Task names are checked before anything
    is read or written (an unknown task is one clear line)."""
    if split not in TASK_SPLITS:
        raise MonetError(f"--lm-eval-split must be one of {', '.join(TASK_SPLITS)}, got {split!r}")
    task_specs = parse_task_specs(specs, option="--task")
    check_tokenizer(tokenizer)
    manager = checked_manager([t for tasks in task_specs.values() for t in tasks], include_path)
    return build_streamed_corpus(
        lambda: iter_task_documents(task_specs, manager, split), out_dir, tokenizer, source="lm-eval",
        labelled=True, where="the lm-eval tasks " + ", ".join(t for tasks in task_specs.values() for t in tasks),
        options={"tasks": task_specs, "lm_eval_include_path": str(include_path) if include_path else None,
                 "lm_eval_split": split},
        max_bytes=max_bytes, vocab_size=vocab_size, seed=seed, fetch=fetch, cache_dir=cache_dir, force=force,
        validation_fraction=validation_fraction, progress=progress)


def build_streamed_corpus(
    read: Callable[[], Iterator[Document]], out_dir: str | Path, tokenizer: str, *, source: str,
    labelled: bool | None, where: str, options: dict, max_bytes: int | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0, fetch: bool = False, cache_dir: str | Path | None = None,
    force: bool = False, validation_fraction: float = VALIDATION_FRACTION, progress: bool = True,
) -> Path:
    """Build dataset ``out_dir`` from the documents ``read()`` yields, streaming: documents are read,
    tokenized and written ``ENCODE_BATCH`` at a time, so memory does not grow with the corpus.

    Unlike the built-in sources, documents are kept as they come (no label balancing, no dedup: an exact
    duplicate lands in the same split as its twin, so no text leaks from train into validation); the split is
    the same content hash. ``max_bytes`` stops reading after that much text. ``tokenizer`` bpe trains on a
    first pass over the training split (``read`` is called twice). ``labelled`` None: labelled unless every
    document has the one label ``UNLABELLED``.
    """
    check_tokenizer(tokenizer)
    if tokenizer == "bpe" and vocab_size < 512:
        raise MonetError(f"vocab size {vocab_size} is too small for a byte-level BPE; use at least 512")
    if not 0 < validation_fraction < 1:
        raise MonetError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise MonetError(f"max_bytes must be positive, got {max_bytes}")
    out = Path(out_dir).expanduser()
    if (out / MANIFEST).is_file() and not force:
        read_manifest(out)
        return out
    check_output(out, "data build", force, "a dataset")

    def documents():
        used = 0
        for doc in read():
            used += len(doc.text.encode("utf-8"))
            if max_bytes is not None and used > max_bytes and used > len(doc.text.encode("utf-8")):
                return
            yield doc

    with output_directory(out, "data build", force, "a dataset") as tmp:
        if tokenizer not in TOKENIZERS:
            copy_tokenizer(Path(tokenizer).expanduser(), tmp)
        else:
            if tokenizer == "bpe":
                train_texts = (d.text for d in documents() if split_of(d.text, validation_fraction) == "train")
                model = train_bpe(train_texts, vocab_size)
            else:
                model = gpt2_tokenizer(default_cache_dir(cache_dir), fetch)
            save_tokenizer(model, tmp, kind=tokenizer)
        encoder = load_tokenizer(tmp)
        vocab = len(encoder)
        check_fits_model(tokenizer, vocab)
        writers = {split: SplitWriter(tmp, split, vocab) for split in SPLITS}
        label_ids: dict[str, int] = {}   # label -> id in order of first appearance
        counts: dict[str, dict[str, dict[str, int]]] = {split: {} for split in SPLITS}
        bos = eos = None
        total = {"documents": 0, "bytes": 0}

        def flush(batch: list) -> None:
            nonlocal bos, eos
            ids, bos, eos = document_ids(encoder, [d.text for d in batch])
            for doc, doc_ids in zip(batch, ids, strict=True):
                split = split_of(doc.text, validation_fraction)
                label = label_ids.setdefault(doc.label, len(label_ids))
                size = len(doc.text.encode("utf-8"))
                writers[split].add(doc_ids, label, {"source": doc.source, "label": doc.label, "sha256": doc.digest})
                entry = counts[split].setdefault(doc.label, {"documents": 0, "tokens": 0, "bytes": 0})
                entry["documents"] += 1
                entry["tokens"] += len(doc_ids)
                entry["bytes"] += size
                total["documents"] += 1
                total["bytes"] += size

        batch: list = []
        with tqdm(unit="doc", desc="read + tokenize", disable=not progress) as bar:
            for doc in documents():
                batch.append(doc)
                if len(batch) == ENCODE_BATCH:
                    flush(batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                flush(batch)
                bar.update(len(batch))
        if total["documents"] == 0:
            raise MonetError(f"no documents with text in {where}")
        empty = [split for split in SPLITS if writers[split].documents == 0]
        if empty:
            raise MonetError(f"only {total['documents']} documents and the {empty[0]} split got none; add text or "
                             "change --validation-fraction")
        labels = sorted(label_ids)
        order = [labels.index(label) for label in sorted(label_ids, key=label_ids.__getitem__)]
        splits = {}
        for split in SPLITS:
            info = writers[split].close(order)
            splits[split] = {**info, "labels": {label: counts[split].get(label, {"documents": 0, "tokens": 0,
                                                                                 "bytes": 0}) for label in labels}}
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "labels": labels,
            "labelled": labelled if labelled is not None else labels != [UNLABELLED],
            "vocab_size": vocab,
            "tokenizer": tokenizer_name(tokenizer),
            "tokenizer_sha256": sha256_file(tmp / "tokenizer.json"),
            "special_tokens": {"bos_id": bos, "eos_id": eos},
            "dtype": token_dtype(vocab).name,
            "splits": splits,
            "provenance": [],
            "options": {**options, "max_bytes": max_bytes, "vocab_size": vocab_size,
                        "tokenizer": tokenizer_name(tokenizer), "seed": seed, "fetch": fetch,
                        "validation_fraction": validation_fraction,
                        "documents": total["documents"], "bytes": total["bytes"]},
        }
        write_json(tmp / MANIFEST, manifest)
    return out


def provenance(documents: list[Document]) -> list[dict]:
    """Where the documents come from: one row per (package, version, licence) with its labels, documents
    and bytes; documents whose builder records no package (meta "package") are left out."""
    rows: dict[tuple[str, str, str], dict] = {}
    for doc in documents:
        if "package" not in doc.meta:
            continue
        key = (str(doc.meta["package"]), str(doc.meta.get("version", "")), str(doc.meta.get("license", "")))
        row = rows.setdefault(key, {"package": key[0], "version": key[1], "license": key[2], "labels": [],
                                    "documents": 0, "bytes": 0})
        if doc.label not in row["labels"]:
            row["labels"].append(doc.label)
        row["documents"] += 1
        row["bytes"] += len(doc.text.encode("utf-8"))
    return [rows[key] for key in sorted(rows)]


def format_table(manifest: dict) -> str:
    """Documents and tokens per label and split, as an aligned text table."""
    header = ["label"] + [f"{split} {what}" for split in SPLITS for what in ("docs", "tokens")]
    rows = []
    for label in manifest["labels"] + ["total"]:
        row = [label]
        for split in SPLITS:
            info = manifest["splits"].get(split, {})
            entry = info if label == "total" else info.get("labels", {}).get(label, {})
            row += [f"{entry.get('documents', 0):,}", f"{entry.get('tokens', 0):,}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    title = (f"source {manifest['source']} · tokenizer {manifest.get('tokenizer', '?')} · "
             f"vocab {manifest['vocab_size']:,} · {len(manifest['labels'])} labels")
    rule = "-" * len(line(header))
    return "\n".join([title, line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])])
