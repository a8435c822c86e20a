"""The expert atlas: stream a labelled corpus through a model and keep, for every expert of every
routing group, its top-activating contexts, a sample of its contexts per activation band, running
statistics, and each stored context's per-token values from a second pass (paper §4.3, Fig. 2; §5.1).

Memory stays bounded whatever the corpus, only each token's active experts are formed (never the
N = E^2 grid), and shards built under torchrun merge to exactly one pass. Dense baselines use the same
machinery with a layer as "group" and an MLP neuron as "unit" (`monet.interp.units`).
How it works, what it costs and the on-disk format: docs/atlas.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from monet.checkpoint import check_data_fits, load_checkpoint, resolve_checkpoint, trained_seq_len
from monet.data import TokenDataset
from monet.data.storage import spread_order
from monet.errors import MonetError
from monet.interp.units import batches_of, cut_document, run_windows, units_of
from monet.io import atomic_write, output_directory, sha256_file, write_json
from monet.runtime import distributed, resolve_device, start_distributed
from monet.settings import AtlasBuild, AtlasOptions

FORMAT_VERSION = 2
IMAGE_FORMAT_VERSION = 3                   # format 2 plus image tables (VisionMonet); text-only atlases stay format 2
READABLE_VERSIONS = (1, 2, 3)
CONTEXT_BEFORE = 12
CONTEXT_AFTER = 4
CONTEXT_WIDTH = CONTEXT_BEFORE + 1 + CONTEXT_AFTER
HIST_EDGES = np.logspace(-6.0, 0.0, 41)    # 40 bins of score / H (0.15 decade each); below 1e-6: first bin
BINS_PER_BAND = 4
BAND_EDGES = HIST_EDGES[::BINS_PER_BAND]   # 10 activation bands of 0.6 decade, for the samples
BANDS = len(BAND_EDGES) - 1
BUFFER_ROWS = 4_000_000                    # candidate rows kept before a prune, per group
# The second pass reads the per-token scores of the stored contexts from each batch's routing kept by the first
# (`units.KeptRouting`, ~12 bytes per kept (token, head, half): the demo's 160k tokens take ~0.2 GB) up to this
# many bytes; only the batches beyond it are run through the model again.
KEEP_BYTES = 512 << 20
TABLES = ("experts.parquet", "contexts.parquet", "samples.parquet", "token_index.parquet", "vocab.parquet")
TABLES_V1 = ("experts.parquet", "contexts.parquet", "token_index.parquet", "vocab.parquet")
IMAGE_TABLES = ("image_contexts.parquet", "images.parquet")   # format 3 (monet.interp.image_examples)


# --------------------------------------------------------------------------------------------- top-K

class TopK:
    """The best K (score, doc, pos) of each of N units, with ties broken by the smallest (doc, pos).

    New rows are filtered against a per-unit threshold (the current K-th score; rows equal to it are
    kept, so the result does not depend on the order rows arrive in) and buffered; `prune` sorts table
    and buffer together by (unit, -score, doc, pos) and keeps the first K of each unit.
    """

    def __init__(self, units: int, k: int) -> None:
        self.units, self.k = units, k
        self.unit, self.doc, self.pos = (np.zeros(0, np.int32) for _ in range(3))
        self.score = np.zeros(0, np.float32)
        self.threshold = np.full(units, -np.inf, np.float32)
        self._buffer: list[tuple[np.ndarray, ...]] = []
        self._buffered = 0

    def add(self, unit: np.ndarray, score: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> None:
        """Offer rows (any order)."""
        keep = score >= self.threshold[unit]
        if not keep.any():
            return
        self._buffer.append((unit[keep].astype(np.int32), score[keep].astype(np.float32),
                             doc[keep].astype(np.int32), pos[keep].astype(np.int32)))
        self._buffered += int(keep.sum())
        if self._buffered >= max(BUFFER_ROWS, 2 * self.units):
            self.prune()

    def prune(self) -> None:
        if not self._buffer:
            return
        parts = [(self.unit, self.score, self.doc, self.pos), *self._buffer]
        unit, score, doc, pos = (np.concatenate([p[c] for p in parts]) for c in range(4))
        self._buffer, self._buffered = [], 0
        order = _order(unit, score, doc, pos)
        keep = order[_ranks(unit[order]) < self.k]
        self.unit, self.score, self.doc, self.pos = unit[keep], score[keep], doc[keep], pos[keep]
        full = _ranks(self.unit) == self.k - 1
        self.threshold[self.unit[full]] = self.score[full]

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(unit, rank, score, doc, pos), sorted by (unit, rank)."""
        self.prune()
        return self.unit, _ranks(self.unit).astype(np.int16), self.score, self.doc, self.pos


def _order(unit, score, doc, pos) -> np.ndarray:
    """The permutation sorting rows by (unit, -score, doc, pos): one int64 key (unit, then the float32 score's
    bits made order-preserving and reversed) sorted once, then only runs of equal keys (tied scores)
    re-sorted by (doc, pos) -- the same order as a four-key lexsort, about ten times faster."""
    bits = np.asarray(score, np.float32).view(np.int32).astype(np.int64)
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)          # increasing with the float value
    key = (np.asarray(unit, np.int64) << 32) | ((2**31 - 1) - ordered)
    # Stable (a merge sort): the kept table arrives first, already in key order, and a merge sort runs over
    # it in one pass (about half the time of a quicksort at the demo's 5M rows). The result does not
    # depend on it: ties are ordered by (doc, pos) below.
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    tie = sorted_key[1:] == sorted_key[:-1]
    if tie.any():
        member = np.zeros(len(key), bool)
        member[1:] |= tie
        member[:-1] |= tie
        slots = np.flatnonzero(member)
        rows = order[slots]
        place = (np.asarray(doc, np.int64)[rows] << 32) | np.asarray(pos, np.int64)[rows]
        order[slots] = rows[np.lexsort((place, key[rows]))]
    return order


def _ranks(sorted_units: np.ndarray) -> np.ndarray:
    """Position of each row within its run of equal units (input sorted by unit)."""
    n = len(sorted_units)
    starts = np.ones(n, bool)
    starts[1:] = sorted_units[1:] != sorted_units[:-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n) - first


# ------------------------------------------------------------------------------------- accumulators

class GroupStats:
    """Running aggregates of one routing group (or one dense layer): bounded, mergeable."""

    def __init__(self, units: int, num_labels: int, top_k: int, scale: float, samples: int = 0) -> None:
        self.units, self.scale = units, scale
        self.count = np.zeros(units, np.int64)
        self.mass = np.zeros((num_labels, units), np.float64)
        self.label_count = np.zeros((num_labels, units), np.int64)
        self.hist = np.zeros((units, len(HIST_EDGES) - 1), np.int32)
        self.top = TopK(units, top_k)
        self.samples = samples
        self.sample = TopK(units * BANDS, max(samples, 1))   # unit * bands + band -> S random contexts

    def add(self, unit: np.ndarray, score: np.ndarray, label: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> None:
        """One row per (token, active unit): unit id, score, and the token's label id, document, position."""
        self.count += np.bincount(unit, minlength=self.units)
        cell = label.astype(np.int64) * self.units + unit   # flat index into [labels, units]
        self.mass += np.bincount(cell, weights=score, minlength=self.mass.size).reshape(self.mass.shape)
        # Counts go in place (np.add.at): a bincount over every cell allocates [units, 40] int64 per batch,
        # ten times the work at 2^18 units. The float mass keeps its bincount: the same sums, to the bit.
        np.add.at(self.label_count.reshape(-1), cell, 1)
        share = score / self.scale   # histogram bins of score / H: below the first edge in bin 0, 1.0 in the last
        bins = np.clip(np.searchsorted(HIST_EDGES, share, side="right") - 1, 0, len(HIST_EDGES) - 2)
        flat = unit.astype(np.int64) * (len(HIST_EDGES) - 1) + bins
        np.add.at(self.hist.reshape(-1), flat, np.int32(1))
        self.top.add(unit, score, doc, pos)
        if self.samples:
            self.sample.add(unit.astype(np.int64) * BANDS + bins // BINS_PER_BAND, sample_key(doc, pos, unit),
                            doc, pos)

    def state(self) -> dict[str, np.ndarray]:
        """Everything as named arrays (a shard file); `from_state` reads them back."""
        state = {"count": self.count, "mass": self.mass, "label_count": self.label_count, "hist": self.hist,
                 "samples": np.array(self.samples)}
        for name, table in (("top", self.top), ("sample", self.sample)):
            unit, _, score, doc, pos = table.rows()
            state.update({f"{name}_unit": unit, f"{name}_score": score, f"{name}_doc": doc, f"{name}_pos": pos})
        return state

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], top_k: int, scale: float) -> GroupStats:
        stats = cls(int(state["count"].shape[0]), int(state["mass"].shape[0]), top_k, scale, int(state["samples"]))
        stats.absorb(state)
        return stats

    def absorb(self, state: dict[str, np.ndarray]) -> None:
        """Add another `state` of the same shape (the tables are merged at their next prune)."""
        for name in ("count", "mass", "label_count", "hist"):
            getattr(self, name)[...] += state[name]
        for name, table in (("top", self.top), ("sample", self.sample)):
            table._buffer.append(tuple(state[f"{name}_{c}"] for c in ("unit", "score", "doc", "pos")))

    def requests(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit, doc, pos) of every stored context: the top-K rows, then the sample rows (in `rows()` order)."""
        unit, _, _, doc, pos = self.top.rows()
        s_unit, _, _, s_doc, s_pos = self.sample.rows()   # empty without samples
        return (np.concatenate([unit, s_unit // BANDS]).astype(np.int64),
                np.concatenate([doc, s_doc]).astype(np.int64), np.concatenate([pos, s_pos]).astype(np.int64))


def sample_key(doc: np.ndarray, pos: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """A pseudo-random number in [0, 1) per (document, position, unit) (splitmix64, 24 bits so that float32
    holds it exactly). Keeping the S largest keys of each (unit, band) is a uniform random sample without
    replacement that does not depend on the order rows arrive in, on batching or on sharding."""
    with np.errstate(over="ignore"):
        z = (np.asarray(doc, np.uint64) << np.uint64(32)) ^ np.asarray(pos, np.uint64)
        z = _mix(_mix(z) ^ np.asarray(unit, np.uint64))
    return (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)


def _mix(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def merge(shards: list[GroupStats]) -> GroupStats:
    """Combine the statistics of one group built on disjoint slices of the corpus (sum counts, mass and
    histograms; merge the top-K and sample tables). Two shards give exactly what one pass over both gives."""
    if not shards:
        raise MonetError("nothing to merge: no shards")
    first = shards[0]
    out = GroupStats(first.units, first.mass.shape[0], first.top.k, first.scale, first.samples)
    for shard in shards:
        if (shard.mass.shape, shard.top.k, shard.samples) != (first.mass.shape, first.top.k, first.samples):
            raise MonetError("cannot merge atlas shards of different shapes (units, labels, top-k or samples differ)")
        out.absorb(shard.state())
    return out


# ------------------------------------------------------------------------------------------ windows

def plan_windows(docs: np.ndarray, seq_len: int, max_tokens: int | None) -> np.ndarray:
    """[n, 3] (doc, start, length): every label's documents cut into windows of at most seq_len tokens,
    then taken from whichever label has the fewest tokens so far, until max_tokens tokens are covered (the
    last window may be cut short). A budget smaller than the corpus thus covers every label with about the
    same number of tokens, however long its documents are."""
    per_label: dict[int, list[tuple[int, int, int]]] = {}
    for doc, (start, end, label) in enumerate(docs[:, :3].tolist()):   # stream order within a label
        per_label.setdefault(label, []).extend(cut_document(doc, end - start, seq_len))
    # A budget takes a uniform sample of each label's windows, not its first files by path (issue 23).
    queues = {label: iter([windows[i] for i in spread_order(len(windows))])
              for label, windows in sorted(per_label.items())}
    taken = dict.fromkeys(queues, 0)
    rows, total = [], 0
    while queues and (max_tokens is None or total < max_tokens):
        label = min(queues, key=lambda k: (taken[k], k))    # the label with the fewest tokens so far
        window = next(queues[label], None)
        if window is None:
            del queues[label]
            continue
        take = window[2] if max_tokens is None else min(window[2], max_tokens - total)
        rows.append((window[0], window[1], take))
        taken[label] += take
        total += take
    return np.asarray(rows, np.int64).reshape(-1, 3)


def _chunks(rows: int, size: int = 1 << 20) -> Iterator[slice]:
    """Consecutive slices of at most `size` rows covering range(rows) (bounded memory on large atlases)."""
    return (slice(first, first + size) for first in range(0, rows, size))


# ---------------------------------------------------------------------------------- model identity

_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "auto_map",
    "output_router_probs", "use_cache", "output_hidden_states", "output_attentions", "return_dict",
}


def model_identity(model: torch.nn.Module) -> dict[str, str]:
    """A hash of the model's config and a fingerprint of some weights, to tell atlases of different
    models apart (same shape but other weights included)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state)[:: max(1, len(state) // 16)]:
        tensor = state[name]
        if tensor.is_floating_point() and tensor.numel():
            digest.update(name.encode())
            digest.update(tensor.detach().flatten()[:256].float().cpu().numpy().round(5).tobytes())
    return {"config_hash": config_hash, "weights_fingerprint": digest.hexdigest()[:16]}


# --------------------------------------------------------------------------------------------- build

def collect(model: torch.nn.Module, dataset, options: AtlasOptions, windows: np.ndarray | None = None,
            progress: bool = True, kept: list[Any] | None = None) -> tuple[list[GroupStats], int]:
    """Run the model over the planned windows (or the given ones); returns per-group stats and tokens. With a
    `kept` list, each batch's lookup state (`Units.stream`'s `kept`, within KEEP_BYTES; else None) is appended
    to it, for `fill_values`."""
    units = units_of(model)
    stats = [GroupStats(units.per_group, len(dataset.labels), options.top_k, units.scale, options.samples)
             for _ in range(units.groups)]
    if windows is None:
        windows = plan_windows(dataset.docs, options.seq_len, options.max_tokens)
    label_of_doc = dataset.docs[:, 2].astype(np.int64)
    for batch in units.stream(dataset, windows, options.batch_size, "atlas", progress,
                              keep=KEEP_BYTES if kept is not None else 0):
        if kept is not None:
            kept.append(batch.kept)
        for group, (b, t, unit, score) in zip(stats, batch.groups, strict=True):
            doc = batch.windows[b, 0]
            group.add(unit, score.astype(np.float64), label_of_doc[doc], doc, batch.windows[b, 1] + t)
    return stats, int(windows[:, 2].sum())


def fill_values(model: torch.nn.Module, dataset, options: AtlasOptions, windows: np.ndarray,
                requests: list[tuple[np.ndarray, np.ndarray, np.ndarray]], values: list[np.ndarray],
                progress: bool = True, kept: list[Any] | None = None) -> None:
    """The second pass: per group, write into `values[g]` ([R, CONTEXT_WIDTH], NaN-filled by the caller)
    the score of unit `requests[g][0][r]` at each token around (doc, pos) = requests[g][1:][r] (0 where the
    unit is inactive). Only the batches of `collect` holding a requested position are read, so every value is
    the one the first pass saw, up to the order of the sum over heads; positions outside `windows` stay NaN.
    A batch whose lookup state `collect` kept (`kept[i]` not None) is read from it, with the very numbers a
    rerun gives (no forward pass); the others are run through the model again."""
    offsets = np.arange(-CONTEXT_BEFORE, CONTEXT_AFTER + 1)
    keys = [(doc.astype(np.int64) << 32) | pos.astype(np.int64) for _, doc, pos in requests]
    orders = [np.argsort(key, kind="stable") for key in keys]
    keys = [key[order] for key, order in zip(keys, orders, strict=True)]   # by (doc, pos): a window meets one slice

    def rows_meeting(batch: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per window, the slice [first, last) of `key` whose spans [pos - 12, pos + 4] meet it."""
        doc = batch[:, 0].astype(np.int64) << 32
        low = doc | np.maximum(batch[:, 1] - CONTEXT_AFTER, 0)
        high = doc | (batch[:, 1] + batch[:, 2] + CONTEXT_BEFORE)
        return np.searchsorted(key, low), np.searchsorted(key, high)

    units = units_of(model)
    batches = list(batches_of(windows, options.batch_size))
    needed = [i for i, batch in enumerate(batches)
              if any((last > first).any() for first, last in (rows_meeting(batch, key) for key in keys))]
    kept = kept or []
    stored = [i for i in needed if i < len(kept) and kept[i] is not None]
    rerun = [batches[i] for i in needed if i >= len(kept) or kept[i] is None]

    def lookups() -> Iterator[tuple[np.ndarray, list]]:
        for i in stored:
            yield batches[i], units.stored_lookup(kept[i])
        for batch, input_ids, _ in run_windows(model, dataset, rerun, "atlas values", progress):
            yield batch, units.lookup(input_ids)

    for batch, found in lookups():   # each position lies in one window: the order of the batches is free
        for g, lookup in enumerate(found):
            unit, _, pos = requests[g]
            first, last = rows_meeting(batch, keys[g])
            counts = last - first
            b = np.repeat(np.arange(len(batch)), counts)                 # the window of each meeting
            rows = orders[g][np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())]
            t = pos[rows, None] + offsets - batch[b, 1, None]            # the requests' positions in the window
            r_i, o_i = np.nonzero((t >= 0) & (t < batch[b, 2, None]))
            values[g][rows[r_i], o_i] = lookup(b[r_i], t[r_i, o_i], unit[rows[r_i]])


def label_tokens(dataset, windows: np.ndarray) -> np.ndarray:
    """Tokens processed per label id."""
    labels = dataset.docs[windows[:, 0], 2] if len(windows) else np.zeros(0, np.int64)
    return np.bincount(labels, weights=windows[:, 2], minlength=len(dataset.labels)).astype(np.int64)


def build_atlas(model: torch.nn.Module, tokenizer: Any, settings: AtlasBuild,
                images: Callable[[Path], dict] | None = None) -> Path:
    """Build the atlas of `model` (loaded from `settings.run`, which the manifest records) on the
    `settings.split` split of the dataset at `settings.data` into `settings.out` (through a temporary sibling,
    see `monet.io.output_directory`: a non-empty `out` that is not an atlas is refused unless `settings.force`).
    Windows of `settings.seq_len` tokens, by default the run's training length. Under torchrun each rank runs a
    contiguous slice of the windows; rank 0 merges. `images` (a VisionMonet's image examples,
    `monet.interp.image_examples.vision_atlas_parts`) writes the IMAGE_TABLES into the atlas directory on rank 0
    and returns the manifest's "images" section (format 3)."""
    options = settings.options()
    if options.seq_len is None:
        options.seq_len = trained_seq_len(settings.run, model)
    data_dir, out, force, progress, run = settings.data, settings.out, settings.force, not settings.quiet, settings.run
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and options.seq_len > limit:
        raise MonetError(f"--seq-len {options.seq_len} exceeds the model's max_position_embeddings {limit}")
    dataset = TokenDataset(data_dir, options.split)
    if dataset.num_tokens == 0:
        raise MonetError(f"the {options.split} split of {data_dir} is empty; use --split train or a larger corpus")
    if dataset.vocab_size > model.config.vocab_size:
        raise MonetError(f"dataset vocabulary ({dataset.vocab_size}) is larger than the model's "
                         f"({model.config.vocab_size}): was the model trained on this data?")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    windows = plan_windows(dataset.docs, options.seq_len, options.max_tokens)
    mine = np.array_split(windows, world)[rank]
    show = progress and rank == 0
    started = time.time()
    seconds: dict[str, float] = {}
    writer = output_directory(out, "atlas build", force, "an atlas", replace_own=False)
    with writer if rank == 0 else contextlib.nullcontext() as tmp:
        box = [str(tmp) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        shards = Path(box[0]) / "shards"
        kept: list[Any] = []
        stats, _ = collect(model, dataset, options, mine, progress=show, kept=kept)
        if world > 1:   # rank 0 merges the shards; every rank then reads the merged stored contexts
            save_shard(shards / f"rank-{rank:05d}.npz", stats)
            dist.barrier()
            if rank == 0:
                loaded = [load_shard(shards / f"rank-{r:05d}.npz", options.top_k, stats[0].scale)
                          for r in range(world)]
                stats = [merge(list(group)) for group in zip(*loaded, strict=True)]
                arrays = {f"g{g}_{c}": a for g, s in enumerate(stats) for c, a in zip("udp", s.requests(), strict=True)}
                atomic_write(shards / "requests.npz", lambda handle: np.savez(handle, **arrays))
            dist.barrier()
            with np.load(shards / "requests.npz") as data:
                requests = [tuple(data[f"g{g}_{c}"] for c in "udp") for g in range(len(stats))]
        else:
            requests = [s.requests() for s in stats]
        seconds["statistics"] = time.time() - started
        values = [_values_array(shards / f"values-{rank:05d}-{g}.npy", len(r[0])) for g, r in enumerate(requests)]
        fill_values(model, dataset, options, mine, requests, values, progress=show, kept=kept)
        del kept
        if world > 1:
            for array in values:
                array.flush()
            del values
            dist.barrier()
            if rank != 0:
                return Path(out)
            values = [_values_array(shards / f"values-{g}.npy", len(r[0])) for g, r in enumerate(requests)]
            for r in range(world):   # each position lies in one window, so exactly one rank filled it
                for g, array in enumerate(values):
                    part = np.load(shards / f"values-{r:05d}-{g}.npy", mmap_mode="r")
                    for chunk in _chunks(len(array)):
                        np.copyto(array[chunk], part[chunk], where=~np.isnan(part[chunk]))
        seconds["values"] = time.time() - started - sum(seconds.values())
        manifest = _manifest(model, dataset, data_dir, options, windows, run)
        write_tables(tmp, stats, dataset, tokenizer, manifest, values, progress=progress)
        del values
        shutil.rmtree(shards, ignore_errors=True)
        seconds["write"] = time.time() - started - sum(seconds.values())
        tables = TABLES
        if images is not None:
            manifest.update(format_version=IMAGE_FORMAT_VERSION, images=images(Path(tmp)))
            seconds["images"] = time.time() - started - sum(seconds.values())
            tables = TABLES + IMAGE_TABLES
        manifest["build_seconds"] = round(time.time() - started, 1)
        manifest["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
        manifest["tables"] = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                              for name in tables}
        write_json(tmp / "manifest.json", manifest)
    return Path(out)


def _values_array(path: Path, rows: int) -> np.ndarray:
    """A NaN-filled float32 [rows, context width] array backed by a file (bounded memory for large atlases)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, CONTEXT_WIDTH))
    array[:] = np.nan
    return array


# A VisionMonet's loader for `build_atlas_command`: (settings, checkpoint, device) -> (its language model, tokenizer,
# the writer of the image tables or None); `monet.interp.image_examples.vision_atlas_parts`, which the CLI passes.
VisionLoader = Callable[[AtlasBuild, Path, Any], tuple[torch.nn.Module, Any, Callable[[Path], dict] | None]]


def build_atlas_command(cmd: AtlasBuild, vision: VisionLoader | None = None) -> Path:
    """`monet atlas build`: load the run (under torchrun: start the process group, one device per rank),
    check that the data was tokenized for it, build, and print a summary line. A VisionMonet checkpoint is
    loaded by `vision` (the text atlas of its language model, plus its image tokens with --images)."""
    _, _, device = start_distributed(resolve_device(cmd.device))
    checkpoint = resolve_checkpoint(cmd.run, verify=not cmd.no_verify)
    images = None
    if _model_type(checkpoint) == "vision_monet":
        if vision is None:
            raise MonetError(f"{checkpoint} is a VisionMonet checkpoint: build its atlas with `monet atlas build`, or "
                             "pass vision=monet.interp.image_examples.vision_atlas_parts")
        model, tokenizer, images = vision(cmd, checkpoint, device)
    else:
        if cmd.images is not None:
            raise MonetError(f"--images records image examples of a VisionMonet checkpoint; {checkpoint} is a "
                             "text-only model (train one with `monet vision train`, docs/vision.md)")
        check_data_fits(checkpoint, cmd.data)
        model, tokenizer = load_checkpoint(checkpoint, device=device, verify=False)
    out = build_atlas(model, tokenizer, cmd, images=images)
    if not distributed() or dist.get_rank() == 0:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        shown = f", {manifest['images']['images']:,} images" if manifest.get("images") else ""
        print(f"wrote {out}: {manifest['tokens']:,} tokens{shown}, {manifest['groups']} groups x "
              f"{manifest['units_per_group']:,} experts, labels {', '.join(manifest['labels'])} "
              f"({manifest['build_seconds']} s)")
    return out


def _model_type(checkpoint: Path) -> str | None:
    """config.json's model_type (None when unreadable: `load_checkpoint` then says what is wrong)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((checkpoint / "config.json").read_text(encoding="utf-8")).get("model_type")
    return None


def save_shard(path: Path, stats: list[GroupStats]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"g{g}_{k}": v for g, s in enumerate(stats) for k, v in s.state().items()}
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def load_shard(path: Path, top_k: int, scale: float) -> list[GroupStats]:
    with np.load(path) as data:
        groups = sorted({int(k.split("_")[0][1:]) for k in data.files})
        return [GroupStats.from_state({k.split("_", 1)[1]: data[k] for k in data.files if k.startswith(f"g{g}_")},
                                      top_k, scale) for g in groups]


def _manifest(model, dataset, data_dir, options, windows, run) -> dict:
    config = model.config
    units = units_of(model)
    return {
        "format_version": FORMAT_VERSION,
        "kind": units.kind,
        "model": {**model_identity(model), "run": str(run) if run else None,
                  "name_or_path": getattr(config, "_name_or_path", "") or None},
        "data": {"dir": str(Path(data_dir).resolve()), "split": options.split,
                 "source": dataset.manifest.get("source"),
                 "tokenizer_sha256": dataset.manifest.get("tokenizer_sha256")},
        "labels": list(dataset.labels),
        "label_tokens": label_tokens(dataset, windows).tolist(),
        "tokens": int(windows[:, 2].sum()),
        "documents": len(np.unique(windows[:, 0])),
        "groups": units.groups,
        "units_per_group": units.per_group,
        **units.layout_fields(),
        "score_scale": units.scale,
        "hist_edges": HIST_EDGES.tolist(),
        "bands": {"edges": BAND_EDGES.tolist(), "bins_per_band": BINS_PER_BAND, "samples": options.samples},
        "context": {"before": CONTEXT_BEFORE, "after": CONTEXT_AFTER},
        "options": asdict(options),
    }


# --------------------------------------------------------------------------------------------- write

def context_windows(dataset, doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """[n, before + 1 + after] token ids around (doc, pos), -1 outside the document."""
    offsets = np.arange(-CONTEXT_BEFORE, CONTEXT_AFTER + 1)
    start, end = dataset.docs[doc, 0], dataset.docs[doc, 1]
    where = start[:, None] + pos[:, None] + offsets[None]
    inside = (where >= start[:, None]) & (where < end[:, None])
    tokens = np.asarray(dataset.tokens)[np.where(inside, where, 0)].astype(np.int32)
    return np.where(inside, tokens, -1)


def write_tables(directory: Path, stats: list[GroupStats], dataset, tokenizer, manifest: dict,
                 values: list[np.ndarray], progress: bool = True) -> None:
    """Write the Parquet tables; `values[g]` holds the per-token scores of group g's stored contexts (the rows
    of `GroupStats.requests`: top-K rows first, then sample rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = manifest["labels"]
    tokens = max(manifest["tokens"], 1)
    expert_tables, token_rows = [], []
    with pq.ParquetWriter(directory / "contexts.parquet", _contexts_schema()) as writer, \
            pq.ParquetWriter(directory / "samples.parquet", _contexts_schema(sample=True)) as sample_writer:
        for group, s in enumerate(tqdm(stats, desc="writing atlas", disable=not progress)):
            unit, rank, score, doc, pos = s.top.rows()
            max_score = np.zeros(s.units, np.float32)
            max_score[unit[rank == 0]] = score[rank == 0]
            total = s.mass.sum(axis=0)
            columns = {
                "group": np.full(s.units, group, np.int16), "expert": np.arange(s.units, dtype=np.int32),
                "count": s.count, "score_sum": total, "density": (s.count / tokens).astype(np.float32),
                "mean_score": (total / np.maximum(s.count, 1)).astype(np.float32), "max_score": max_score,
            }
            columns.update({f"mass_{label}": s.mass[i] for i, label in enumerate(labels)})
            columns.update({f"count_{label}": s.label_count[i] for i, label in enumerate(labels)})
            columns.update({f"hist_{b:02d}": s.hist[:, b] for b in range(s.hist.shape[1])})
            expert_tables.append(pa.table(columns))
            token = np.asarray(dataset.tokens)[dataset.docs[doc, 0] + pos]   # where each top context activates
            token_rows.append((np.full(len(unit), group), unit, token, score))
            s_unit, s_rank, _, s_doc, s_pos = s.sample.rows()   # empty without samples
            parts = [(writer, unit, rank, doc, pos, None, values[group][:len(unit)]),
                     (sample_writer, s_unit // BANDS, s_rank, s_doc, s_pos, (s_unit % BANDS).astype(np.int8),
                      values[group][len(unit):])]
            for out, units, ranks, docs, positions, band, stored in parts:
                for part in _chunks(len(units)):
                    vals = np.array(stored[part])
                    if band is None:   # a top context keeps its recorded score (the same number, by construction)
                        vals[:, CONTEXT_BEFORE] = score[part]
                    table = _context_table(dataset, group, units[part], ranks[part], docs[part], positions[part],
                                           vals, None if band is None else band[part])
                    out.write_table(table, row_group_size=32_768)
    pq.write_table(pa.concat_tables(expert_tables), directory / "experts.parquet", row_group_size=65_536)
    pq.write_table(_token_index(token_rows), directory / "token_index.parquet", row_group_size=32_768)
    pq.write_table(vocab_table(tokenizer, dataset.vocab_size), directory / "vocab.parquet")


def _context_table(dataset, group: int, unit, rank, doc, pos, values: np.ndarray, band=None):
    """Rows of contexts.parquet, or of samples.parquet with `band`; the score is `values` at the activating token."""
    import pyarrow as pa

    windows = context_windows(dataset, doc, pos)
    values = np.where(windows >= 0, values, np.nan).astype(np.float32)
    flat = values.reshape(-1)
    columns = {
        "group": np.full(len(windows), group, np.int16), "expert": unit.astype(np.int32),
        "rank": rank.astype(np.int16), "doc": doc, "pos": pos, "score": values[:, CONTEXT_BEFORE],
        "label": dataset.docs[doc, 2].astype(np.int16), "token": windows[:, CONTEXT_BEFORE],
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(windows.reshape(-1)), CONTEXT_WIDTH),
        "values": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32(), mask=np.isnan(flat)), CONTEXT_WIDTH),
    }
    if band is not None:
        columns = {"band": band, **columns}
    return pa.table(columns, schema=_contexts_schema(sample=band is not None))


def _contexts_schema(sample: bool = False):
    import pyarrow as pa

    fields = [("group", pa.int16()), ("expert", pa.int32()), ("rank", pa.int16()), ("doc", pa.int32()),
              ("pos", pa.int32()), ("score", pa.float32()), ("label", pa.int16()), ("token", pa.int32()),
              ("tokens", pa.list_(pa.int32(), CONTEXT_WIDTH)), ("values", pa.list_(pa.float32(), CONTEXT_WIDTH))]
    if sample:
        fields.insert(2, ("band", pa.int8()))
    return pa.schema(fields)


def _token_index(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]):
    """(token, group, expert) -> how many of the expert's top contexts activate on that token; `rows` holds
    (group, expert, token, score) arrays."""
    import pyarrow as pa

    empty = [np.zeros(0, np.int64)]
    group, unit, token = (np.concatenate([r[c] for r in rows] + empty).astype(np.int64) for c in range(3))
    score = np.concatenate([r[3] for r in rows] + empty).astype(np.float64)
    order = np.lexsort((unit, group, token))
    group, unit, token, score = group[order], unit[order], token[order], score[order]
    starts = np.ones(len(order), bool)
    starts[1:] = (token[1:] != token[:-1]) | (group[1:] != group[:-1]) | (unit[1:] != unit[:-1])
    first = np.flatnonzero(starts)
    contexts = np.diff(np.append(first, len(order)))
    sums = np.add.reduceat(score, first) if len(first) else np.zeros(0)
    maxes = np.maximum.reduceat(score, first) if len(first) else np.zeros(0)
    return pa.table({"token": token[first].astype(np.int32), "group": group[first].astype(np.int16),
                     "expert": unit[first].astype(np.int32), "contexts": contexts.astype(np.int32),
                     "max_score": maxes.astype(np.float32), "sum_score": sums.astype(np.float32)})


def vocab_table(tokenizer: Any, vocab_size: int):
    """Token id -> the text it decodes to on its own (byte-level pieces of a character may show as \ufffd)."""
    import pyarrow as pa

    if tokenizer is None:
        pieces = [f"<{i}>" for i in range(vocab_size)]
    else:
        pieces = tokenizer.batch_decode([[i] for i in range(max(vocab_size, len(tokenizer)))],
                                        skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return pa.table({"id": np.arange(len(pieces), dtype=np.int32), "piece": pa.array(pieces, pa.string())})


__all__ = ["AtlasOptions", "GroupStats", "TopK", "build_atlas", "collect", "context_windows", "merge", "model_identity",
           "plan_windows"]
