"""`monet autointerp`: sampling, the deterministic judge, metrics, the random control at chance, pluggable
explainers and judges (a fake OpenAI-compatible server on 127.0.0.1; nothing leaves the machine)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from atlas_fixtures import atlas_of, corpus, save_run, tiny_config

from monet.cli import main
from monet.errors import MonetError
from monet.interp.atlas import AtlasOptions
from monet.interp.autointerp import (
    Example,
    OverlapJudge,
    classification,
    explain_all,
    explanation_terms,
    fuzzing_examples,
    held_out_activating,
    parse_answers,
    sample_experts,
    top_tokens_explanation,
)
from monet.settings import AutointerpSettings

OPTIONS = AtlasOptions(max_tokens=4000, top_k=5, split="validation", batch_size=8, seq_len=32, samples=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp()
    data = corpus(base)
    work = tmp_path_factory.mktemp("autointerp")
    run = save_run(work / "run", tiny_config(), data, seed=0)
    return {"data": data, "run": run, "atlas": atlas_of(run, data, work / "atlas", OPTIONS), "work": work}


# ------------------------------------------------------------------------------------------ pieces

def test_sample_experts_is_stratified_by_density_and_seeded():
    counts = np.concatenate([np.full(900, 25), np.full(100, 5000), np.zeros(50, np.int64)])
    chosen = sample_experts(counts, 100, strata=2, min_count=20, seed=0)
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
    assert (counts[chosen] >= 20).all()
    # two log-density bins: the rare and the busy experts give 50 each, although 90% of the eligible
    # experts are rare
    assert (counts[chosen] == 5000).sum() == 50
    assert np.array_equal(chosen, sample_experts(counts, 100, strata=2, min_count=20, seed=0))
    assert not np.array_equal(chosen, sample_experts(counts, 100, strata=2, min_count=20, seed=1))
    assert len(sample_experts(counts, 10_000, strata=2, min_count=20, seed=0)) == 1000


def test_explanation_terms_and_the_overlap_judge():
    top = [{"pieces": ["a", " def", "x"], "target": 1}, {"pieces": [" def"], "target": 0},
           {"pieces": ["\n", "y"], "target": 0}]
    text = top_tokens_explanation(top, 5)
    assert text == 'tokens " def", "\\n"'
    assert {" def", "def", "\n"} <= explanation_terms(text)
    assert explanation_terms("Python import statements") == {"python", "import", "statements"}
    judge = OverlapJudge()
    hit, miss = Example(["x", " Def", "y"], [0, 1, 0], True), Example(["x", "y"], [0, 0], False)
    assert judge(text, [hit, miss], "detection") == [True, False]
    hit.marked, wrong = [1], Example(["x", " def"], [1, 0], True, marked=[0])
    assert judge(text, [hit, wrong], "fuzzing") == [True, False]


def test_classification_metrics():
    m = classification([True, True, False, False], [True, False, False, False])
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (1, 1, 2, 0)
    assert m["balanced_accuracy"] == pytest.approx(0.75) and m["precision"] == 1.0 and m["f1"] == pytest.approx(2 / 3)
    assert classification([True], [True])["balanced_accuracy"] is None   # no negatives: undefined


def test_weighted_classification_and_band_weights():
    # weights count examples in proportion: a miss of weight 3 outweighs a hit of weight 1
    m = classification([True, True, False], [True, False, False], weights=[1.0, 3.0, 1.0])
    assert m["recall"] == pytest.approx(0.25) and m["balanced_accuracy"] == pytest.approx(0.625)
    assert (m["n_pos"], m["n_neg"]) == (2, 1)
    assert classification([True, False], [True, True], [2.0, 1.0]) == {**classification([True, False], [True, True]),
                                                                      "tp": 2.0, "fp": 1.0, "tn": 0.0, "fn": 0.0,
                                                                      "precision": pytest.approx(2 / 3),
                                                                      "f1": pytest.approx(0.8)}

    class FakeAtlas:   # band 9 holds 90 % of the activations, band 2 10 %; 3 samples each
        def band_samples(self, group, expert):
            def ctx(n):
                return {"doc": n, "pos": 0, "pieces": ["a"], "tokens": [1], "values": [1.0], "target": 0,
                        "percent": 1.0}
            return [{"band": 9, "share": 0.9, "contexts": [ctx(n) for n in range(3)]},
                    {"band": 2, "share": 0.1, "contexts": [ctx(n) for n in range(3, 6)]}]

    examples = held_out_activating(FakeAtlas(), 0, 0, top=[], limit=100)
    weights = {ex.band: ex.weight for ex in examples}
    assert len(examples) == 6 and np.mean([ex.weight for ex in examples]) == pytest.approx(1.0)
    assert weights[9] / weights[2] == pytest.approx(9.0)
    assert fuzzing_examples(examples, np.random.default_rng(0))[0].weight == examples[0].weight


def test_fuzzing_marks_true_and_wrong_tokens():
    examples = [Example(list("abcdef"), [0, 0.1, 1.0, 0.5, 0, 0], True) for _ in range(4)]
    fuzz = fuzzing_examples(examples, np.random.default_rng(0))
    assert [ex.activating for ex in fuzz] == [True, False, True, False]
    assert fuzz[0].marked == [2, 3]                      # >= 0.3 of the context's maximum
    assert len(fuzz[1].marked) == 2 and not set(fuzz[1].marked) & {2, 3}


def test_parse_answers():
    assert parse_answers("Sure: [1, 0, 1]", 3) == [True, False, True]
    assert parse_answers("[1, 0]", 3) is None and parse_answers("yes", 1) is None


def test_random_control_is_a_derangement():
    class Cmd:
        top_tokens, sources, seed = 3, ("top_tokens", "random"), 0

    experts = np.arange(20)
    tops = {e: [{"pieces": [f"t{e}"], "target": 0}] for e in range(20)}
    out = explain_all(None, 0, experts, tops, Cmd, None, None)
    assert sorted(out["random"].values()) == sorted(out["top_tokens"].values())
    assert all(out["random"][e] != out["top_tokens"][e] for e in range(20))


def test_settings_refuse_missing_models():
    with pytest.raises(MonetError, match="--chat-model"):
        AutointerpSettings(atlas="A", out="O", sources=("self",))
    with pytest.raises(MonetError, match="--embedder"):
        AutointerpSettings(atlas="A", out="O", scorers=("embedding",))
    with pytest.raises(MonetError, match="--sources takes"):
        AutointerpSettings(atlas="A", out="O", sources=("gpt",))


# -------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_end_to_end_control_at_chance_and_top_tokens_above_it(setup, tmp_path, capsys):
    out = tmp_path / "ai"
    assert main(["autointerp", str(setup["atlas"]), "--out", str(out), "--run", str(setup["run"]),
                 "--experts", "60", "--pool", "300", "--bootstrap", "300", "--device", "cpu"]) == 0
    assert "minus random" in capsys.readouterr().out
    for name in ("scores.parquet", "explanations.parquet", "summary.json", "summary.md", "histogram.png"):
        assert (out / name).is_file(), name
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    assert {(r["source"], r["scorer"]) for r in rows} == {(s, c) for s in ("top_tokens", "random")
                                                          for c in ("detection", "fuzzing")}
    assert all(r["n_pos"] > 0 for r in rows) and all(r["n_neg"] > 0 for r in rows if r["scorer"] == "detection")
    report = json.loads((out / "summary.json").read_text())
    summary = {(e["group"], e["source"], e["scorer"]): e for e in report["summary"]}
    for scorer in ("detection", "fuzzing"):
        control, top = summary[("all", "random", scorer)], summary[("all", "top_tokens", scorer)]
        low, high = control["balanced_accuracy_ci95"]
        assert low <= 0.5 <= high, (scorer, control)                 # the control scores at chance
        assert top["minus_random_ci95"][0] > 0, (scorer, top)        # top tokens beat it, interval excludes 0
        assert top["balanced_accuracy_ci95"][0] > high, (scorer, top)
    assert (out / "histogram.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_dense_neurons_end_to_end(setup, tmp_path):
    """The dense row: a dense model's atlas (MLP neurons, a group per layer, through `units_of`) goes through the
    same sampling, explanations and judge; the random control scores at chance."""
    run = save_run(tmp_path / "dense-run", tiny_config(mlp_type="dense"), setup["data"], seed=0)
    atlas = atlas_of(run, setup["data"], tmp_path / "dense-atlas", OPTIONS)
    out = tmp_path / "ai"
    # an untrained dense model's neurons are positive on about half the tokens: a 17-token window where one
    # stays under 1 % of its maximum is rare, so "quiet" is 10 % here (the demo's trained model needs no change)
    assert main(["autointerp", str(atlas), "--out", str(out), "--run", str(run), "--experts", "40", "--pool", "300",
                 "--quiet", "0.1", "--bootstrap", "300", "--device", "cpu"]) == 0
    report = json.loads((out / "summary.json").read_text())
    assert report["kind"] == "dense" and report["groups"] == [0, 1, 2, 3]     # one group per layer
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    assert {r["group"] for r in rows} == {0, 1, 2, 3}
    assert {(r["source"], r["scorer"]) for r in rows} == {(s, c) for s in ("top_tokens", "random")
                                                          for c in ("detection", "fuzzing")}
    assert all(r["expert"] < 64 for r in rows)                                # intermediate_size of `tiny`
    detection = [r for r in rows if r["scorer"] == "detection"]
    assert sum(r["n_neg"] > 0 for r in detection) >= 0.9 * len(detection)
    summary = {(e["group"], e["source"], e["scorer"]): e for e in report["summary"]}
    for scorer in ("detection", "fuzzing"):
        low, high = summary[("all", "random", scorer)]["balanced_accuracy_ci95"]
        assert low <= 0.5 <= high, scorer                                     # the control scores at chance
    assert summary[("all", "top_tokens", "fuzzing")]["minus_random_ci95"][0] > 0
    for name in ("explanations.parquet", "histogram.png"):
        assert (out / name).is_file(), name
    assert "| layer | source |" in (out / "summary.md").read_text()


def test_quiet_windows_are_full_width(setup):
    """Non-activating windows all have `width` tokens: short documents and tails are skipped (a shorter window
    is likelier quiet and holds fewer terms, which would favour every explanation, the control's too)."""
    from types import SimpleNamespace

    from monet.checkpoint import load_checkpoint
    from monet.interp.autointerp import quiet_pool

    model, _ = load_checkpoint(setup["run"], "cpu")
    lengths = [5, 40, 3, 12, 70, 9, 16, 2] * 4                  # mostly shorter than 17 tokens
    bounds = np.cumsum([0, *lengths])
    tokens = np.random.default_rng(0).integers(1, 500, bounds[-1])
    dataset = SimpleNamespace(docs=np.stack([bounds[:-1], bounds[1:]], 1),
                              document=lambda d: tokens[bounds[d]:bounds[d + 1]])

    def atlas(seq_len):
        return SimpleNamespace(dataset=lambda: dataset, manifest={"options": {"seq_len": seq_len}}, groups=[0, 1],
                               piece=lambda t: f"<{t}>")

    pool = quiet_pool(model, atlas(32), 60, 8, seed=0)
    assert len(pool.pieces) == 60 and {len(p) for p in pool.pieces} == {17}
    units, windows, peaks = pool.loud[0]
    assert len(units) and windows.max() < 60 and (peaks > 0).all()
    with pytest.raises(MonetError, match="no 17-token window"):
        quiet_pool(model, atlas(16), 10, 8, seed=0)


class FakeOpenAI(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: explains every feature as '"def"' and judges every example 1."""

    prompts: list[str] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        FakeOpenAI.prompts.append(prompt)
        if "what does the feature detect" in prompt:
            answer = 'the token "def"'
        else:
            n = int(prompt.split("Reply with only a JSON list of ")[1].split()[0])
            answer = json.dumps([1] * n)
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def tiny_encoder(data: Path, out: Path) -> Path:
    """A random 2-layer BERT with the corpus's tokenizer, saved as a local embedding-model directory."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(data / "tokenizer.json"))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=300)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_external_explainer_llm_judge_and_self_explanation(setup, tmp_path):
    encoder = tiny_encoder(setup["data"], tmp_path / "encoder")
    server = HTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        out = tmp_path / "llm"
        assert main(["autointerp", str(setup["atlas"]), "--out", str(out), "--run", str(setup["run"]),
                     "--experts", "3", "--groups", "0", "--pool", "40", "--sources", "external", "self", "random",
                     "--explainer", url, "--judge", url, "--chat-model", str(setup["run"]),
                     "--scorers", "detection", "embedding", "--embedder", str(encoder),
                     "--bootstrap", "0", "--device", "cpu"]) == 0
    finally:
        server.shutdown()
    explanations = pq.read_table(out / "explanations.parquet").to_pylist()
    assert {e["explanation"] for e in explanations if e["source"] == "external"} == {'the token "def"'}
    assert len([e for e in explanations if e["source"] == "self"]) == 3
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    detection = [r for r in rows if r["scorer"] == "detection"]
    # a judge that always says yes: recall 1, specificity 0, balanced accuracy exactly 0.5
    assert detection and all(r["judge"] == "endpoint" and r["balanced_accuracy"] == 0.5 for r in detection)
    assert any("<<" in p for p in FakeOpenAI.prompts)   # the marked tokens reach the judge and the explainer
    embedding = [r for r in rows if r["scorer"] == "embedding"]
    assert len(embedding) == len(detection) and all(0 <= r["auroc"] <= 1 for r in embedding)


def test_without_the_model_no_negatives(setup, tmp_path):
    from monet.interp.autointerp import autointerp

    with pytest.raises(MonetError, match="--run"):
        autointerp(AutointerpSettings(atlas=str(setup["atlas"]), out=str(tmp_path / "x"),
                                      run=str(tmp_path / "missing"), device="cpu"))


def test_local_judge_answers_each_example(corpus, tmp_path):
    from monet.interp.autointerp import LocalJudge

    run = save_run(tmp_path / "judge", tiny_config(), corpus)
    (checkpoint,) = (run / "checkpoints").iterdir()
    judge = LocalJudge(str(checkpoint))
    examples = [Example(["def", " f"], [1, 0], True, marked=[0]), Example(["x"], [0], False)]
    answers = judge('tokens "def"', examples, "fuzzing")
    assert len(answers) == 2 and all(isinstance(a, bool) for a in answers)
    with pytest.raises(MonetError, match="not a model directory"):
        LocalJudge(str(tmp_path))
