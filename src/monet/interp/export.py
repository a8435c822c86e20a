"""An expert page as JSON, in a shape close to Neuronpedia / SAEDashboard feature data (Neuronpedia's field
names where the meaning matches, Monet-specific facts under `monet`), and the experts similar to one expert.
Both are described in docs/atlas.md ("Export", "Similar experts").
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
    if atlas.manifest["kind"] == "monet" and atlas.manifest.get("experts_per_side"):
        page["monet"]["i"], page["monet"]["j"] = divmod(int(expert), int(atlas.manifest["experts_per_side"]))
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
    if atlas.manifest["kind"] != "monet":
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
    mine = expert_direction(model, atlas, group, expert, k)
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


def export_command(cmd: AtlasExport) -> Path:
    """`monet atlas export`: one expert page to a JSON file (never over an existing file without --force)."""
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
    return write_json(path, expert_page(atlas, group, expert, model, cmd.top))
