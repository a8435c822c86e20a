"""Reading an expert atlas: `Atlas(path)` answers the questions of `monet atlas query` and the viewer.

Per-expert statistics of a group are read once from `experts.parquet` into numpy arrays (a few MB for
262,144 experts); contexts and the token index are read with Parquet row-group filters, so a query
touches only the row groups of one expert or one token. See `monet.interp.atlas` for the format.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monet.errors import MonetError
from monet.interp.atlas import FORMAT_VERSION, TABLES, model_identity, unit_activations, unit_layout
from monet.interp.criteria import skewness
from monet.io import printable

_EXPERT_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class Atlas:
    """An atlas directory written by `monet atlas` (see `monet.interp.atlas.build_atlas`)."""

    def __init__(self, path: str | Path, model: torch.nn.Module | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MonetError(f"no atlas at {self.path}; build one with `monet atlas RUN --data DIR --out {self.path}`")
        manifest_path = self.path / "manifest.json"
        missing = [name for name in ("manifest.json", *TABLES) if not (self.path / name).is_file()]
        if missing:
            raise MonetError(f"{self.path} is not a complete atlas (missing {', '.join(missing)}); rebuild it "
                             "with `monet atlas RUN --data DIR --out ATLAS --force`")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MonetError(f"{manifest_path} is corrupt ({exc}); rebuild the atlas with --force") from exc
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise MonetError(f"{self.path} has atlas format {version}; this monet reads format {FORMAT_VERSION}. "
                             "Rebuild it with `monet atlas ... --force`")
        self.labels: list[str] = list(self.manifest["labels"])
        self.groups: list[int] = list(range(int(self.manifest["groups"])))
        self.num_experts: int = int(self.manifest["units_per_group"])
        self.scale: float = float(self.manifest["score_scale"])
        self._group_cache: dict[int, dict[str, np.ndarray]] = {}
        if model is not None:
            self.check_model(model)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Atlas({str(self.path)!r}, kind={m['kind']}, groups={len(self.groups)}, "
                f"experts/group={self.num_experts:,}, tokens={m['tokens']:,}, labels={self.labels})")

    # ------------------------------------------------------------------------------------- checks

    def check_model(self, model: torch.nn.Module) -> None:
        """MonetError unless `model` is the model this atlas was built from."""
        mine = self.manifest.get("model", {})
        theirs = model_identity(model)
        for key, what in (("config_hash", "configuration"), ("weights_fingerprint", "weights")):
            if mine.get(key) != theirs[key]:
                raise MonetError(
                    f"atlas {self.path} was built from a different model (its {what} differ: atlas {mine.get(key)}, "
                    f"model {theirs[key]}); rebuild the atlas for this model or pass the run it was built from"
                )

    def check_expert(self, group: int, expert: int) -> None:
        if not isinstance(group, (int, np.integer)) or not 0 <= int(group) < len(self.groups):
            raise MonetError(f"unknown group {group!r}: this atlas has groups 0..{len(self.groups) - 1}")
        if not isinstance(expert, (int, np.integer)) or not 0 <= int(expert) < self.num_experts:
            raise MonetError(f"unknown expert {expert!r}: expert ids of this atlas lie in 0..{self.num_experts - 1}")

    def label_index(self, label: str) -> int:
        if label not in self.labels:
            raise MonetError(f"unknown label {label!r}; this atlas has: {', '.join(self.labels)}")
        return self.labels.index(label)

    # -------------------------------------------------------------------------------------- tables

    def _group(self, group: int) -> dict[str, np.ndarray]:
        """All per-expert columns of one group as numpy arrays (read once, then cached)."""
        if group not in self._group_cache:
            import pyarrow.parquet as pq

            table = pq.read_table(self.path / "experts.parquet", filters=[("group", "=", group)])
            columns = {name: table.column(name).to_numpy() for name in table.column_names}
            order = np.argsort(columns["expert"], kind="stable")
            columns = {k: v[order] for k, v in columns.items()}
            if len(columns["expert"]) != self.num_experts:
                raise MonetError(f"{self.path / 'experts.parquet'} has {len(columns['expert'])} rows for group "
                                 f"{group}, expected {self.num_experts}; rebuild the atlas")
            columns["mass"] = np.stack([columns.pop(f"mass_{label}") for label in self.labels])
            bins = sorted(k for k in columns if k.startswith("hist_"))
            columns["hist"] = np.stack([columns.pop(k) for k in bins], axis=1)
            self._group_cache[group] = columns
        return self._group_cache[group]

    @cached_property
    def vocab(self) -> list[str]:
        import pyarrow.parquet as pq

        table = pq.read_table(self.path / "vocab.parquet")
        pieces = table.column("piece").to_pylist()
        ids = table.column("id").to_numpy()
        out = [""] * (int(ids.max()) + 1 if len(ids) else 0)
        for i, piece in zip(ids.tolist(), pieces, strict=True):
            out[i] = piece
        return out

    def piece(self, token: int) -> str:
        return self.vocab[token] if 0 <= token < len(self.vocab) else f"<{token}>"

    @property
    def label_tokens(self) -> np.ndarray:
        return np.asarray(self.manifest["label_tokens"], np.float64)

    # ------------------------------------------------------------------------------------- queries

    def label_mass(self, group: int) -> tuple[list[str], np.ndarray]:
        """(labels, routing mass [num_labels, N]): summed scores of each expert on each label's tokens."""
        self.check_expert(group, 0)
        return list(self.labels), self._group(group)["mass"].copy()

    def label_probability(self, group: int) -> np.ndarray:
        """[num_labels, N]: mean score per token of each label (mass / tokens of the label), the
        "routing probability for that domain" of paper §5.1 / appendix D.1."""
        tokens = np.maximum(self.label_tokens, 1.0)
        return self._group(group)["mass"] / tokens[:, None]

    def _row(self, group: int, expert: int) -> dict[str, Any]:
        """One expert's columns: from the cached group arrays, else from its Parquet row group only."""
        if group in self._group_cache:
            g = self._group_cache[group]
            return {k: v[expert] if v.ndim == 1 else (v[:, expert] if k == "mass" else v[expert])
                    for k, v in g.items()}
        import pyarrow.parquet as pq

        table = pq.read_table(self.path / "experts.parquet",
                              filters=[("group", "=", int(group)), ("expert", "=", int(expert))])
        row = {name: table.column(name).to_numpy()[0] for name in table.column_names}
        row["mass"] = np.array([row.pop(f"mass_{label}") for label in self.labels])
        row["hist"] = np.array([row.pop(k) for k in sorted(k for k in list(row) if k.startswith("hist_"))])
        return row

    def expert(self, group: int, expert: int) -> dict[str, Any]:
        """Statistics of one expert: count, density, mean/max score, label mass, histogram."""
        self.check_expert(group, expert)
        row = self._row(group, expert)
        mass = np.asarray(row["mass"], np.float64)
        prob = mass / np.maximum(self.label_tokens, 1.0)
        share = prob / prob.sum() if prob.sum() > 0 else np.zeros_like(prob)
        return {
            "group": int(group), "expert": int(expert), "id": f"{group}:{expert}",
            "count": int(row["count"]), "density": float(row["density"]),
            "mean_score": float(row["mean_score"]), "max_score": float(row["max_score"]),
            "max_percent": 100.0 * float(row["max_score"]) / self.scale,
            "label_mass": {label: float(m) for label, m in zip(self.labels, mass, strict=True)},
            "label_share": {label: float(s) for label, s in zip(self.labels, share, strict=True)},
            "histogram": {"edges": [e * 100.0 for e in self.manifest["hist_edges"]],
                          "counts": np.asarray(row["hist"]).astype(int).tolist()},
        }

    def top_contexts(self, group: int, expert: int, k: int | None = None) -> list[dict[str, Any]]:
        """The expert's top-activating contexts, best first: score, percentage, label, tokens and pieces
        (tokens outside the document are left out), `target` is the index of the activating token."""
        import pyarrow.parquet as pq

        self.check_expert(group, expert)
        table = pq.read_table(self.path / "contexts.parquet",
                              filters=[("group", "=", int(group)), ("expert", "=", int(expert))])
        rows = sorted(table.to_pylist(), key=lambda r: r["rank"])
        if k is not None:
            rows = rows[:max(int(k), 0)]
        before = int(self.manifest["context"]["before"])
        out = []
        for row in rows:
            ids = row["tokens"]
            kept = [i for i, t in enumerate(ids) if t >= 0]
            tokens = [ids[i] for i in kept]
            out.append({
                "rank": row["rank"], "doc": row["doc"], "pos": row["pos"], "score": row["score"],
                "percent": 100.0 * row["score"] / self.scale, "label": self.labels[row["label"]],
                "token": row["token"], "tokens": tokens, "pieces": [self.piece(t) for t in tokens],
                "target": kept.index(before),
            })
        return out

    def token_ids(self, token: str | int) -> list[int]:
        """Vocabulary ids matching `token`: an id, or a text piece (exact, or up to surrounding spaces)."""
        if isinstance(token, (int, np.integer)) or (isinstance(token, str) and token.strip().isdigit()
                                                     and token.strip() not in self.vocab):
            value = int(token)
            if not 0 <= value < len(self.vocab):
                raise MonetError(f"token id {value} is outside the vocabulary (0..{len(self.vocab) - 1})")
            return [value]
        exact = [i for i, p in enumerate(self.vocab) if p == token]
        loose = [i for i, p in enumerate(self.vocab) if p.strip() == token.strip() and i not in exact]
        ids = exact + loose
        if not ids or not token.strip() and not exact:
            raise MonetError(f"no vocabulary token reads {token!r}; try a single token such as ' def' or an id")
        return ids

    def experts_for_token(self, token: str | int, n: int = 20) -> list[dict[str, Any]]:
        """Experts whose top contexts most often activate on `token` (then by their best score on it)."""
        import pyarrow.parquet as pq

        ids = self.token_ids(token)
        table = pq.read_table(self.path / "token_index.parquet", filters=[("token", "in", ids)])
        rows = table.to_pylist()
        top_k = max(int(self.manifest["options"]["top_k"]), 1)
        rows.sort(key=lambda r: (-r["contexts"], -r["max_score"], r["group"], r["expert"]))
        return [{"group": r["group"], "expert": r["expert"], "id": f"{r['group']}:{r['expert']}",
                 "token": r["token"], "piece": self.piece(r["token"]), "contexts": r["contexts"],
                 "share_of_top": r["contexts"] / top_k, "max_percent": 100.0 * r["max_score"] / self.scale}
                for r in rows[:n]]

    def experts_for_label(self, label: str, n: int = 20, min_count: int = 10,
                          group: int | None = None) -> list[dict[str, Any]]:
        """Experts most specific to `label`: skewness = routing probability on the label / the largest
        on any other label (paper §5.1 calls an expert specialised when this is at least 2); inf for an
        expert seen on this label only. Experts with fewer than `min_count` activations are left out."""
        index = self.label_index(label)
        rows = []
        for g in self.groups if group is None else [group]:
            self.check_expert(g, 0)
            skew = skewness(self.label_probability(g), index)
            count = self._group(g)["count"]
            skew = np.where(count >= min_count, skew, -np.inf)
            best = np.argsort(-skew, kind="stable")[:n]
            rows += [(float(skew[e]), g, int(e), int(count[e])) for e in best if skew[e] > -np.inf]
        rows.sort(key=lambda r: (-r[0], r[1], r[2]))
        return [{"group": g, "expert": e, "id": f"{g}:{e}", "skewness": s, "count": c} for s, g, e, c in rows[:n]]

    def interesting_experts(self, group: int | None = None, n: int = 200) -> list[tuple[int, int]]:
        """Experts with many examples (a full top-K) and the highest counts, for the viewer's random button."""
        out = []
        for g in self.groups if group is None else [group]:
            count = self._group(g)["count"]
            best = np.argsort(-count, kind="stable")[:n]
            out += [(g, int(e)) for e in best if count[e] > 0]
        return out


def parse_expert(text: str, atlas: Atlas | None = None) -> tuple[int, int]:
    """ "G:ID" -> (group, id), checked against the atlas when one is given."""
    match = _EXPERT_RE.match(str(text))
    if not match:
        raise MonetError(f"malformed expert {text!r}; write GROUP:ID, e.g. --expert 0:48936")
    group, expert = int(match.group(1)), int(match.group(2))
    if atlas is not None:
        atlas.check_expert(group, expert)
    return group, expert


# ------------------------------------------------------------------------------------- text queries

@torch.no_grad()
def experts_for_text(model: torch.nn.Module, tokenizer: Any, text: str, n: int = 5) -> list[dict[str, Any]]:
    """Run the model on `text` and list, per token, the top-n units of every group with their percentage."""
    if not text:
        raise MonetError("--text is empty; give some text to run through the model")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    _, _, scale = unit_layout(model)
    device = next(model.parameters()).device
    groups = unit_activations(model.eval(), ids.to(device))
    out = []
    for t, token in enumerate(ids[0].tolist()):
        entry = {"position": t, "token": token, "piece": tokenizer.decode([token]), "groups": []}
        for ids_g, scores_g in groups:
            row_ids, row_scores = ids_g[0, t].cpu(), scores_g[0, t].float().cpu()
            keep = row_ids >= 0
            order = torch.argsort(row_scores[keep], descending=True)[:n]
            entry["groups"].append([(int(row_ids[keep][o]), 100.0 * float(row_scores[keep][o]) / scale)
                                    for o in order])
        out.append(entry)
    return out


def format_context(context: dict[str, Any], mark: str = "[[{}]]") -> str:
    """One context as a line, the activating token marked, whitespace and control characters made visible."""
    parts = []
    for i, piece in enumerate(context["pieces"]):
        piece = printable(piece.replace("\n", "\u21b5").replace("\t", "\u2192"))
        parts.append(mark.format(piece) if i == context["target"] else piece)
    return "".join(parts)


__all__ = ["Atlas", "experts_for_text", "format_context", "parse_expert"]
