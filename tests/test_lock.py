"""The code corpus lock (issue 23, item 1): the same documents, or a refusal naming what moved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import monet.data.lock as lock_module
from monet.data import build_corpus, read_manifest
from monet.data.documents import Document
from monet.data.lock import LOCK_PATH, check_lock, corpus_entry, entry_hash, find_entry, read_lock, write_lock
from monet.errors import MonetError


def _doc(text: str, label: str, package: str, version: str) -> Document:
    return Document(text=text, label=label, source=f"/somewhere/{text[:8]}",
                    meta={"package": package, "version": version, "license": "MIT"})


DOCS = [_doc("int main(void) { return 0; }", "c", "glibc-source", "2.36-9+deb12u14"),
        _doc("void f(void) {}", "c", "glibc-source", "2.36-9+deb12u14"),
        _doc("print('hello')", "python", "python-stdlib", "3.11.7")]


def test_lock_round_trip_and_drift(tmp_path: Path) -> None:
    path = tmp_path / "lock.json"
    entry = corpus_entry(DOCS, "code", 1000, 0, ["python", "c"])
    assert entry["languages"] == ["c", "python"] and entry["documents"] == 3
    assert [row["documents"] for row in entry["packages"]] == [2, 1]
    write_lock([entry], path)
    assert find_entry(read_lock(path), "code", 1000, 0, ["c", "python"]) == entry
    ok = check_lock(list(reversed(DOCS)), "code", 1000, 0, ["c", "python"], path=path)   # order does not matter
    assert ok["status"] == "verified" and ok["lock_sha256"] == entry_hash(entry) and ok["moved"] == []
    # Same paths elsewhere: the lock is on content, not on where the cache lives.
    moved_paths = [Document(d.text, d.label, "/other/machine" + d.source, d.meta) for d in DOCS]
    assert check_lock(moved_paths, "code", 1000, 0, ["c", "python"], path=path)["status"] == "verified"
    # An upstream patch: python's stdlib moved (new version, one file changed).
    patched = DOCS[:2] + [_doc("print('hello, world')", "python", "python-stdlib", "3.11.9")]
    with pytest.raises(MonetError, match=r"python-stdlib 3\.11\.7 -> 3\.11\.9 \(documents differ\).*--allow-drift"):
        check_lock(patched, "code", 1000, 0, ["c", "python"], path=path)
    allowed = check_lock(patched, "code", 1000, 0, ["c", "python"], allow_drift=True, path=path)
    assert allowed["status"] == "drift allowed"
    assert allowed["moved"] == ["python-stdlib 3.11.7 -> 3.11.9 (documents differ)"]
    # Same version, different bytes (Debian rebuilt it), and a package that vanished.
    with pytest.raises(MonetError, match=r"glibc-source 2\.36-9\+deb12u14 \(documents differ, 2 -> 1 documents\)"):
        check_lock(DOCS[1:], "code", 1000, 0, ["c", "python"], path=path)
    with pytest.raises(MonetError, match="python-stdlib is missing"):
        check_lock(DOCS[:2], "code", 1000, 0, ["c", "python"], path=path)
    # Another budget, seed or language set is not locked; explicit roots never are.
    assert check_lock(DOCS, "code", 2000, 0, ["c", "python"], path=path)["status"] == "unlocked"
    assert check_lock(DOCS, "code", 1000, 0, None, path=path)["status"] == "unlocked"


def test_committed_lock_covers_the_demo_corpus() -> None:
    entries = read_lock(LOCK_PATH)
    demo = find_entry(entries, "code", 4_800_000, 0, ["c", "go", "javascript", "lua", "php", "python", "ruby", "rust"])
    assert demo is not None and demo["documents"] > 1000
    assert {label for row in demo["packages"] for label in row["labels"]} == set(demo["languages"])
    assert all(row["version"] not in ("", "?", "unknown", "system") for row in demo["packages"])


def test_build_refuses_a_drifted_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """build_corpus checks the lock: a corpus whose packages moved is refused (nothing written) unless
    allow_drift, and the manifest records the lock's hash and status."""
    options = {"languages": ["python", "shell"]}
    from monet.data import collect_documents

    documents = collect_documents("code", 60_000, 0, source_options=options, progress=False)
    entry = corpus_entry(documents, "code", 60_000, 0, ["python", "shell"])
    lock = tmp_path / "lock.json"
    write_lock([entry], lock)
    monkeypatch.setattr(lock_module, "LOCK_PATH", lock)
    build = dict(max_bytes=60_000, vocab_size=512, source_options=options, progress=False)
    manifest = read_manifest(build_corpus("code", tmp_path / "ok", **build))
    assert manifest["lock"]["status"] == "verified" and manifest["lock_sha256"] == entry_hash(entry)
    stale = json.loads(lock.read_text())
    stale["corpora"][0]["packages"][0]["version"] = "0.0-locked"
    lock.write_text(json.dumps(stale))
    with pytest.raises(MonetError, match="0.0-locked -> "):
        build_corpus("code", tmp_path / "drifted", **build)
    assert not (tmp_path / "drifted").exists()
    manifest = read_manifest(build_corpus("code", tmp_path / "allowed", allow_drift=True, **build))
    assert manifest["lock"]["status"] == "drift allowed" and manifest["lock"]["moved"]
