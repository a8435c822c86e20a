"""Reading an expert atlas: `Atlas(path)` answers the questions of `monet atlas query` and the viewer.

Per-expert statistics of a group (all but the histogram) are read once into numpy arrays (about 40 MB for
262,144 experts); every table's footer is read once, and a query reads only the row groups whose statistics
can hold its expert's or tokens' rows (`_RowGroups`), so it decodes one row group, not the file, and the
rows are then picked with numpy. Format, verification and format-1 compatibility: docs/atlas.md.
"""

from __future__ import annotations

import json
import re
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from monet.data import TokenDataset
from monet.errors import MonetError
from monet.interp.atlas import IMAGE_TABLES, READABLE_VERSIONS, TABLES, TABLES_V1, model_identity
from monet.interp.criteria import skewness
from monet.interp.units import units_of
from monet.io import marker_kind, printable, sha256_file

_EXPERT_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MAX_GROUPS, MAX_UNITS = 10_000, 1 << 24   # far beyond any model (Monet-1.4B: 24 groups of 512^2 experts)


def _rebuild_hint(path: Path) -> str:
    """How to repair an atlas: `--force` only for a directory `monet atlas build` wrote (never a run's or
    the user's folder, which --force would refuse anyway)."""
    if marker_kind(path) == "atlas build":
        return f"rebuild it with `monet atlas build RUN --data DIR --out {path} --force`"
    return "pass the directory that `monet atlas build` wrote"


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What puts an atlas manifest's numbers or labels out of range (they are not covered by the tables'
    hashes), or None."""
    labels, groups, units, scale = (manifest.get(k) for k in ("labels", "groups", "units_per_group", "score_scale"))
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        return "labels must be a list of names"
    for name, value, high in (("groups", groups, MAX_GROUPS), ("units_per_group", units, MAX_UNITS)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            return f"{name} must be an integer in 1..{high:,}, got {str(value)[:40]!r}"
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        return f"score_scale must be a positive finite number, got {str(scale)[:40]!r}"
    images = manifest.get("images")
    grid = images.get("grid") if isinstance(images, dict) else None
    if manifest.get("format_version") == 3 and (isinstance(grid, bool) or not isinstance(grid, int) or grid < 1):
        return f"images.grid must be a positive integer, got {str(grid)[:40]!r}"
    return None


class _RowGroups:
    """A Parquet table whose footer is read once, read by row group: `read(columns, group=0, expert=7)` decodes
    only the row groups whose min/max statistics can hold rows with those values, then keeps the rows that
    match. The atlas's tables are written sorted by their key (docs/atlas.md), so an expert's or a token's rows
    lie in one or two row groups; a table without statistics is still read correctly, only more slowly. One read
    at a time per table (a lock), so threads (the viewer's requests) may share it."""

    def __init__(self, path: Path) -> None:
        self.lock = threading.Lock()
        self.file = pq.ParquetFile(path)
        self.names: list[str] = list(self.file.schema_arrow.names)
        meta = self.file.metadata
        self.ranges: dict[str, np.ndarray] = {}     # column -> [row groups, 2] (min, max); +-inf where unknown
        for index, name in enumerate(self.names):
            if self.file.schema_arrow.field(name).type.num_fields:   # list columns: never filtered on
                continue
            bounds = np.tile([-np.inf, np.inf], (meta.num_row_groups, 1))
            for rg in range(meta.num_row_groups):
                stats = meta.row_group(rg).column(index).statistics
                if stats is not None and stats.has_min_max and isinstance(stats.min, (int, float)):
                    bounds[rg] = stats.min, stats.max
            self.ranges[name] = bounds

    def read(self, columns: list[str] | None = None, **equal: Any) -> Any:
        keep = np.ones(self.file.metadata.num_row_groups, bool)
        for name, value in equal.items():
            values = np.sort(np.atleast_1d(np.asarray(value, np.float64)))
            low, high = self.ranges[name][:, 0], self.ranges[name][:, 1]
            first = np.searchsorted(values, low)            # the first wanted value >= each row group's min
            keep &= (first < len(values)) & (values[np.minimum(first, len(values) - 1)] <= high)
        wanted = None if columns is None else list(dict.fromkeys([*columns, *equal]))
        with self.lock:
            table = self.file.read_row_groups(np.flatnonzero(keep).tolist(), columns=wanted) if keep.any() else \
                self.file.schema_arrow.empty_table().select(wanted or self.names)
        if equal:
            mask = np.ones(table.num_rows, bool)
            for name, value in equal.items():
                mask &= np.isin(table.column(name).to_numpy(), np.atleast_1d(value))
            table = table.filter(mask)
        return table if columns is None else table.select(columns)


class Atlas:
    """An atlas directory written by `monet atlas` (see `monet.interp.atlas.build_atlas`)."""

    def __init__(self, path: str | Path, model: torch.nn.Module | None = None, verify: bool = True) -> None:
        self.path = Path(path)
        self._rebuild = _rebuild_hint(self.path)
        if not self.path.is_dir():
            raise MonetError(f"no atlas at {self.path}; build one with "
                             f"`monet atlas build RUN --data DIR --out {self.path}`")
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise MonetError(f"{self.path} is not a complete atlas (missing manifest.json); {self._rebuild}")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
            version = self.manifest.get("format_version")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise MonetError(f"{manifest_path} is corrupt ({exc}); {self._rebuild}") from exc
        if version not in READABLE_VERSIONS:
            raise MonetError(f"{self.path} has atlas format {version}; this monet reads formats "
                             f"{', '.join(map(str, READABLE_VERSIONS))}; {self._rebuild}")
        self.version: int = int(version)
        self.tables = TABLES if self.version >= 2 else TABLES_V1
        if self.version >= 3:
            self.tables += IMAGE_TABLES
        missing = [name for name in self.tables if not (self.path / name).is_file()]
        if missing:
            raise MonetError(f"{self.path} is not a complete atlas (missing {', '.join(missing)}); {self._rebuild}")
        try:
            self.labels: list[str] = list(self.manifest["labels"])
            self.groups: list[int] = list(range(min(int(self.manifest["groups"]), MAX_GROUPS + 1)))
            self.num_experts: int = int(self.manifest["units_per_group"])
            self.scale: float = float(self.manifest["score_scale"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise MonetError(f"{manifest_path} lacks or mangles {exc}; {self._rebuild}") from exc
        problem = _manifest_problem(self.manifest)
        if problem:
            raise MonetError(f"{manifest_path} is damaged: {problem}; {self._rebuild}")
        self._group_cache: dict[int, dict[str, np.ndarray]] = {}
        self._files: dict[str, _RowGroups] = {}
        self._files_lock = threading.Lock()
        self._dataset: Any = None
        if verify:
            self.verify()
        if model is not None:
            self.check_model(model)

    @property
    def has_values(self) -> bool:
        """Whether contexts carry the expert's value at every token (format 2), not only at the activating one."""
        return self.version >= 2

    def verify(self) -> None:
        """MonetError naming the first damaged table: a size or SHA-256 other than the manifest
        records, or a Parquet footer that cannot be read (a truncated or overwritten file)."""
        recorded = self.manifest.get("tables")
        recorded = recorded if isinstance(recorded, dict) else {}
        for name in self.tables:
            path = self.path / name
            entry = recorded.get(name) if isinstance(recorded.get(name), dict) else None
            if self.version >= 2 and entry is None:
                raise MonetError(f"{self.path / 'manifest.json'} records no size or hash for {name}; {self._rebuild}")
            size = path.stat().st_size
            if entry is not None and size != entry.get("bytes"):
                raise MonetError(f"atlas table {path} is damaged: {size:,} bytes where the build wrote "
                                 f"{entry.get('bytes'):,} (truncated or replaced); {self._rebuild}")
            if entry is not None and sha256_file(path) != entry.get("sha256"):
                raise MonetError(f"atlas table {path} is damaged: its SHA-256 differs from the one recorded at "
                                 f"build time (the file changed on disk); {self._rebuild}")
            try:
                pq.read_metadata(path)           # reads and checks the footer
            except Exception as exc:             # pyarrow raises ArrowInvalid, OSError, ... for a bad footer
                raise MonetError(f"atlas table {path} is not a readable Parquet file ({exc}); {self._rebuild}") from exc

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

    def _file(self, name: str) -> _RowGroups:
        """Table `name`, its footer read once."""
        with self._files_lock:
            if name not in self._files:
                self._files[name] = _RowGroups(self.path / name)
            return self._files[name]

    def _table(self, name: str, columns: list[str] | None = None, **equal: Any) -> Any:
        """The rows of table `name` (a pyarrow Table) whose columns equal the values in `equal` (a list: any
        of them), read from the row groups that can hold them only."""
        return self._file(name).read(columns, **equal)

    def _experts(self, group: int, expert: int | None = None, hist: bool = True) -> dict[str, np.ndarray]:
        """experts.parquet rows of `group` (one `expert`'s only, when given), sorted by expert: a [rows] array
        per column, with `mass` (and `label_count` where recorded) [num_labels, rows] and, with `hist`,
        `hist` [rows, bins]."""
        names = self._file("experts.parquet").names
        columns = None if hist else [n for n in names if not n.startswith("hist_")]
        table = self._table("experts.parquet", columns, group=int(group),
                            **({} if expert is None else {"expert": int(expert)}))
        out = {name: table.column(name).to_numpy() for name in table.column_names}
        order = np.argsort(out["expert"], kind="stable")
        if np.any(order != np.arange(len(order))):     # written sorted; sort anyway if another writer did not
            out = {name: values[order] for name, values in out.items()}
        out["mass"] = np.stack([out.pop(f"mass_{label}") for label in self.labels])
        if all(f"count_{label}" in out for label in self.labels):
            out["label_count"] = np.stack([out.pop(f"count_{label}") for label in self.labels])
        if hist:
            bins = sorted(k for k in out if k.startswith("hist_"))
            out["hist"] = np.stack([out.pop(k) for k in bins], axis=1)
        return out

    def _group(self, group: int) -> dict[str, np.ndarray]:
        """All per-expert columns of one group but the histogram (read once, then cached)."""
        if group not in self._group_cache:
            self.check_expert(group, 0)
            columns = self._experts(group, hist=False)
            if len(columns["expert"]) != self.num_experts:
                raise MonetError(f"{self.path / 'experts.parquet'} has {len(columns['expert'])} rows for group "
                                 f"{group}, expected {self.num_experts}; {self._rebuild}")
            self._group_cache[group] = columns
        return self._group_cache[group]

    def preload(self) -> None:
        """Read every group's per-expert statistics now (what the viewer does before serving), so that no
        query waits for them later."""
        for group in self.groups:
            self._group(group)

    @cached_property
    def vocab(self) -> list[str]:
        table = self._table("vocab.parquet").to_pydict()
        pieces = dict(zip(table["id"], table["piece"], strict=True))
        return [pieces.get(i, "") for i in range(max(pieces, default=-1) + 1)]

    def percent(self, score: float) -> float:
        """A score as a percentage of the largest possible one (the atlas's `score_scale`)."""
        return 100.0 * float(score) / self.scale

    def piece(self, token: int) -> str:
        return self.vocab[token] if 0 <= token < len(self.vocab) else f"<{token}>"

    @property
    def label_tokens(self) -> np.ndarray:
        return np.asarray(self.manifest["label_tokens"], np.float64)

    # ------------------------------------------------------------------------------------- queries

    def label_mass(self, group: int) -> tuple[list[str], np.ndarray]:
        """(labels, routing mass [num_labels, N]): summed scores of each expert on each label's tokens."""
        return list(self.labels), self._group(group)["mass"].copy()

    def densities(self, group: int) -> np.ndarray:
        """[N]: each expert's activations per token of the atlas corpus."""
        return self._group(group)["density"].copy()

    def label_probability(self, group: int) -> np.ndarray:
        """[num_labels, N]: mean score per token of each label (mass / tokens of the label), the
        "routing probability for that domain" of paper §5.1 / appendix D.1."""
        return self._group(group)["mass"] / np.maximum(self.label_tokens, 1.0)[:, None]

    def _row(self, group: int, expert: int, hist: bool = True) -> dict[str, Any]:
        """One expert's columns: from the cached group arrays (the histogram, with `hist`, from its row group),
        else all from its Parquet row group only."""
        if group in self._group_cache:
            cached = self._group_cache[group]
            row = {k: v[:, expert] if k in ("mass", "label_count") else v[expert] for k, v in cached.items()}
            if not hist:
                return row
            names = self._file("experts.parquet").names
            bins = sorted(n for n in names if n.startswith("hist_"))
            table = self._table("experts.parquet", bins, group=int(group), expert=int(expert))
            row["hist"] = np.array([table.column(name)[0].as_py() for name in bins])
            return row
        columns = self._experts(group, expert)
        if not len(columns["expert"]):
            raise MonetError(f"{self.path / 'experts.parquet'} has no row for expert {group}:{expert}; {self._rebuild}")
        return {k: v[:, 0] if k in ("mass", "label_count") else v[0] for k, v in columns.items()}

    def expert(self, group: int, expert: int, histogram: bool = True) -> dict[str, Any]:
        """Statistics of one expert: count, density, mean/max score, label mass, histogram (left out without
        `histogram`: it is the one part read from disk once a group's statistics are in memory)."""
        self.check_expert(group, expert)
        row = self._row(group, expert, hist=histogram)
        mass = np.asarray(row["mass"], np.float64)
        prob = mass / np.maximum(self.label_tokens, 1.0)
        share = prob / prob.sum() if prob.sum() > 0 else np.zeros_like(prob)
        out = {
            "group": int(group), "expert": int(expert), "id": f"{group}:{expert}",
            "count": int(row["count"]), "density": float(row["density"]),
            "mean_score": float(row["mean_score"]), "max_score": float(row["max_score"]),
            "mean_percent": self.percent(row["mean_score"]), "max_percent": self.percent(row["max_score"]),
            "label_mass": self._by_label(mass, float), "label_share": self._by_label(share, float),
            "label_count": self._by_label(row["label_count"], int) if "label_count" in row else None,
            "label_tokens": self._by_label(self.label_tokens, int),
        }
        if histogram:
            out["histogram"] = {"edges": [e * 100.0 for e in self.manifest["hist_edges"]],
                                "counts": np.asarray(row["hist"]).astype(int).tolist()}
        return out

    def _by_label(self, values: Any, kind: type) -> dict[str, Any]:
        return {label: kind(value) for label, value in zip(self.labels, values, strict=True)}

    def top_contexts(self, group: int, expert: int, k: int | None = None) -> list[dict[str, Any]]:
        """The expert's top-activating contexts, best first: score, percentage, label, tokens and pieces
        (tokens outside the document are left out), `target` is the index of the activating token, `values`
        the expert's percentage at each token (None where unknown; None altogether for format-1 atlases)."""
        self.check_expert(group, expert)
        rows = self._table("contexts.parquet", group=int(group), expert=int(expert)).to_pylist()
        rows.sort(key=lambda r: r["rank"])
        if k is not None:
            rows = rows[:max(int(k), 0)]
        return [self._context(row) for row in rows]

    def _context(self, row: dict[str, Any]) -> dict[str, Any]:
        before = int(self.manifest["context"]["before"])
        ids = row["tokens"]
        kept = [i for i, t in enumerate(ids) if t >= 0]
        tokens = [ids[i] for i in kept]
        values = row.get("values")
        out = {
            "rank": row["rank"], "doc": row["doc"], "pos": row["pos"], "score": row["score"],
            "percent": self.percent(row["score"]), "label": self.labels[row["label"]],
            "token": row["token"], "tokens": tokens, "pieces": [self.piece(t) for t in tokens],
            "target": kept.index(before),
            "values": None if values is None else [None if values[i] is None else self.percent(values[i])
                                                   for i in kept],
        }
        if "band" in row:
            out["band"] = row["band"]
        return out

    @property
    def has_images(self) -> bool:
        """Whether the atlas records image examples (format 3: a VisionMonet built with an image–caption set)."""
        return self.version >= 3 and isinstance(self.manifest.get("images"), dict)

    def image_examples(self, group: int, expert: int, k: int | None = None) -> list[dict[str, Any]]:
        """The expert's top images, best first (each image once, at its best patch): image index and id, label,
        caption, `patch` and its `row`/`col` in the `grid` x `grid` patch grid, score and percentage. Empty when
        the atlas records no images."""
        self.check_expert(group, expert)
        if not self.has_images:
            return []
        rows = self._table("image_contexts.parquet", group=int(group), expert=int(expert)).to_pylist()
        rows = sorted(rows, key=lambda r: r["rank"])[:None if k is None else max(int(k), 0)]
        if not rows:
            return []
        meta = self._table("images.parquet", ["image", "id", "label", "caption"],
                           image=[r["image"] for r in rows]).to_pylist()
        about = {m["image"]: m for m in meta}
        grid = int(self.manifest["images"]["grid"])
        out = []
        for r in rows:
            if r["image"] not in about:
                raise MonetError(f"{self.path / 'images.parquet'} lacks image {r['image']}; {self._rebuild}")
            out.append({"rank": r["rank"], "image": r["image"], "id": about[r["image"]]["id"],
                        "label": about[r["image"]]["label"], "caption": about[r["image"]]["caption"],
                        "patch": r["patch"], "row": r["patch"] // grid, "col": r["patch"] % grid, "grid": grid,
                        "score": r["score"], "percent": self.percent(r["score"])})
        return out

    def image_png(self, image: int) -> bytes:
        """A stored image (one that is some expert's top example) as PNG bytes."""
        if not self.has_images:
            raise MonetError(f"the atlas {self.path} records no images (build it from a VisionMonet with --images)")
        found = self._table("images.parquet", ["png"], image=int(image)).column("png").to_pylist()
        if not found:
            raise MonetError(f"image {image} is not stored in this atlas (it keeps the images that are some "
                             "expert's top example)")
        return found[0]

    def band_samples(self, group: int, expert: int) -> list[dict[str, Any]]:
        """Examples by activation band, strongest band first: per band of score / H (10 log-spaced bands, see
        `monet.interp.atlas.BAND_EDGES`) with activations, its range in percent, how many of the expert's
        activations fall in it (`count`, `share`) and a uniform random sample of its contexts (best first).
        Empty for format-1 atlases, which keep no samples."""
        self.check_expert(group, expert)
        if self.version < 2:
            return []
        bands = self.manifest["bands"]
        edges, per = bands["edges"], int(bands["bins_per_band"])
        hist = np.asarray(self._row(group, expert)["hist"], np.int64)
        counts = hist.reshape(-1, per).sum(axis=1)
        total = max(int(counts.sum()), 1)
        rows = self._table("samples.parquet", group=int(group), expert=int(expert)).to_pylist()
        out = []
        for band in range(len(edges) - 2, -1, -1):
            if counts[band] == 0:
                continue
            mine = sorted((r for r in rows if r["band"] == band), key=lambda r: (-r["score"], r["doc"], r["pos"]))
            out.append({"band": band, "low_percent": 100.0 * edges[band], "high_percent": 100.0 * edges[band + 1],
                        "count": int(counts[band]), "share": int(counts[band]) / total,
                        "contexts": [self._context(r) for r in mine]})
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

    def _token_rows(self, ids: list[int]) -> dict[str, np.ndarray]:
        """token_index.parquet rows of the tokens `ids` as arrays (token, group, expert, contexts, max_score)."""
        table = self._table("token_index.parquet", ["token", "group", "expert", "contexts", "max_score"], token=ids)
        return {name: table.column(name).to_numpy() for name in table.column_names}

    def experts_for_token(self, token: str | int, n: int = 20) -> list[dict[str, Any]]:
        """Experts whose top contexts most often activate on `token` (then by their best score on it)."""
        rows = self._token_rows(self.token_ids(token))
        top_k = max(int(self.manifest["options"]["top_k"]), 1)
        best = np.lexsort((rows["expert"], rows["group"], -rows["max_score"], -rows["contexts"]))[:n]
        return [{"group": int(rows["group"][i]), "expert": int(rows["expert"][i]),
                 "id": f"{rows['group'][i]}:{rows['expert'][i]}", "token": int(rows["token"][i]),
                 "piece": self.piece(int(rows["token"][i])), "contexts": int(rows["contexts"][i]),
                 "share_of_top": int(rows["contexts"][i]) / top_k, "max_percent": self.percent(rows["max_score"][i])}
                for i in best]

    def vocab_matches(self, text: str, limit: int = 1000) -> list[int]:
        """Ids of the vocabulary pieces that contain `text` (case-insensitive), at most `limit`, shortest first."""
        if not text:
            raise MonetError("give some text to search the vocabulary for")
        needle = text.casefold()
        ids = [i for i, piece in enumerate(self.vocab) if needle in piece.casefold()]
        if not ids:
            raise MonetError(f"no vocabulary token contains {text!r}")
        ids.sort(key=lambda i: (len(self.vocab[i]), i))
        return ids[:limit]

    def experts_for_substring(self, text: str, n: int = 20) -> dict[str, Any]:
        """Experts whose top contexts activate on any vocabulary token containing `text` (case-insensitive):
        per expert the number of its top contexts on those tokens, its best score there and the tokens, best
        first. Returns {"tokens": number of matching vocabulary tokens, "experts": [...]}."""
        ids = self.vocab_matches(text)
        top_k = max(int(self.manifest["options"]["top_k"]), 1)
        rows = self._token_rows(ids)
        # One entry per expert, summed over its matching tokens (numpy: a common letter matches ~10^5 rows).
        key = rows["group"].astype(np.int64) * self.num_experts + rows["expert"]
        experts, which = np.unique(key, return_inverse=True)
        contexts = np.bincount(which, weights=rows["contexts"], minlength=len(experts)).astype(np.int64)
        max_score = np.zeros(len(experts), np.float64)
        np.maximum.at(max_score, which, rows["max_score"].astype(np.float64))
        out = []
        for e in np.lexsort((experts, -max_score, -contexts))[:n]:
            mine = np.flatnonzero(which == e)
            tokens = mine[np.lexsort((rows["token"][mine], -rows["contexts"][mine]))[:5]]
            group, expert = divmod(int(experts[e]), self.num_experts)
            out.append({"group": group, "expert": expert, "id": f"{group}:{expert}", "contexts": int(contexts[e]),
                        "share_of_top": int(contexts[e]) / top_k, "max_percent": self.percent(max_score[e]),
                        "pieces": [self.piece(int(rows["token"][t])) for t in tokens]})
        return {"tokens": len(ids), "experts": out}

    def experts_for_label(self, label: str, n: int = 20, min_count: int = 10,
                          group: int | None = None) -> list[dict[str, Any]]:
        """Experts most specific to `label`: skewness = routing probability on the label / the largest
        on any other label (paper §5.1 calls an expert specialised when this is at least 2); inf for an
        expert seen on this label only. Experts with fewer than `min_count` activations are left out."""
        index = self.label_index(label)
        rows = []
        for g in self.groups if group is None else [group]:
            skew = skewness(self.label_probability(g), index)
            count = self._group(g)["count"]
            skew = np.where(count >= min_count, skew, -np.inf)
            best = _largest(skew, n)
            rows += [(float(skew[e]), g, int(e), int(count[e])) for e in best if skew[e] > -np.inf]
        rows.sort(key=lambda r: (-r[0], r[1], r[2]))
        return [{"group": g, "expert": e, "id": f"{g}:{e}", "skewness": s, "count": c} for s, g, e, c in rows[:n]]

    def dataset(self) -> TokenDataset:
        """The split the atlas was built on (at the path recorded in the manifest), checked against the
        recorded tokenizer; MonetError when it is gone or is another corpus."""
        if self._dataset is None:
            data = self.manifest.get("data") or {}
            where = f"{data.get('dir')} ({data.get('split')} split)"
            if not data.get("dir") or not Path(data["dir"]).is_dir():
                raise MonetError(f"the atlas's corpus {where} is not available on this machine, so the document "
                                 "text around a context cannot be shown")
            dataset = TokenDataset(data["dir"], data.get("split", "validation"))
            recorded, found = data.get("tokenizer_sha256"), dataset.manifest.get("tokenizer_sha256")
            if recorded and found and recorded != found:
                raise MonetError(f"the corpus at {where} was tokenized with another tokenizer than the atlas's; "
                                 "it is not the corpus this atlas was built on")
            self._dataset = dataset
        return self._dataset

    def document(self, doc: int, pos: int, before: int = 200, after: int = 200) -> dict[str, Any]:
        """The text of document `doc` around position `pos`: up to `before` tokens before it and `after` after
        (ids, pieces, `target` = the index of `pos`), its label and length, and the build's window length."""
        dataset = self.dataset()
        if not isinstance(doc, (int, np.integer)) or not 0 <= doc < dataset.num_documents:
            raise MonetError(f"unknown document {doc!r}: the atlas's corpus has documents "
                             f"0..{dataset.num_documents - 1}")
        tokens = np.asarray(dataset.document(int(doc)))
        if not isinstance(pos, (int, np.integer)) or not 0 <= pos < len(tokens):
            raise MonetError(f"position {pos!r} is outside document {doc} (0..{len(tokens) - 1})")
        start, end = max(0, int(pos) - before), min(len(tokens), int(pos) + after + 1)
        ids = [int(t) for t in tokens[start:end]]
        return {"doc": int(doc), "pos": int(pos), "label": dataset.document_label(int(doc)), "length": len(tokens),
                "start": start, "end": end, "tokens": ids, "pieces": [self.piece(t) for t in ids],
                "target": int(pos) - start, "seq_len": int(self.manifest["options"]["seq_len"])}

    def interesting_experts(self, n: int = 200) -> list[tuple[int, int]]:
        """Experts with many examples (a full top-K) and the highest counts, for the viewer's random button."""
        out = []
        for g in self.groups:
            count = self._group(g)["count"]
            best = np.argsort(-count, kind="stable")[:n]
            out += [(g, int(e)) for e in best if count[e] > 0]
        return out


def _largest(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` largest values, ties by index: `np.argsort(-values, kind="stable")[:n]` without
    sorting all 262,144 of a group (a partition finds the n-th largest, then only the candidates are sorted)."""
    if n <= 0:
        return np.zeros(0, np.int64)
    if n >= len(values):
        return np.argsort(-values, kind="stable")[:n]
    kth = np.partition(values, len(values) - n)[len(values) - n]
    candidates = np.flatnonzero(values >= kth)
    return candidates[np.argsort(-values[candidates], kind="stable")][:n]


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
    layout = units_of(model.eval())
    out = [{"position": t, "token": token, "piece": tokenizer.decode([token]), "groups": []}
           for t, token in enumerate(ids[0].tolist())]
    for token, unit, score in layout.entries(ids.to(next(model.parameters()).device)):
        found: list[list[tuple[int, float]]] = [[] for _ in out]
        for t, u, v in zip(token.tolist(), unit.tolist(), score.float().tolist(), strict=True):
            found[t].append((u, v))
        for entry, units in zip(out, found, strict=True):
            top = sorted(units, key=lambda uv: -uv[1])
            entry["groups"].append([(u, 100.0 * v / layout.scale) for u, v in top[:n]])
    return out


@torch.no_grad()
def expert_values(model: torch.nn.Module, input_ids: torch.Tensor, group: int, expert: int) -> np.ndarray:
    """The score of unit `expert` of `group` at every token of `input_ids` [B, T] ([B, T] float, 0 where the
    unit is not active), from each token's active units (the same numbers as the atlas build)."""
    activations = units_of(model.eval()).entries(input_ids.to(next(model.parameters()).device))
    if not 0 <= group < len(activations):
        raise MonetError(f"unknown group {group}: this model has groups 0..{len(activations) - 1}")
    token, unit, score = (a.cpu() for a in activations[group])
    values = torch.zeros(input_ids.numel())
    values[token[unit == expert]] = score[unit == expert].float()
    return values.view(input_ids.shape).numpy()


def activation_on_text(model: torch.nn.Module, tokenizer: Any, text: str, group: int, expert: int,
                       max_tokens: int = 512) -> dict[str, Any]:
    """Expert (group, expert)'s percentage at each token of `text` (run after the beginning-of-sequence token,
    as documents are in the corpus): pieces, values and the maximum."""
    if not text.strip():
        raise MonetError("give some text to run through the model")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    limit = min(max_tokens, int(getattr(model.config, "max_position_embeddings", max_tokens) or max_tokens) - 1)
    if len(ids) > limit:
        raise MonetError(f"the text has {len(ids)} tokens; the limit is {limit}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    values = expert_values(model, torch.tensor([bos + ids]), group, expert)[0][len(bos):]
    percent = [100.0 * float(v) / units_of(model).scale for v in values]
    return {"group": int(group), "expert": int(expert), "tokens": [int(t) for t in ids],
            "pieces": [tokenizer.decode([t]) for t in ids], "values": percent,
            "max": max(percent, default=0.0)}


def document_values(model: torch.nn.Module, atlas: Atlas, view: dict[str, Any], group: int, expert: int) -> list[float]:
    """The expert's percentage at each token of a document view (`Atlas.document`), computed on the windows
    of the build (the document cut every `seq_len` tokens from its start, each window run on its own)."""
    seq_len = int(view["seq_len"])
    tokens = torch.from_numpy(np.asarray(atlas.dataset().document(view["doc"])).astype(np.int64))
    first, last = view["start"] // seq_len, (view["end"] - 1) // seq_len
    out = np.concatenate([expert_values(model, tokens[None, w * seq_len:(w + 1) * seq_len], group, expert)[0]
                          for w in range(first, last + 1)])
    begin = view["start"] - first * seq_len
    return [atlas.percent(v) for v in out[begin:begin + len(view["tokens"])]]


def compact_histogram(edges: list[float], counts: list[int], max_bins: int = 16) -> dict[str, list]:
    """A histogram for display: bins chosen from the data -- from the first to the last non-empty bin of the
    stored (fine, log-spaced) bins, adjacent bins merged until at most `max_bins` remain."""
    counts = list(counts)
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return {"edges": [], "counts": []}
    low, high = nonzero[0], nonzero[-1] + 1
    step = -(-(high - low) // max_bins)
    out_edges, out_counts = [edges[low]], []
    for first in range(low, high, step):
        stop = min(first + step, high)
        out_counts.append(int(sum(counts[first:stop])))
        out_edges.append(edges[stop])
    return {"edges": out_edges, "counts": out_counts}


def format_context(context: dict[str, Any]) -> str:
    """One context as a line, the activating token marked, whitespace and control characters made visible."""
    parts = []
    for i, piece in enumerate(context["pieces"]):
        piece = printable(piece.replace("\n", "\u21b5").replace("\t", "\u2192"))
        parts.append(f"[[{piece}]]" if i == context["target"] else piece)
    return "".join(parts)


__all__ = ["Atlas", "activation_on_text", "compact_histogram", "document_values", "expert_values", "experts_for_text",
           "format_context", "parse_expert"]
