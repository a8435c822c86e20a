"""An expert page as JSON, in a shape close to Neuronpedia / SAEDashboard feature data.

Field names follow Neuronpedia's feature records where the meaning matches (`modelId`, `layer`,
`index`, `activations`, `pos_str`/`pos_values`, `neg_str`/`neg_values`, `frac_nonzero`,
`freq_hist_data_bar_heights`/`freq_hist_data_bar_values`, `explanations`); Monet-specific
facts are in `monet` (group, i, j, counts, label statistics). The shape is documented in docs/atlas.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monet.checkpoint import load_checkpoint
from monet.errors import MonetError
from monet.interp.explain import expert_logits
from monet.interp.query import Atlas, parse_expert
from monet.io import write_json
from monet.settings import AtlasExport


def expert_page(atlas, group: int, expert: int, model: Any = None, k: int | None = None,
                explanations: list[str] | None = None) -> dict[str, Any]:
    """One expert as a JSON-ready dict. `model` (the atlas's own) adds promoted/suppressed tokens."""
    stats = atlas.expert(group, expert)
    contexts = atlas.top_contexts(group, expert, k)
    activations = []
    for ctx in contexts:
        values = [0.0] * len(ctx["tokens"])
        values[ctx["target"]] = ctx["percent"]
        activations.append({"tokens": ctx["pieces"], "token_ids": ctx["tokens"], "values": values,
                            "maxValue": ctx["percent"], "maxValueTokenIndex": ctx["target"],
                            "doc": ctx["doc"], "pos": ctx["pos"], "label": ctx["label"]})
    hist = stats["histogram"]
    edges = hist["edges"]
    centres = [(a * b) ** 0.5 for a, b in zip(edges[:-1], edges[1:], strict=True)]   # log-bin centres
    page: dict[str, Any] = {
        "modelId": atlas.manifest["model"].get("run") or atlas.manifest["model"]["config_hash"],
        "layer": f"group-{group}",
        "index": int(expert),
        "activations": activations,
        "pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
        "frac_nonzero": stats["density"],
        "freq_hist_data_bar_heights": hist["counts"],
        "freq_hist_data_bar_values": centres,
        "explanations": [{"description": text} for text in (explanations or [])],
        "monet": {
            "group": int(group), "expert": int(expert), "kind": atlas.manifest["kind"],
            "count": stats["count"], "mean_percent": 100.0 * stats["mean_score"] / atlas.scale,
            "max_percent": stats["max_percent"], "label_mass": stats["label_mass"],
            "label_share": stats["label_share"], "hist_edges_percent": edges,
            "tokens_in_atlas": atlas.manifest["tokens"],
        },
    }
    if atlas.manifest["kind"] == "monet" and atlas.manifest.get("experts_per_side"):
        page["monet"]["i"], page["monet"]["j"] = divmod(int(expert), int(atlas.manifest["experts_per_side"]))
    if model is not None:
        page.update(expert_logits(model, atlas, group, expert))
    return page


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
