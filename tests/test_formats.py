"""Other tools' formats: `monet probe --format saebench` against SAEBench's sparse-probing result schema, and
`monet atlas export --format neuronpedia|saedashboard` against Neuronpedia's records and SAEDashboard's batch
file. The checkers below restate those formats' published keys and types (SAEBench:
sae_bench/evals/sparse_probing/eval_output_schema_sparse_probing.json and base_eval_output.py; Neuronpedia:
apps/webapp/prisma/schema.prisma, models Neuron and Activation; SAEDashboard:
sae_dashboard/neuronpedia/neuronpedia_dashboard.py and tests/acceptance/test_simple/batch-0.json), and what
SAEBench's result reader takes from a file (sae_bench_utils/graphing_utils.py). Checked against those files at
SAEBench 8042bb3, SAEDashboard db4839a and Neuronpedia ebb8426 (2026); nothing of them is vendored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from atlas_fixtures import atlas_of, corpus, save_run, tiny_config

from monet.cli import main
from monet.errors import MonetError
from monet.interp.atlas import AtlasOptions
from monet.interp.saebench import saebench_results

NUMBER, NULLABLE = (int, float), (int, float, type(None))

# ------------------------------------------------------------------------------------- SAEBench

SAEBENCH_TOP = {"eval_type_id": str, "eval_config": dict, "eval_id": str, "datetime_epoch_millis": int,
                "eval_result_metrics": dict, "eval_result_details": list, "sae_bench_commit_hash": str,
                "sae_lens_id": (str, type(None)), "sae_lens_release_id": (str, type(None)),
                "sae_lens_version": (str, type(None)), "sae_cfg_dict": (dict, type(None)),
                "eval_result_unstructured": object}
SAEBENCH_REQUIRED = ["eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
                     "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict"]
SAEBENCH_CONFIG = {"random_seed": int, "dataset_names": list, "probe_train_set_size": int, "probe_test_set_size": int,
                   "context_length": int, "sae_batch_size": int, "llm_batch_size": (int, type(None)),
                   "llm_dtype": str, "model_name": str, "k_values": list, "lower_vram_usage": bool}
KS = (1, 2, 5, 10, 20, 50, 100)
LLM = {"llm_test_accuracy": NUMBER, **{f"llm_top_{k}_test_accuracy": NULLABLE for k in KS}}
SAE = {"sae_test_accuracy": NULLABLE, **{f"sae_top_{k}_test_accuracy": NULLABLE for k in KS}}
DETAIL = {"dataset_name": str, **LLM, **SAE}


def check_types(obj: dict, spec: dict, required: list[str], where: str) -> None:
    assert isinstance(obj, dict), where
    assert set(obj) <= set(spec), f"{where}: keys outside the schema {set(obj) - set(spec)}"
    for key in required:
        assert key in obj, f"{where}: missing required {key}"
    for key, value in obj.items():
        assert isinstance(value, spec[key]) and not (isinstance(value, bool) and spec[key] in (NUMBER, NULLABLE)), \
            f"{where}.{key}: {value!r} is not {spec[key]}"


def check_saebench(result: dict) -> None:
    """SAEBench's sparse-probing output schema: keys, required keys and types, at every level."""
    check_types(result, SAEBENCH_TOP, SAEBENCH_REQUIRED, "result")
    assert result["eval_type_id"] == "sparse_probing"
    check_types(result["eval_config"], SAEBENCH_CONFIG, [], "eval_config")
    assert 0 <= result["datetime_epoch_millis"] <= 9999999999999
    metrics = result["eval_result_metrics"]
    assert set(metrics) == {"llm", "sae"}
    check_types(metrics["llm"], LLM, ["llm_test_accuracy"], "llm")
    check_types(metrics["sae"], SAE, [], "sae")
    for n, detail in enumerate(result["eval_result_details"]):
        check_types(detail, DETAIL, ["dataset_name", "llm_test_accuracy"], f"details[{n}]")
    for section in (metrics["llm"], metrics["sae"], *result["eval_result_details"]):   # BaseMetrics: flat
        assert not any(isinstance(v, dict) for v in section.values())


def read_like_saebench(folder: Path) -> dict[str, dict]:
    """What SAEBench's result reader (sae_bench_utils/graphing_utils.py: find_eval_results_files, then
    get_eval_results) takes from the files under `folder`, restated: every *eval_results.json below it; the
    eval is told by its name in the path (tpp, scr, absorption and autointerp are tried before sparse_probing);
    for sparse probing it keeps eval_result_metrics["sae"], eval_config, sae_cfg_dict["architecture"] and
    sae_cfg_dict["d_sae"] (rounded to thousands), keyed by the file name without _eval_results.json."""
    out = {}
    for path in sorted(folder.rglob("*eval_results.json")):
        where = str(path.relative_to(folder.parent))
        assert "sparse_probing" in where and not any(n in where for n in ("tpp", "scr", "absorption", "autointerp")), \
            f"{where}: SAEBench's reader would not take this for a sparse-probing result"
        result = json.loads(path.read_text())
        entry = dict(result["eval_result_metrics"]["sae"])
        entry["eval_config"] = result["eval_config"]
        cfg = result["sae_cfg_dict"]
        assert isinstance(cfg["architecture"], str) and isinstance(cfg["d_sae"], int)
        entry["sae_class"], entry["d_sae"] = cfg["architecture"], f"{round(cfg['d_sae'] / 1000)}k"
        out[path.name.replace("_eval_results.json", "")] = entry
    return out


def fake_report() -> dict:
    def group(g: int, layers: list[int], base: float) -> dict:
        return {"group": g, "layers": layers,
                "binary": {k: {"accuracy": base + k / 100, "ci95": [base, base + 0.1],
                               "per_label": {"c": base, "python": base + 0.02}} for k in (1, 2, 5, 20)},
                "random": {k: {"accuracy": 0.5, "ci95": [0.45, 0.55]} for k in (1, 2, 5, 20)},
                "multiclass": {k: {"accuracy": 0.4, "ci95": None} for k in (1, 2, 5, 20)}}

    monet = {"name": "run", "kind": "monet", "units_per_group": 262144, "groups": [group(0, [0, 1], 0.7),
                                                                                    group(1, [2, 3], 0.75)],
             "train_examples": {"c": 100, "python": 100}, "test_examples": {"c": 50, "python": 60}}
    dense = {"name": "baseline", "kind": "dense", "units_per_group": 1537,
             "groups": [group(layer, [layer], 0.6) for layer in range(4)],
             "train_examples": {"c": 100, "python": 100}, "test_examples": {"c": 50, "python": 60}}
    return {"data": "/x/code", "labels": ["c", "python"], "ks": [1, 2, 5, 20], "seq_len": 64, "models": [monet, dense],
            "chance": {"binary": 0.5}, "majority_rate": {"binary": 0.5}, "runs": {"run": "RUN", "baseline": "B"}}


def test_saebench_mapping_and_schema():
    results = saebench_results(fake_report(), seed=3)
    assert sorted(results) == ["run_group_0_eval_results.json", "run_group_1_eval_results.json"]
    for result in results.values():
        check_saebench(json.loads(json.dumps(result)))   # as written to disk
    first = results["run_group_0_eval_results.json"]
    sae, llm = first["eval_result_metrics"]["sae"], first["eval_result_metrics"]["llm"]
    assert sae["sae_top_1_test_accuracy"] == pytest.approx(0.71)
    assert sae["sae_top_20_test_accuracy"] == pytest.approx(0.9)
    assert sae["sae_top_10_test_accuracy"] is None and sae["sae_test_accuracy"] is None
    assert llm["llm_top_5_test_accuracy"] == pytest.approx(0.65)          # dense layer 1: the group's last layer
    assert llm["llm_test_accuracy"] == llm["llm_top_20_test_accuracy"]    # documented stand-in (largest k)
    assert first["sae_cfg_dict"]["reference"]["layer"] == 1
    assert results["run_group_1_eval_results.json"]["sae_cfg_dict"]["reference"]["layer"] == 3
    assert [d["dataset_name"] for d in first["eval_result_details"]] == ["code/c", "code/python"]
    assert first["eval_result_details"][1]["sae_top_2_test_accuracy"] == pytest.approx(0.72)
    assert first["eval_config"]["k_values"] == [1, 2, 5, 20] and first["eval_config"]["random_seed"] == 3
    report = fake_report()
    report["models"].pop()
    with pytest.raises(MonetError, match="--baseline"):
        saebench_results(report)


def test_saebench_files_load_in_its_reader(tmp_path):
    from monet.interp.saebench import write_saebench

    paths = write_saebench(fake_report(), tmp_path / "probe", seed=0)
    assert [p.relative_to(tmp_path / "probe").as_posix() for p in paths] == [
        f"saebench/sparse_probing/run_group_{g}_eval_results.json" for g in (0, 1)]
    loaded = read_like_saebench(tmp_path / "probe" / "saebench")
    assert sorted(loaded) == ["run_group_0", "run_group_1"]
    assert loaded["run_group_1"]["sae_top_5_test_accuracy"] == pytest.approx(0.8)
    assert loaded["run_group_0"]["sae_class"] == "monet" and loaded["run_group_0"]["d_sae"] == "262k"


@pytest.mark.slow
def test_probe_format_saebench_command(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    monet_run = save_run(tmp_path / "monet", tiny_config(), corpus)
    dense_run = save_run(tmp_path / "dense", tiny_config(mlp_type="dense"), corpus)
    out = tmp_path / "probe"
    args = ["probe", str(monet_run), "--data", str(corpus), "--out", str(out), "--baseline", str(dense_run),
            "--split", "train", "--train-tokens", "300", "--test-tokens", "150", "--ks", "1", "2", "5", "20",
            "--bootstrap", "20", "--seq-len", "32", "--device", "cpu", "--quiet", "--format", "saebench"]
    assert main(args) == 0
    files = sorted((out / "saebench" / "sparse_probing").glob("*_eval_results.json"))
    assert [f.name for f in files] == ["run_group_0_eval_results.json", "run_group_1_eval_results.json"]
    report = json.loads((out / "probe.json").read_text())
    for path in files:
        result = json.loads(path.read_text())
        check_saebench(result)
        group = int(path.name.split("_group_")[1].split("_")[0])
        assert result["eval_result_metrics"]["sae"]["sae_top_5_test_accuracy"] == \
            report["models"][0]["groups"][group]["binary"]["5"]["accuracy"]
    assert sorted(read_like_saebench(out / "saebench")) == ["run_group_0", "run_group_1"]
    assert main(["probe", "r", "--data", "d", "--out", "o", "--format", "saebench"]) == 2   # no baseline


# ----------------------------------------------------------------------------- Neuronpedia, SAEDashboard

STRINGS, NUMBERS, INTS = "str[]", "float[]", "int[]"
# Neuronpedia's Prisma `Neuron` fields we fill, and their types (String, Float, Int, String[], Float[], Int[])
NEURON = {"modelId": str, "layer": str, "index": str, "maxActApprox": NUMBER, "hookName": str,
          "neg_str": STRINGS, "neg_values": NUMBERS, "pos_str": STRINGS, "pos_values": NUMBERS,
          "frac_nonzero": NUMBER, "freq_hist_data_bar_heights": NUMBERS, "freq_hist_data_bar_values": NUMBERS,
          "logits_hist_data_bar_heights": NUMBERS, "logits_hist_data_bar_values": NUMBERS,
          "neuron_alignment_indices": INTS, "neuron_alignment_values": NUMBERS, "neuron_alignment_l1": NUMBERS,
          "correlated_neurons_indices": INTS, "correlated_neurons_pearson": NUMBERS, "correlated_neurons_l1": NUMBERS,
          "correlated_features_indices": INTS, "correlated_features_pearson": NUMBERS,
          "correlated_features_l1": NUMBERS, "decoder_weights_dist": NUMBERS}
ACTIVATION = {"tokens": STRINGS, "dataIndex": str, "index": str, "layer": str, "modelId": str, "dataSource": str,
              "maxValue": NUMBER, "maxValueTokenIndex": int, "minValue": NUMBER, "values": NUMBERS,
              "binMin": NUMBER, "binMax": NUMBER, "binContains": NUMBER, "qualifyingTokenIndex": int}
ACTIVATION_REQUIRED = ["tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue", "values"]
# SAEDashboard's NeuronpediaDashboardFeature / NeuronpediaDashboardActivation keyword arguments
DASH_FEATURE = {"feature_index": int, "neuron_alignment_indices": INTS, "neuron_alignment_values": NUMBERS,
                "neuron_alignment_l1": NUMBERS, "correlated_neurons_indices": INTS, "correlated_neurons_l1": NUMBERS,
                "correlated_neurons_pearson": NUMBERS, "correlated_features_indices": INTS,
                "correlated_features_l1": NUMBERS, "correlated_features_pearson": NUMBERS, "neg_str": STRINGS,
                "neg_values": NUMBERS, "pos_str": STRINGS, "pos_values": NUMBERS, "frac_nonzero": NUMBER,
                "freq_hist_data_bar_values": NUMBERS, "freq_hist_data_bar_heights": NUMBERS,
                "logits_hist_data_bar_heights": NUMBERS, "logits_hist_data_bar_values": NUMBERS,
                "n_prompts_total": int, "n_tokens_in_prompt": int, "dataset": str, "activations": list,
                "decoder_weights_dist": NUMBERS, "vector": NUMBERS}
DASH_ACTIVATION = {"bin_min": NUMBER, "bin_max": NUMBER, "bin_contains": NUMBER, "tokens": STRINGS,
                   "values": NUMBERS, "qualifying_token_index": int}


def check_fields(obj: dict, spec: dict, where: str, required: tuple | list = ()) -> None:
    assert set(obj) <= set(spec), f"{where}: fields outside the format {set(obj) - set(spec)}"
    for key in required:
        assert key in obj, f"{where}: missing {key}"
    for key, value in obj.items():
        kind = spec[key]
        if kind in (STRINGS, NUMBERS, INTS):
            item = {STRINGS: str, NUMBERS: NUMBER, INTS: int}[kind]
            assert isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value), \
                f"{where}.{key}: not {kind}"
        else:
            assert isinstance(value, kind) and not isinstance(value, bool), f"{where}.{key}: {value!r} is not {kind}"


@pytest.fixture(scope="module")
def atlas_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp()
    data = corpus(base)
    work = tmp_path_factory.mktemp("formats")
    run = save_run(work / "run", tiny_config(), data, seed=0)
    options = AtlasOptions(max_tokens=2000, top_k=3, split="validation", batch_size=8, seq_len=32, samples=2)
    return {"run": run, "atlas": atlas_of(run, data, work / "atlas", options)}


def busy_expert(atlas_dir: Path, group: int) -> int:
    from monet.interp.query import Atlas

    return next(e for g, e in Atlas(atlas_dir).interesting_experts(1) if g == group)


@pytest.mark.slow
def test_neuronpedia_export(atlas_setup, tmp_path):
    expert = busy_expert(atlas_setup["atlas"], 0)
    out = tmp_path / "np.json"
    assert main(["atlas", "export", str(atlas_setup["atlas"]), "--expert", f"0:{expert}", "--out", str(out),
                 "--run", str(atlas_setup["run"]), "--format", "neuronpedia"]) == 0
    feature = json.loads(out.read_text())
    activations, explanations = feature.pop("activations"), feature.pop("explanations")
    check_fields(feature, NEURON, "Neuron", ["modelId", "layer", "index"])
    assert feature["index"] == str(expert) and feature["layer"] == "group-0" and explanations == []
    assert len(feature["pos_str"]) == 10 and len(feature["logits_hist_data_bar_heights"]) == 50
    assert activations
    for n, act in enumerate(activations):
        check_fields(act, ACTIVATION, f"Activation[{n}]", ACTIVATION_REQUIRED)
        assert len(act["values"]) == len(act["tokens"])
        assert act["values"][act["maxValueTokenIndex"]] == pytest.approx(act["maxValue"], rel=1e-5)
    assert activations[0]["binMin"] == -1 and any(a["binMin"] >= 0 for a in activations)   # top, then bands


@pytest.mark.slow
def test_saedashboard_export(atlas_setup, tmp_path):
    expert = busy_expert(atlas_setup["atlas"], 1)
    out = tmp_path / "batch-0.json"
    assert main(["atlas", "export", str(atlas_setup["atlas"]), "--expert", f"1:{expert}", "--out", str(out),
                 "--format", "saedashboard"]) == 0
    batch = json.loads(out.read_text())
    check_fields(batch, {"model_id": str, "layer": int, "sae_set": str, "features": list}, "batch",
                 ["model_id", "layer", "sae_set", "features"])
    (feature,) = batch["features"]
    check_fields(feature, DASH_FEATURE, "feature", list(DASH_FEATURE))
    assert feature["feature_index"] == expert and batch["layer"] == 1
    assert feature["pos_str"] == []                                          # no --run: no logit effects
    for n, act in enumerate(feature["activations"]):
        check_fields(act, DASH_ACTIVATION, f"activation[{n}]", list(DASH_ACTIVATION))
        assert len(act["values"]) == len(act["tokens"])
        assert act["bin_contains"] == -1 or 0 <= act["bin_contains"] <= 1


def test_export_format_is_checked():
    from monet.settings import AtlasExport

    with pytest.raises(MonetError, match="--format"):
        AtlasExport(atlas="a", expert="0:1", out="o", format="html")
