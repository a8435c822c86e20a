"""`monet probe` results in SAEBench's sparse-probing layout (`monet probe --format saebench`).

SAEBench (Karvonen et al. 2024) writes one result file per SAE, `<name>_eval_results.json`, with
`eval_type_id` "sparse_probing", `eval_config`, `eval_id`, `datetime_epoch_millis`, `eval_result_metrics`
{"llm": {llm_test_accuracy, llm_top_{k}_test_accuracy}, "sae": {sae_test_accuracy, sae_top_{k}_test_accuracy}},
`eval_result_details` (one entry per dataset, both sides' fields flat), `sae_bench_commit_hash`, `sae_lens_id`,
`sae_lens_release_id`, `sae_lens_version`, `sae_cfg_dict` and `eval_result_unstructured`. Its accuracies are
means over balanced binary (one class vs the rest) probes, as our `binary` accuracies are.

The mapping (docs/probing.md, "SAEBench format"): one file per routing group of the Monet model, the group's
experts in the SAE's place (`sae_top_{k}`); the reference in the LLM's place (`llm_top_{k}`) is the dense
baseline's MLP neurons at the last layer of the group, probed on the same tokens -- SAEBench's `llm` side is
the residual stream, which `monet probe` does not probe, so the reference is neurons, and
`llm_test_accuracy` (a required number, SAEBench's all-channels probe) holds the reference's largest-k
accuracy; `sae_test_accuracy` (all latents) is null. Each label is one `eval_result_details` entry. Our
intervals, random-unit control, chance and multiclass accuracies go under `eval_result_unstructured`.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from monet import __version__
from monet.errors import MonetError
from monet.io import write_json

SAEBENCH_KS = (1, 2, 5, 10, 20, 50, 100)     # the k of SAEBench's metric fields
# SAEBench writes eval_results/sparse_probing/<release>_<id>_eval_results.json, and its result reader
# (sae_bench_utils/graphing_utils.get_eval_results) picks the metrics by the eval's name in the file's path
DIRECTORY = "saebench/sparse_probing"


def _accuracy(group: dict[str, Any], k: int, label: str | None = None) -> float | None:
    entry = group["binary"].get(k, group["binary"].get(str(k)))
    if entry is None:
        return None
    return float(entry["per_label"][label]) if label is not None else float(entry["accuracy"])


def _metrics(prefix: str, group: dict[str, Any] | None, ks: list[int], label: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in SAEBENCH_KS:
        out[f"{prefix}_top_{k}_test_accuracy"] = _accuracy(group, k, label) if group is not None and k in ks else None
    return out


def _reference_group(reference: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    """The dense model's group (= layer) matching the last layer of a Monet routing group."""
    by_layer = {int(g["group"]): g for g in reference["groups"]}
    layer = max(layers)
    if layer not in by_layer:
        raise MonetError(f"the dense baseline has no layer {layer} to match the routing group's layers {layers}")
    return by_layer[layer]


def saebench_results(report: dict[str, Any], seed: int | None = None) -> dict[str, dict[str, Any]]:
    """{file name: SAEBench sparse-probing result} for every routing group of the report's Monet model."""
    monet = [m for m in report["models"] if m["kind"] == "monet"]
    dense = [m for m in report["models"] if m["kind"] == "dense"]
    if not monet or not dense:
        raise MonetError("SAEBench's layout needs a Monet model and a reference in its `llm` place: probe with "
                         "--baseline DENSE_RUN (the dense model's neurons are the reference)")
    model, reference = monet[0], dense[0]
    ks = [k for k in (int(k) for k in report["ks"]) if k in SAEBENCH_KS]
    if not ks:
        raise MonetError(f"none of the probe sizes {report['ks']} is one of SAEBench's k ({SAEBENCH_KS})")
    top_k = max(ks)
    data_name = Path(report["data"]).name
    out = {}
    for group in model["groups"]:
        ref = _reference_group(reference, list(group["layers"]))
        llm = {"llm_test_accuracy": _accuracy(ref, top_k), **_metrics("llm", ref, ks)}
        sae = {"sae_test_accuracy": None, **_metrics("sae", group, ks)}
        details = []
        for label in report["labels"]:
            details.append({"dataset_name": f"{data_name}/{label}", "llm_test_accuracy": _accuracy(ref, top_k, label),
                            **_metrics("llm", ref, ks, label), "sae_test_accuracy": None,
                            **_metrics("sae", group, ks, label)})
        name = f"{model['name']}_group_{group['group']}"
        out[f"{name}_eval_results.json"] = {
            "eval_type_id": "sparse_probing",
            "eval_config": {
                "random_seed": int(seed if seed is not None else report.get("seed", 0)),
                "dataset_names": [data_name],
                "probe_train_set_size": int(sum(model["train_examples"].values())),
                "probe_test_set_size": int(sum(model["test_examples"].values())),
                "context_length": int(report["seq_len"]),
                "model_name": str(report.get("runs", {}).get("run") or model["name"]),
                "k_values": ks,
            },
            "eval_id": str(uuid.uuid4()),
            "datetime_epoch_millis": int(time.time() * 1000),
            "eval_result_metrics": {"llm": llm, "sae": sae},
            "eval_result_details": details,
            "sae_bench_commit_hash": f"none: written by monet {__version__} (monet probe --format saebench)",
            "sae_lens_id": None,
            "sae_lens_release_id": None,
            "sae_lens_version": None,
            "sae_cfg_dict": {"architecture": "monet", "d_sae": int(model["units_per_group"]),
                             "hook_name": f"group-{group['group']}", "layers": list(group["layers"]),
                             "reference": {"kind": "dense MLP neurons", "model": reference["name"],
                                           "layer": int(ref["group"]), "units": int(reference["units_per_group"])}},
            "eval_result_unstructured": {
                "mapping": ("sae = Monet experts of this routing group; llm = the dense baseline's MLP neurons at the "
                            "group's last layer (not the residual stream); llm_test_accuracy = the reference's "
                            f"top-{top_k} accuracy (no all-channel probe is fitted); sae_test_accuracy = null"),
                "selection": report.get("selection"), "probe": report.get("probe"), "pool": report.get("pool"),
                "chance": report.get("chance"), "majority_rate": report.get("majority_rate"),
                "monet": {"binary": group["binary"], "random": group["random"], "multiclass": group["multiclass"]},
                "reference": {"binary": ref["binary"], "random": ref["random"], "multiclass": ref["multiclass"]},
            },
        }
    return out


def write_saebench(report: dict[str, Any], out: str | Path, seed: int | None = None) -> list[Path]:
    """Write `saebench_results(report)` under OUT/saebench/sparse_probing/ (one file per routing group); returns
    the paths."""
    directory = Path(out) / DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    return [write_json(directory / name, result) for name, result in saebench_results(report, seed).items()]


__all__ = ["SAEBENCH_KS", "saebench_results", "write_saebench"]
