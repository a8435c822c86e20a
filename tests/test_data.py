"""Data: corpus builders on small real inputs, tokenizer, memory-mapped storage, packing, CLI."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from monet.data import (
    Document,
    PackedSequences,
    TokenDataset,
    build_corpus,
    collect_documents,
    content_hash,
    load_tokenizer,
    split_of,
)
from monet.data import domains as domains_module
from monet.data.code import code_documents, discover
from monet.data.documents import MAX_DOCUMENT_BYTES, assign_splits, balance, dedup
from monet.data.domains import entry_senses, read_gcide
from monet.data.languages import chunk_lines, language_documents, read_catalog
from monet.data.storage import read_manifest, token_dtype, write_split
from monet.data.tokenizer import gpt2_tokenizer
from monet.errors import MonetError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRICKY = "def f(x):\n\treturn  x  \t# héllo wörld 日本語 🙂\r\n\n    if a != b:  pass\n\x0b¿Qué?  \u200b end"


# --- small real inputs -------------------------------------------------------------------------------


def _c_headers() -> list[Path]:
    for folder in (sysconfig.get_paths()["include"], "/usr/include"):
        headers = sorted(Path(folder).glob("*.h"))
        if len(headers) >= 5:
            return headers
    pytest.skip("no C headers on this machine (Python headers or /usr/include); install python3-dev")


@pytest.fixture(scope="module")
def data_code_roots(tmp_path_factory) -> dict[str, list[str]]:
    """Real files: some stdlib modules (python) and real C headers, plus a duplicate, a binary, latin-1."""
    root = tmp_path_factory.mktemp("code-inputs")
    py, c = root / "py", root / "c"
    py.mkdir()
    c.mkdir()
    for path in sorted((STDLIB / "json").glob("*.py")) + [STDLIB / "_pydecimal.py", STDLIB / "textwrap.py"]:
        shutil.copy(path, py / path.name)
    shutil.copy(STDLIB / "textwrap.py", py / "textwrap_copy.py")  # exact duplicate
    (py / "binary.py").write_bytes(b"import os\n\0\0\0" + bytes(range(256)) * 4)
    (py / "latin1.py").write_bytes(("# caf\xe9 " * 40 + "\nx = 1\n").encode("latin-1"))
    for path in _c_headers()[:12]:
        shutil.copy(path, c / path.name)
    return {"python": [str(py)], "c": [str(c)]}


@pytest.fixture(scope="module")
def data_code_dir(tmp_path_factory, data_code_roots) -> Path:
    out = tmp_path_factory.mktemp("datasets") / "code"
    return build_corpus(
        "code",
        out,
        max_bytes=400_000,
        vocab_size=600,
        cache_dir=tmp_path_factory.mktemp("cache"),
        source_options={"roots": data_code_roots},
        validation_fraction=0.2,
        progress=False,
    )


# --- shared rules: split, dedup, balance ----------------------------------------------------------------


def test_split_depends_only_on_content():
    texts = [f"document number {i}" for i in range(4000)]
    splits = [split_of(t) for t in texts]
    assert splits == [split_of(t) for t in reversed(texts)][::-1]
    share = splits.count("validation") / len(texts)
    assert 0.03 < share < 0.07
    assert split_of("x", 0.0) == "train" and split_of("x", 1.0) == "validation"


def test_dedup_and_balance_are_order_independent():
    docs = [Document(f"text {i} " * (1 + i % 7), "ab"[i % 2], f"src{k}-{i}") for k in range(4) for i in range(50)]
    unique = dedup(docs)
    assert len({d.text for d in unique}) == len(unique) == 50
    assert all(d.source == min(e.source for e in docs if e.text == d.text) for d in unique)
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert dedup(shuffled) == unique
    kept = balance(unique, budget_bytes=200, seed=0)
    for label in "ab":
        sizes = [len(d.text) for d in kept if d.label == label]
        assert 100 < sum(sizes) <= 200
    assert balance(list(reversed(unique)), 200, seed=0) == kept
    assert balance(unique, 200, seed=1) != kept


def test_every_label_gets_a_validation_document():
    docs = dedup(Document(f"{label} document {i}", label, f"{label}{i}") for label in "xyz" for i in range(30))
    docs += [Document("lonely", "w", "w0")]
    splits = assign_splits(docs, 0.05)
    assert {d.label for d in splits["validation"]} == {"x", "y", "z"}  # "w" has one document: it trains
    assert sorted(d.text for d in splits["train"] + splits["validation"]) == sorted(d.text for d in docs)
    for doc in splits["validation"]:
        rescued = split_of(doc.text, 0.05) == "train"
        assert not rescued or doc.digest == min(d.digest for d in docs if d.label == doc.label)
    shuffled = docs[::-1]
    assert assign_splits(shuffled, 0.05) == splits


# --- code builder ------------------------------------------------------------------------------------


def test_code_builder_reads_real_files(data_code_roots, tmp_path):
    docs = code_documents(10_000_000, cache=tmp_path, roots=data_code_roots, progress=False)
    by_source = {Path(d.source).name: d for d in docs}
    assert {d.label for d in docs} == {"python", "c"}
    assert "binary.py" not in by_source and "latin1.py" not in by_source
    assert ("textwrap.py" in by_source) != ("textwrap_copy.py" in by_source), "exact duplicate kept twice"
    assert by_source["encoder.py"].text == (STDLIB / "json" / "encoder.py").read_text(encoding="utf-8")
    big = by_source["_pydecimal.py"]
    assert big.meta == {"truncated": True} and len(big.text.encode()) <= MAX_DOCUMENT_BYTES
    assert big.text.endswith("\n") and (STDLIB / "_pydecimal.py").read_text().startswith(big.text)
    # Budget: max_bytes / n_labels per language.
    small = code_documents(60_000, cache=tmp_path, roots=data_code_roots, progress=False)
    for label in ("python", "c"):
        sizes = [len(d.text.encode()) for d in small if d.label == label]
        assert sum(sizes) <= 30_000 or len(sizes) == 1


def test_code_discover_rejects_unknown_language(tmp_path):
    with pytest.raises(MonetError, match="unknown code language 'cobol'"):
        discover({"cobol": [str(tmp_path)]})


# --- built dataset -----------------------------------------------------------------------------------


def test_build_is_deterministic(data_code_dir, data_code_roots, tmp_path):
    again = build_corpus(
        "code",
        tmp_path / "again",
        max_bytes=400_000,
        vocab_size=600,
        cache_dir=tmp_path / "cache",
        source_options={"roots": data_code_roots},
        validation_fraction=0.2,
        progress=False,
    )
    names = sorted(p.name for p in data_code_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"manifest.json", "train.tokens", "train.docs.npy", "train.meta.jsonl", "tokenizer.json"} <= set(names)
    assert not [n for n in os.listdir(data_code_dir.parent) if ".tmp-" in n], "temporary build dir left behind"
    for name in names:
        assert (data_code_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_dataset_api(data_code_dir):
    manifest = read_manifest(data_code_dir)
    tokenizer = load_tokenizer(data_code_dir)
    assert manifest["labels"] == ["c", "python"] and manifest["tokenizer"] == "bpe"
    for split in ("train", "validation"):
        ds = TokenDataset(data_code_dir, split=split)
        assert ds.labels == ["c", "python"] and ds.vocab_size == 600
        assert isinstance(ds.tokens, np.memmap) and ds.tokens.dtype == np.uint16
        assert ds.num_documents == manifest["splits"][split]["documents"] > 0
        assert ds.num_tokens == manifest["splits"][split]["tokens"] == int(ds.docs[-1, 1])
        for label in ds.labels:
            idx = ds.documents_with_label(label)
            assert len(idx) == manifest["splits"][split]["labels"][label]["documents"]
            assert all(ds.document_label(i) == label for i in idx)
        for i in range(ds.num_documents):
            ids = ds.document(i)
            assert ids[0] == tokenizer.bos_token_id == 1 and ids[-1] == tokenizer.eos_token_id == 2
            meta = ds.document_meta(i)
            assert meta["label"] == ds.document_label(i)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            assert content_hash(text) == meta["sha256"], "stored tokens do not decode to the document"
            if split_of(text, 0.2) != split:  # only the per-label rescue may move a document
                assert split == "validation" and ds.documents_with_label(meta["label"]).size == 1
            if not meta.get("truncated"):
                assert text == Path(meta["source"]).read_text(encoding="utf-8")


def test_tokenizer_round_trip_and_auto_loading(data_code_dir):
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (data_code_dir / name).is_file()
    tok = AutoTokenizer.from_pretrained(str(data_code_dir), local_files_only=True)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert len(tok) == 600
    for text in (TRICKY, "", " ", "\t\t\n", "x" * 3000, "Ünïcödé → ∑ √ 𝔘"):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_packing_covers_the_stream(data_code_dir):
    ds = TokenDataset(data_code_dir)
    packed = PackedSequences(ds, seq_len=64)
    assert len(packed) == (ds.num_tokens - 1) // 64
    first = packed[0]
    assert isinstance(first, torch.Tensor) and first.dtype == torch.long and first.shape == (65,)
    stream = torch.cat([packed[i][:-1] for i in range(len(packed))] + [packed[len(packed) - 1][-1:]])
    assert torch.equal(stream, torch.from_numpy(ds.tokens[: len(packed) * 64 + 1].astype(np.int64)))
    assert torch.equal(packed[3][1:], PackedSequences(ds, seq_len=64)[3][1:])  # deterministic
    with pytest.raises(IndexError):
        packed[len(packed)]


def test_packing_with_label_filter(data_code_dir):
    ds = TokenDataset(data_code_dir)
    for label in ds.labels:
        packed = PackedSequences(ds, seq_len=32, label=label)
        expected = np.concatenate([ds.document(i) for i in ds.documents_with_label(label)])
        stream = torch.cat([packed[i][:-1] for i in range(len(packed))])
        assert torch.equal(stream, torch.from_numpy(expected[: len(packed) * 32].astype(np.int64)))
        assert {packed.label_of(i) for i in range(len(packed))} == {label}
    mixed = PackedSequences(ds, seq_len=32)
    labels = [mixed.label_of(i) for i in range(len(mixed))]
    assert labels[0] == "c" and labels[-1] == "python" and set(labels) == {"c", "python"}
    with pytest.raises(MonetError, match="fewer than one window"):
        PackedSequences(ds, seq_len=10**8)


def test_token_dtype_and_uint32_storage(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32 and token_dtype(50257) == np.uint16
    counts = write_split(tmp_path, "train", [[1, 70000, 2], [1, 5, 6, 2]], [0, 1], [{}, {}], vocab_size=70001)
    assert counts == {"documents": 2, "tokens": 7}
    tokens = np.load(tmp_path / "train.tokens", mmap_mode="r")
    assert tokens.dtype == np.uint32 and tokens[1] == 70000
    assert np.load(tmp_path / "train.docs.npy").tolist() == [[0, 3, 0], [3, 7, 1]]


# --- bad inputs ---------------------------------------------------------------------------------------


def test_bad_dataset_directories(tmp_path, data_code_dir):
    with pytest.raises(MonetError, match="does not exist.*monet data build"):
        TokenDataset(tmp_path / "missing")
    with pytest.raises(MonetError, match="no manifest.json"):
        TokenDataset(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(data_code_dir, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(MonetError, match="corrupt"):
        TokenDataset(broken)
    manifest = read_manifest(data_code_dir)
    (broken / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(MonetError, match="format version 99"):
        TokenDataset(broken)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    np.save(broken / "train.docs.npy", np.array([[0, 5, 0]], dtype=np.int64))
    with pytest.raises(MonetError, match="do not cover the token stream"):
        TokenDataset(broken)
    with pytest.raises(MonetError, match="unknown split 'test'"):
        TokenDataset(data_code_dir, split="test")


def test_unknown_label_lists_valid_ones(data_code_dir):
    ds = TokenDataset(data_code_dir)
    with pytest.raises(MonetError, match="unknown label 'rust'.*c, python"):
        ds.documents_with_label("rust")
    with pytest.raises(MonetError, match="unknown label"):
        PackedSequences(ds, 16, label="rust")


def test_bad_build_arguments(tmp_path, data_code_dir):
    with pytest.raises(MonetError, match="unknown corpus source 'poetry'.*code, domains, languages, toxicity"):
        build_corpus("poetry", tmp_path / "x")
    with pytest.raises(MonetError, match="unknown tokenizer"):
        build_corpus("code", tmp_path / "x", tokenizer="wordpiece")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("mine")
    with pytest.raises(MonetError, match="not a dataset.*--force"):
        build_corpus("code", tmp_path / "junk")
    assert (tmp_path / "junk" / "file.txt").read_text() == "mine"
    # An existing complete dataset is kept as it is.
    before = (data_code_dir / "train.tokens").stat().st_mtime_ns
    assert build_corpus("code", data_code_dir) == data_code_dir
    assert (data_code_dir / "train.tokens").stat().st_mtime_ns == before


def test_missing_packages_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(domains_module, "GCIDE_DICT", str(tmp_path / "nowhere" / "gcide.dict.dz"))
    with pytest.raises(MonetError, match=r"apt-get install dict-gcide.*--fetch"):
        collect_documents("domains", cache=tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # import now fails as if not installed
    with pytest.raises(MonetError, match=r"pip install 'monet-lm\[toxicity\]'"):
        collect_documents("toxicity", cache=tmp_path / "cache")
    with pytest.raises(MonetError, match="--fetch"):
        gpt2_tokenizer(tmp_path / "cache", fetch=False)


# --- domains (GCIDE format) ---------------------------------------------------------------------------

GCIDE_SAMPLE = """Cabiai \\Cab"i*ai\\ (k[a^]b"[i^]*[imac]), n. [Native South
   American name.] (Zool.)
   The capybara. See {Capybara}.
   [1913 Webster]

"""
GCIDE_NUMBERED = """Abuse \\A*buse"\\, n. [F. abus, L. abusus, fr. abuti. See {Abuse},
   v. t.]
   1. Improper treatment or use; application to a wrong or bad
      purpose; misuse.
      [1913 Webster]

            Liberty may be endangered by the abuses of liberty.
                                                  --Madison.
      [1913 Webster]

   2. (Law) A wrongful act done by a trustee; a breach of trust.
      [1913 Webster]

   {Abuse of distress} (Law), a wrongful using of an animal or
      chattel distrained, by the distrainer.
      [1913 Webster] Abuser
"""


def test_gcide_senses_keep_headword_and_tag():
    (sense,) = list(entry_senses(GCIDE_SAMPLE, 0))
    assert (sense.headword, sense.tag, sense.definition) == ("Cabiai", "Zool.", "The capybara. See Capybara.")
    senses = list(entry_senses(GCIDE_NUMBERED, 7))
    assert [(s.headword, s.tag) for s in senses] == [("Abuse", None), ("Abuse", "Law"), ("Abuse of distress", "Law")]
    assert senses[0].definition == "Improper treatment or use; application to a wrong or bad purpose; misuse."
    assert senses[2].definition.endswith("by the distrainer.") and "Abuser" not in senses[2].definition


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = ""
    while True:
        digits = alphabet[n % 64] + digits
        n //= 64
        if not n:
            return digits


def test_domains_source_reads_dictd_files(tmp_path):
    """A two-entry dictionary in dictd format (index + gzip text) goes through the whole source."""
    entries = [GCIDE_SAMPLE, GCIDE_NUMBERED]
    data, index = b"", []
    for name, entry in zip(("cabiai", "abuse"), entries, strict=True):
        raw = entry.encode()
        index.append(f"{name}\t{_b64(len(data))}\t{_b64(len(raw))}")
        data += raw
    with gzip.open(tmp_path / "gcide.dict.dz", "wb") as fh:
        fh.write(data)
    (tmp_path / "gcide.index").write_text("00-database-info\tA\tB\n" + "\n".join(index) + "\n")
    senses = list(read_gcide(tmp_path / "gcide.dict.dz"))
    assert [s.headword for s in senses] == ["Cabiai", "Abuse", "Abuse", "Abuse of distress"]
    docs = domains_module.domain_documents(10**6, cache=tmp_path, dict_path=tmp_path / "gcide.dict.dz")
    assert sorted((d.label, d.meta["headword"]) for d in docs) == [
        ("law", "Abuse"),
        ("law", "Abuse of distress"),
        ("zoology", "Cabiai"),
    ]
    assert all(d.text == f"{d.meta['headword']}: {d.meta['definition']}" for d in docs)


# --- languages (real gettext catalogues) ----------------------------------------------------------------


def _real_catalogues(count: int = 3) -> dict[str, list[Path]]:
    found = {}
    for lang in ("fr", "de", "es"):
        mos = sorted(Path("/usr/share/locale", lang, "LC_MESSAGES").glob("*.mo"))
        mos = [p for p in mos if (read_catalog(p) or ([], []))[1]][:count]
        if mos:
            found[lang] = mos
    if len(found) < 2:
        pytest.skip("fewer than two languages of gettext catalogues under /usr/share/locale (Debian translations)")
    return found


def test_languages_from_real_catalogues(tmp_path):
    for lang, paths in _real_catalogues().items():
        for path in paths:
            target = tmp_path / "locale" / lang / "LC_MESSAGES"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / path.name)
    (tmp_path / "locale" / "fr" / "LC_MESSAGES" / "broken.mo").write_bytes(b"not a catalogue")
    docs = language_documents(10**7, locale_dir=tmp_path / "locale", languages=("fr", "de", "es"), progress=False)
    assert {d.label for d in docs} >= {"fr", "de"} or {d.label for d in docs} >= {"fr", "es"}
    for doc in docs[:20]:
        assert len(doc.text.encode()) <= 1024 or "\n" not in doc.text
        _, translations = read_catalog(doc.source)
        first = doc.text.split("\n", 1)[0]
        assert first in {" ".join(t.split()) for t in translations}
    assert not [d for d in docs if d.source.endswith("broken.mo")]
    with pytest.raises(MonetError, match="does not exist"):
        language_documents(1000, locale_dir=tmp_path / "none")


def test_chunk_lines_respects_the_size():
    lines = [f"line {i} " * 5 for i in range(200)]
    chunks = list(chunk_lines(lines, 256))
    assert "\n".join(chunks) == "\n".join(lines)
    assert all(len(c.encode()) <= 256 for c in chunks)


# --- toxicity ----------------------------------------------------------------------------------------


def test_toxicity_labels_come_from_the_classifier(tmp_path):
    pytest.importorskip("profanity_check", reason="optional extra monet-lm[toxicity] (alt-profanity-check) absent")
    texts = [
        ("Could not open the file for reading.", "a"),
        ("The printer is out of paper.", "b"),
        ("You are a stupid fucking idiot.", "c"),
        ("Shut up, you worthless piece of shit.", "d"),
    ]
    docs = collect_documents("toxicity", 10**6, cache=tmp_path, source_options={"texts": texts}, progress=False)
    labels = {d.source: (d.label, d.meta["score"]) for d in docs}
    assert labels["a"][0] == labels["b"][0] == "non-toxic" and labels["c"][0] == labels["d"][0] == "toxic"
    assert all(0 <= score <= 1 and (score >= 0.5) == (label == "toxic") for label, score in labels.values())


# --- command line ------------------------------------------------------------------------------------


def test_cli_info_and_existing_build(data_code_dir, capsys):
    from monet.cli import main

    assert main(["data", "info", str(data_code_dir)]) == 0
    out = capsys.readouterr().out
    assert "python" in out and "validation docs" in out and "total" in out
    assert main(["data", "info", str(data_code_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == ["c", "python"]
    assert main(["data", "build", "--source", "code", "--out", str(data_code_dir)]) == 0
    assert "already holds a complete dataset" in capsys.readouterr().out
    assert main(["data", "info", str(data_code_dir / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_missing_package_error(tmp_path, monkeypatch, capsys):
    from monet.cli import main

    monkeypatch.setattr(domains_module, "GCIDE_DICT", str(tmp_path / "nowhere" / "gcide.dict.dz"))
    out = tmp_path / "domains"
    code = main(["data", "build", "--source", "domains", "--out", str(out), "--cache-dir", str(tmp_path), "--quiet"])
    assert code == 2 and "apt-get install dict-gcide" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert main(["data", "build", "--source", "poetry", "--out", str(out)]) == 2   # an invalid choice: usage error
