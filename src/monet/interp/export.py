"""An expert page as JSON -- our own shape (Neuronpedia's field names where the meaning matches, Monet-specific
facts under `monet`), or exactly Neuronpedia's feature (Neuronpedia's `Neuron` and `Activation` records) or
SAEDashboard's batch file (`NeuronpediaRunner` output) -- and the experts similar to one expert. All are
described in docs/atlas.md ("Export", "Similar experts").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from monet.checkpoint import load_checkpoint
from monet.errors import MonetError
from monet.interp.capture import capture_routing
from monet.interp.explain import context_prefixes, expert_direction, expert_logits
from monet.interp.query import Atlas, parse_expert
from monet.interp.units import kind_of
from monet.io import write_json
from monet.settings import AtlasExport


def expert_page(atlas, group: int, expert: int, model: Any = None, k: int | None = None) -> dict[str, Any]:
    """One expert as a JSON-ready dict. `model` (the atlas's own) adds promoted/suppressed tokens."""
    stats = atlas.expert(group, expert)
    edges = stats["histogram"]["edges"]
    centres = [(a * b) ** 0.5 for a, b in zip(edges[:-1], edges[1:], strict=True)]   # log-bin centres
    page: dict[str, Any] = {
        "modelId": atlas.manifest["model"].get("run") or atlas.manifest["model"]["config_hash"],
        "layer": f"group-{group}",
        "index": int(expert),
        "activations": [_activation(ctx) for ctx in atlas.top_contexts(group, expert, k)],
        "pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
        "frac_nonzero": stats["density"],
        "freq_hist_data_bar_heights": stats["histogram"]["counts"],
        "freq_hist_data_bar_values": centres,
        "explanations": [],
        "monet": {
            "group": int(group), "expert": int(expert), "kind": atlas.manifest["kind"],
            "count": stats["count"], "mean_percent": stats["mean_percent"],
            "max_percent": stats["max_percent"], "label_mass": stats["label_mass"],
            "label_share": stats["label_share"], "label_count": stats["label_count"],
            "hist_edges_percent": edges, "tokens_in_atlas": atlas.manifest["tokens"],
            "format_version": atlas.version,
            "bands": [{"low_percent": band["low_percent"], "high_percent": band["high_percent"],
                       "count": band["count"], "share": band["share"],
                       "activations": [_activation(ctx) for ctx in band["contexts"]]}
                      for band in atlas.band_samples(group, expert)],
        },
    }
    halves = kind_of(atlas.manifest["kind"]).halves(atlas.manifest, expert)
    if halves is not None:
        page["monet"]["i"], page["monet"]["j"] = halves
    if model is not None:
        page.update(expert_logits(model, atlas, group, expert))
    return page


def _activation(ctx: dict[str, Any]) -> dict[str, Any]:
    """One context in Neuronpedia's activation shape. `values` are percentages of the token's routing (null
    where the build never ran the token); format-1 atlases know only the activating token's value."""
    values = ctx["values"]
    if values is None:
        values = [0.0] * len(ctx["tokens"])
        values[ctx["target"]] = ctx["percent"]
    return {"tokens": ctx["pieces"], "token_ids": ctx["tokens"], "values": values,
            "maxValue": ctx["percent"], "maxValueTokenIndex": ctx["target"],
            "doc": ctx["doc"], "pos": ctx["pos"], "label": ctx["label"]}


@torch.no_grad()
def similar_experts(model: torch.nn.Module, atlas: Atlas, group: int, expert: int, n: int = 20,
                    directions: int = 12, k: int | None = None) -> dict[str, Any]:
    """Experts that fire together with (group, expert) on its top contexts, and how alike their outputs are.

    Per co-active expert: `contexts` (in how many of the top contexts it fires at the activating token),
    `mean_percent` (its mean share of the routing there), `lift` (that rate over its density on the whole
    atlas corpus) and, for the `directions` most frequent, `cosine` between the two `expert_direction`s.
    Ranked by `contexts`, then `mean_percent`."""
    atlas.check_expert(group, expert)
    if not kind_of(atlas.manifest["kind"]).coactive:
        raise MonetError("similar experts are computed for Monet atlases only (routing co-activation)")
    k = k or int(atlas.manifest["options"]["top_k"])
    prefixes = context_prefixes(atlas, group, expert, k)
    if not prefixes:
        raise MonetError(f"expert {group}:{expert} has no contexts in this atlas, so nothing fires with it")
    device = next(model.parameters()).device
    seen: dict[int, list[float]] = {}
    model.eval()
    for prefix in prefixes:
        with capture_routing(model) as capture:
            model.model(input_ids=torch.tensor([prefix], device=device), use_cache=False)
        for other, score in capture.experts(group).token(0, len(prefix) - 1):
            if other != expert:
                seen.setdefault(int(other), []).append(float(score))
    density = atlas.densities(group)
    ranked = sorted(seen.items(), key=lambda kv: (-len(kv[1]), -sum(kv[1]) / len(kv[1]), kv[0]))[:n]
    # Only when cosines are asked for: the viewer asks for the table with directions=0 and compares its cached
    # directions itself, so this pass (K more forward passes) would be wasted there.
    mine = expert_direction(model, atlas, group, expert, k) if directions > 0 and ranked else None
    rows = []
    for rank, (other, scores) in enumerate(ranked):
        cosine = None
        if rank < directions:
            theirs = expert_direction(model, atlas, group, other, k)
            norm = float(mine.norm() * theirs.norm())
            cosine = float(mine @ theirs) / norm if norm > 0 else None
        rate = len(scores) / len(prefixes)
        rows.append({"group": int(group), "expert": other, "id": f"{group}:{other}", "contexts": len(scores),
                     "mean_percent": atlas.percent(sum(scores) / len(scores)),
                     "lift": rate / float(density[other]) if density[other] > 0 else math.inf, "cosine": cosine})
    return {"group": int(group), "expert": int(expert), "contexts": len(prefixes), "experts": rows}


def _bins(atlas: Atlas, group: int, expert: int, k: int | None) -> list[tuple[float, float, float, dict[str, Any]]]:
    """(bin_min, bin_max, bin_contains, context) for the top contexts (SAEDashboard marks them -1, max, -1) and
    then each activation band's samples (its range in percent and the share of the expert's activations in it:
    SAEDashboard's activation quantile intervals, here the atlas's log-spaced bands)."""
    top = atlas.top_contexts(group, expert, k)
    best = max((c["percent"] for c in top), default=0.0)
    out = [(-1.0, float(best), -1.0, c) for c in top]
    for band in atlas.band_samples(group, expert):
        out += [(band["low_percent"], band["high_percent"], band["share"], c) for c in band["contexts"]]
    return out


def _values(ctx: dict[str, Any]) -> list[float]:
    """Per-token percentages, 0.0 where the build did not run the token (both formats want numbers)."""
    return [0.0 if v is None else float(v) for v in _activation(ctx)["values"]]


@torch.no_grad()
def logit_effects(model: torch.nn.Module, atlas: Atlas, group: int, expert: int, n: int = 10,
                  bins: int = 50) -> dict[str, list]:
    """Promoted / suppressed tokens (top and bottom `n` of W_U (norm gain * the expert's output direction)) and
    a `bins`-bar histogram of all the logit effects, in SAEDashboard's names."""
    direction = expert_direction(model, atlas, group, expert)
    logits = (model.lm_head.weight.float() @ (model.model.norm.weight.float() * direction)).cpu()
    n = min(n, logits.numel())
    up, down = logits.topk(n), (-logits).topk(n)
    out: dict[str, list] = {
        "pos_str": [atlas.piece(t) for t in up.indices.tolist()], "pos_values": up.values.tolist(),
        "neg_str": [atlas.piece(t) for t in down.indices.tolist()], "neg_values": (-down.values).tolist()}
    heights, edges = torch.histogram(logits, bins=bins)
    out["logits_hist_data_bar_heights"] = [float(h) for h in heights.tolist()]
    out["logits_hist_data_bar_values"] = [float(e) for e in ((edges[:-1] + edges[1:]) / 2).tolist()]
    return out


def neuronpedia_feature(atlas: Atlas, group: int, expert: int, model: Any = None,
                        k: int | None = None) -> dict[str, Any]:
    """One expert as Neuronpedia's feature: its `Neuron` record's fields (modelId, layer and index as strings,
    logit effects, density, activation histogram) with `activations` in its `Activation` record's fields
    (tokens, per-token values, maxValue, maxValueTokenIndex, minValue, binMin/binMax/binContains for the
    quantile bins, dataIndex "doc:pos"). Values are the expert's percentage of each token's routing."""
    page = expert_page(atlas, group, expert, None, k)
    model_id, layer, index = str(page["modelId"]), f"group-{group}", str(int(expert))
    feature: dict[str, Any] = {
        "modelId": model_id, "layer": layer, "index": index,
        "maxActApprox": float(atlas.expert(group, expert)["max_percent"]),
        "neg_str": [], "neg_values": [], "pos_str": [], "pos_values": [],
        "frac_nonzero": float(page["frac_nonzero"]),
        "freq_hist_data_bar_heights": [float(h) for h in page["freq_hist_data_bar_heights"]],
        "freq_hist_data_bar_values": [float(v) for v in page["freq_hist_data_bar_values"]],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
        "decoder_weights_dist": [], "hookName": layer, "explanations": [],
        "activations": [],
    }
    for bin_min, bin_max, contains, ctx in _bins(atlas, group, expert, k):
        values = _values(ctx)
        feature["activations"].append({
            "modelId": model_id, "layer": layer, "index": index, "tokens": list(ctx["pieces"]), "values": values,
            "maxValue": float(ctx["percent"]), "maxValueTokenIndex": int(ctx["target"]),
            "minValue": float(min(values, default=0.0)), "dataIndex": f"{ctx['doc']}:{ctx['pos']}",
            "dataSource": ctx["label"], "binMin": float(bin_min), "binMax": float(bin_max),
            "binContains": float(contains), "qualifyingTokenIndex": int(ctx["target"])})
    if model is not None:
        feature.update(logit_effects(model, atlas, group, expert))
    return feature


def saedashboard_batch(atlas: Atlas, group: int, experts: list[int], model: Any = None,
                       k: int | None = None) -> dict[str, Any]:
    """Experts of one group as an SAEDashboard batch file (what its NeuronpediaRunner writes and Neuronpedia
    imports): {model_id, layer, sae_set, features: [{feature_index, logit effects, frac_nonzero, histograms,
    n_prompts_total, n_tokens_in_prompt, dataset, activations: [{bin_min, bin_max, bin_contains, tokens,
    values, qualifying_token_index}], ...}]}."""
    manifest = atlas.manifest
    features = []
    for expert in experts:
        page = neuronpedia_feature(atlas, group, expert, model, k)
        feature = {"feature_index": int(expert)}
        feature.update({key: page[key] for key in (
            "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
            "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
            "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
            "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
            "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
            "decoder_weights_dist")})
        feature.update({
            "n_prompts_total": int(manifest["tokens"]) // max(int(manifest["options"]["seq_len"]), 1),
            "n_tokens_in_prompt": int(manifest["options"]["seq_len"]),
            "dataset": str((manifest.get("data") or {}).get("dir") or ""), "vector": [],
            "activations": [{"bin_min": a["binMin"], "bin_max": a["binMax"], "bin_contains": a["binContains"],
                             "tokens": a["tokens"], "values": a["values"],
                             "qualifying_token_index": a["qualifyingTokenIndex"]} for a in page["activations"]],
        })
        features.append(feature)
    return {"model_id": str(manifest["model"].get("run") or manifest["model"]["config_hash"]), "layer": int(group),
            "sae_set": f"monet-{manifest['kind']}", "features": features}


def export_command(cmd: AtlasExport) -> Path:
    """`monet atlas export`: one expert page to a JSON file (never over an existing file without --force), in
    our shape, Neuronpedia's feature or an SAEDashboard batch file (--format)."""
    atlas = Atlas(cmd.atlas)
    group, expert = parse_expert(cmd.expert, atlas)
    model = None
    if cmd.run:
        model, _ = load_checkpoint(cmd.run)
        atlas.check_model(model)
    path = Path(cmd.out)
    if path.is_dir():
        raise MonetError(f"--out {path} is a directory; give a file name such as expert.json")
    if path.exists() and not cmd.force:
        raise MonetError(f"--out {path} exists; choose another file or pass --force to replace it")
    if not path.parent.is_dir():
        raise MonetError(f"cannot write {path}: directory {path.parent} does not exist")
    if cmd.format == "neuronpedia":
        return write_json(path, neuronpedia_feature(atlas, group, expert, model, cmd.top))
    if cmd.format == "saedashboard":
        return write_json(path, saedashboard_batch(atlas, group, [expert], model, cmd.top))
    return write_json(path, expert_page(atlas, group, expert, model, cmd.top))
