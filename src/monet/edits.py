"""Editing a Monet model's knowledge: delete (mask) or steer (scale) experts, in factored form.

An edit says, per routing group g, how much of each expert (g, i*E + j)'s term g1_hi g2_hj E_ij(x) to
keep: alpha = 0 deletes it, 0 < alpha < 1 damps it, alpha > 1 amplifies it (steering). Whole bottom
halves (every expert with that i) or top halves (every expert with that j) can be scaled at once.
Alphas that meet on one expert multiply.

`apply_edits` turns an `ExpertEdits` into one [E*E] `edit_weights` table (1 - alpha per expert) per routing
group, held by the group's router and passed down its layers (`monet.model.RoutingGroup`). The table is
per model, never per token, and the forward pass only looks up each token's active pairs, so an edited
model costs little more than a plain one in training, evaluation and KV-cache generation alike.

    edits = ExpertEdits().delete(0, [1234, 99]).scale(1, 77, 2.0)
    with edited(model, edits):          # temporary; the previous state comes back afterwards
        loss = model(ids, labels=ids).loss
    apply_edits(model, edits)           # persistent: saved by save_pretrained, reloaded by from_pretrained

Edits persist in `expert_edits.safetensors` beside `model.safetensors` (sparse, under each layer), with the
model shape they belong to, so a mask made for another model is refused instead of scaling the wrong experts.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from monet.errors import MonetError
from monet.io import atomic_write

EXPERT_EDITS_FILE = "expert_edits.safetensors"   # beside model.safetensors
MAX_REMOVAL = 1e6   # |1 - alpha| of a saved edit: larger values only turn activations into inf / NaN
EDITS_FORMAT = "monet-expert-edits"
EDITS_VERSION = "1"


@dataclass
class ExpertEdits:
    """Per routing group: {expert id: alpha}, {bottom half i: alpha}, {top half j: alpha}, and
    {(i, j): alpha} for experts named by their halves (turned into ids i*E + j once E is known).

    `num_experts` (E per side) and `num_groups`, when known (e.g. from a selection made on a model),
    let `apply_edits` refuse edits made for a model of another shape.
    """

    experts: dict[int, dict[int, float]] = field(default_factory=dict)
    bottom: dict[int, dict[int, float]] = field(default_factory=dict)
    top: dict[int, dict[int, float]] = field(default_factory=dict)
    pairs: dict[int, dict[tuple[int, int], float]] = field(default_factory=dict)
    num_experts: int | None = None
    num_groups: int | None = None

    def scale(self, group: int, expert: int, alpha: float) -> ExpertEdits:
        """Keep alpha times expert (group, expert id)'s term (0 deletes, > 1 amplifies)."""
        _set(self.experts, group, expert, alpha)
        return self

    def delete(self, group: int, experts: Iterable[int]) -> ExpertEdits:
        """Delete experts (group, id) for every id in `experts`."""
        for expert in experts:
            _set(self.experts, group, int(expert), 0.0)
        return self

    def scale_pair(self, group: int, i: int, j: int, alpha: float) -> ExpertEdits:
        """Scale expert (i, j) of the group (id i*E + j)."""
        _set(self.pairs, group, (i, j), alpha)
        return self

    def scale_bottom(self, group: int, half: int, alpha: float) -> ExpertEdits:
        """Scale every expert (i, j) of the group with i == half."""
        _set(self.bottom, group, half, alpha)
        return self

    def scale_top(self, group: int, half: int, alpha: float) -> ExpertEdits:
        """Scale every expert (i, j) of the group with j == half."""
        _set(self.top, group, half, alpha)
        return self

    def merge(self, other: ExpertEdits) -> ExpertEdits:
        """A new edit applying both (alphas on the same expert or half multiply)."""
        out = ExpertEdits(num_experts=self.num_experts or other.num_experts,
                          num_groups=self.num_groups or other.num_groups)
        for source in (self, other):
            for name in ("experts", "bottom", "top", "pairs"):
                for group, entries in getattr(source, name).items():
                    target = getattr(out, name).setdefault(group, {})
                    for index, alpha in entries.items():
                        target[index] = target.get(index, 1.0) * alpha
        return out

    @property
    def groups(self) -> list[int]:
        return sorted(set(self.experts) | set(self.bottom) | set(self.top) | set(self.pairs))

    def table(self, group: int, num_experts: int) -> torch.Tensor | None:
        """The group's removal table [E*E] (float32; 1 - alpha per expert), or None when nothing is edited."""
        entries, bottom, top = self.experts.get(group, {}), self.bottom.get(group, {}), self.top.get(group, {})
        pairs = self.pairs.get(group, {})
        if pairs:
            entries = dict(entries)   # pair edits are folded in below; the stored edits stay as they are
        for (i, j), alpha in pairs.items():
            _check_index(i, num_experts, f"bottom index of group {group}")
            _check_index(j, num_experts, f"top index of group {group}")
            entries[i * num_experts + j] = entries.get(i * num_experts + j, 1.0) * alpha
        if not entries and not bottom and not top:
            return None
        keep = torch.ones(num_experts, num_experts, dtype=torch.float64)   # [i, j]
        for i, alpha in bottom.items():
            _check_index(i, num_experts, f"bottom half of group {group}")
            keep[i] *= alpha
        for j, alpha in top.items():
            _check_index(j, num_experts, f"top half of group {group}")
            keep[:, j] *= alpha
        keep = keep.flatten()
        if entries:
            # From arrays, not lists: the unlearning control builds tables of ~10^4 entries for every mask.
            index = torch.from_numpy(np.fromiter(entries, dtype=np.int64, count=len(entries)))
            alpha = torch.from_numpy(np.fromiter(entries.values(), dtype=np.float64, count=len(entries)))
            for extreme in (int(index.min()), int(index.max())):
                _check_index(extreme, num_experts * num_experts, f"expert id in group {group}")
            keep[index] *= alpha
        return (1.0 - keep).float()


def _integer(value: Any, what: str) -> int:
    try:
        number = operator.index(value)   # int, numpy integer, 0-d integer tensor; not floats
    except TypeError:
        number = -1
    if number < 0:
        raise MonetError(f"{what} must be a non-negative integer, got {value!r}")
    return number


def _set(store: dict, group: int, index: int | tuple[int, int], alpha: float) -> None:
    """Set (replace) one alpha; groups and indices are validated, ranges are checked once E is known."""
    group = _integer(group, "routing group")
    if isinstance(index, tuple):
        index = tuple(_integer(v, "expert half index") for v in index)
    else:
        index = _integer(index, "expert id / half index")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise MonetError(f"steering coefficient for ({group}, {index}) must be finite, got {alpha}")
    store.setdefault(group, {})[index] = alpha


def _check_index(index: int, size: int, what: str) -> None:
    if not 0 <= index < size:
        raise MonetError(f"{what} {index} is out of range [0, {size}) for this model; was the edit made for "
                         "another model (different moe_experts)?")


# ----------------------------------------------------------------------------------------------------------
# The model's routing groups (one edit table each, held by the group's router)


def group_routers(model: nn.Module) -> list[nn.Module]:
    """The router of every routing group, in group order: it holds the group's edit table `edit_weights`
    (see `monet.model.RoutingGroup`). Found by that attribute, which keeps this module free of the model classes."""
    found = sorted(((layer.layer_idx, layer.router) for layer in model.modules()
                    if hasattr(layer, "layer_idx") and hasattr(getattr(layer, "router", None), "edit_weights")),
                   key=lambda item: item[0])
    if not found:
        raise MonetError("this model has no Monet expert layers (a dense or PEER baseline?); expert edits need "
                         "mlp_type='monet' — mask a dense model's neurons with monet.edits.neuron_masks")
    return [router for _, router in found]


def model_shape(model: nn.Module) -> tuple[int, int, int]:
    """(E per side, routing groups, layers per group) of a Monet model."""
    config = model.config
    return int(config.moe_experts), len(group_routers(model)), int(config.moe_groups)


def check_fits(model: nn.Module, edits: ExpertEdits) -> None:
    """MonetError when `edits` were made for a model of another shape or name groups it lacks."""
    experts, groups, _ = model_shape(model)
    if edits.num_experts is not None and edits.num_experts != experts:
        raise MonetError(f"these expert edits were made for a model with {edits.num_experts} experts per side, "
                         f"this model has {experts}: select the experts again on this model (e.g. a new atlas)")
    if edits.num_groups is not None and edits.num_groups != groups:
        raise MonetError(f"these expert edits were made for a model with {edits.num_groups} routing groups, "
                         f"this model has {groups}: select the experts again on this model")
    for group in edits.groups:
        if group >= groups:
            raise MonetError(f"routing group {group} does not exist: this model has groups 0..{groups - 1}")


def current_weights(model: nn.Module) -> dict[int, torch.Tensor | None]:
    """Each routing group's edit table (None where unedited), by group."""
    return dict(enumerate(router.edit_weights for router in group_routers(model)))


def apply_edits(model: nn.Module, edits: ExpertEdits, replace: bool = False) -> nn.Module:
    """Edit the model in place (persistent until `clear_edits`); returns the model.

    Edits compose with those already applied (kept fractions multiply: a deleted expert stays deleted)
    unless `replace`, which first clears every existing edit.
    """
    check_fits(model, edits)
    experts = int(model.config.moe_experts)
    _compose(model, {group: edits.table(group, experts) for group in edits.groups}, replace)
    return model


def _compose(model: nn.Module, tables: dict[int, torch.Tensor | None], replace: bool) -> None:
    """Apply removal tables (by group) after the current ones, or instead of them with `replace`:
    kept fractions multiply, 1 - (1 - old)(1 - new)."""
    for group, router in enumerate(group_routers(model)):
        old, new = None if replace else router.edit_weights, tables.get(group)
        if new is not None:
            new = new.to(next(router.parameters()).device)
            if old is not None:
                new = 1.0 - (1.0 - old) * (1.0 - new.to(old.dtype))
        router.edit_weights = old if new is None else new


def clear_edits(model: nn.Module) -> nn.Module:
    """Remove every expert edit (the model computes its original function again)."""
    _compose(model, {}, replace=True)
    return model


@contextmanager
def edited(model: nn.Module, edits: ExpertEdits, replace: bool = False) -> Iterator[nn.Module]:
    """Apply `edits` inside the block; the previous edit tables come back afterwards, even on error."""
    saved = current_weights(model)
    try:
        yield apply_edits(model, edits, replace=replace)
    finally:
        _compose(model, saved, replace=True)


def masking_ratio(model: nn.Module) -> float:
    """Share of all groups x N experts whose term is fully removed (edit weight 1)."""
    experts, groups, _ = model_shape(model)
    deleted = sum(int((table >= 1.0).sum()) for table in current_weights(model).values() if table is not None)
    return deleted / (groups * experts * experts)


# ----------------------------------------------------------------------------------------------------------
# A dense baseline's MLP neurons, deleted for a measurement (`monet.interp.units` picks this or experts)


@contextmanager
def neuron_masks(model: nn.Module, neurons: dict[int, np.ndarray]) -> Iterator[nn.Module]:
    """Zero the chosen hidden neurons of a dense model's MLPs (layer -> neuron ids) inside the block.

    A forward pre-hook on each layer's `down_proj` multiplies its input, act(gate(x)) * up(x), by a 0/1
    mask, so the neurons contribute nothing (and get no gradient).
    """
    layers = model.model.layers
    handles = []
    try:
        for index, ids in neurons.items():
            mlp = getattr(layers[index], "mlp", None) if 0 <= index < len(layers) else None
            if not hasattr(mlp, "down_proj"):
                raise MonetError(f"layer {index} has no dense MLP: neuron masks need an mlp_type='dense' model")
            if len(ids) == 0:
                continue
            width = mlp.down_proj.in_features
            if int(np.max(ids)) >= width or int(np.min(ids)) < 0:
                raise MonetError(f"neuron ids of layer {index} must lie in [0, {width})")
            keep = torch.ones(width, dtype=mlp.down_proj.weight.dtype, device=mlp.down_proj.weight.device)
            keep[torch.as_tensor(np.asarray(ids), dtype=torch.long)] = 0.0

            def hook(module, args, keep=keep):
                return (args[0] * keep.to(args[0].dtype),) + tuple(args[1:])

            handles.append(mlp.down_proj.register_forward_pre_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------------
# Persistence (expert_edits.safetensors beside the weights)


def edits_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / EXPERT_EDITS_FILE


def save_edits(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's edit tables, sparse (ids + removal fractions), atomically. The format keeps one entry
    per decoder layer (the group's table under each of its layers), as written before tables were per group."""
    experts, groups, per_group = model_shape(model)
    tensors: dict[str, torch.Tensor] = {}
    for group, table in current_weights(model).items():
        if table is None:
            continue
        table = table.detach().float().cpu()
        ids = torch.nonzero(table).flatten()
        for index in model.config.group_layers(group):   # a copy each: safetensors refuses shared storage
            tensors[f"layers.{index}.ids"] = ids.to(torch.int64).clone()
            tensors[f"layers.{index}.removal"] = table[ids].clone()
    metadata = {"format": EDITS_FORMAT, "version": EDITS_VERSION, "moe_experts": str(experts),
                "routing_groups": str(groups), "moe_groups": str(per_group),
                "num_layers": str(model.config.num_hidden_layers)}
    path = edits_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(save(tensors, metadata=metadata)))
    return path


def load_edits(model: nn.Module, directory: str | os.PathLike, replace: bool = True) -> nn.Module:
    """Set the model's edit tables from `expert_edits.safetensors` (a checkpoint directory or the file).

    With `replace` (the default, as `from_pretrained` does) current edits are dropped first; otherwise the
    loaded edits compose with them.
    """
    _compose(model, read_edit_tables(model, directory), replace)
    return model


def read_edit_tables(model: nn.Module, directory: str | os.PathLike) -> dict[int, torch.Tensor]:
    """Routing group -> removal table [E*E] from an edits file, checked against the model's shape (the layers
    of a group must hold the same edits)."""
    path = edits_path(directory) if Path(directory).is_dir() else Path(directory)
    if not path.is_file():
        raise MonetError(f"no expert edits file at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise MonetError(f"{path} is corrupt or not a safetensors file ({exc}); delete or re-save it") from exc
    if metadata.get("format") != EDITS_FORMAT:
        raise MonetError(f"{path} is not a Monet expert-edits file (format {metadata.get('format')!r})")
    experts, groups, per_group = model_shape(model)
    config = model.config
    saved = tuple(map(metadata.get, ("moe_experts", "routing_groups", "moe_groups", "num_layers")))
    if saved != (str(experts), str(groups), str(per_group), str(config.num_hidden_layers)):
        raise MonetError(
            f"{path} was saved for a model with moe_experts={saved[0]}, {saved[1]} routing groups of {saved[2]} "
            f"layers, {saved[3]} expert layers; this model has moe_experts={experts}, {groups} groups of "
            f"{per_group}, {config.num_hidden_layers} layers: these edits belong to another model"
        )
    layers = {index: _layer_table(path, tensors, index, experts) for index in range(config.num_hidden_layers)}
    weights: dict[int, torch.Tensor] = {}
    for group, router in enumerate(group_routers(model)):
        first, *rest = (layers[index] for index in config.group_layers(group))
        if any((table is None) != (first is None) or (first is not None and not torch.equal(table, first))
               for table in rest):
            raise MonetError(f"{path}: the layers of routing group {group} hold different edits; edits are per "
                             "routing group (give every layer of the group the same ids and values)")
        if first is not None:
            weights[group] = first.to(next(router.parameters()).device)
    return weights


def _layer_table(path: Path, tensors: dict[str, torch.Tensor], index: int, experts: int) -> torch.Tensor | None:
    """The removal table [E*E] stored under decoder layer `index` of an edits file, validated (None: absent)."""
    ids, removal = tensors.get(f"layers.{index}.ids"), tensors.get(f"layers.{index}.removal")
    if ids is None and removal is None:
        return None
    if ids is None or removal is None or ids.shape != removal.shape or ids.dim() != 1:
        raise MonetError(f"{path}: layer {index} has malformed edit tensors; re-save the edits")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= experts * experts):
        raise MonetError(f"{path}: layer {index} names expert ids outside [0, {experts * experts})")
    if removal.numel() and not bool((removal.float().abs() <= MAX_REMOVAL).all()):   # NaN fails too
        raise MonetError(f"{path}: layer {index} holds edit values that are NaN, infinite or beyond "
                         f"{MAX_REMOVAL:g}; re-save the edits")
    table = torch.zeros(experts * experts, dtype=torch.float32)
    table[ids.long()] = removal.float()
    return table


# ----------------------------------------------------------------------------------------------------------
# Steering from the command line: --steer G:ID=ALPHA


def parse_steer(specs: str | Iterable[str]) -> ExpertEdits:
    """Parse `G:ID=ALPHA` (expert id i*E + j of routing group G), `G:ID` (delete, alpha 0),
    `G:I,J=ALPHA` (expert (i, j)), `G:bottom:I=ALPHA` or `G:top:J=ALPHA` (a whole half).
    A list of specs (a repeated `--steer`) gives one edit with all of them; naming one expert or half twice
    is refused rather than letting the last one win silently."""
    edits = ExpertEdits()
    seen: dict[str, str] = {}
    for spec in [specs] if isinstance(specs, str) else specs:
        where, sep, value = spec.strip().partition("=")
        parts = [p.strip() for p in where.split(":")]
        if ":".join(parts) in seen:
            raise MonetError(f"--steer names {':'.join(parts)} twice ({seen[':'.join(parts)]!r} and {spec!r}); "
                             "give each expert or half once")
        seen[":".join(parts)] = spec
        try:
            alpha = float(value) if sep else 0.0
            if len(parts) == 2 and "," in parts[1]:
                i, j = (int(x) for x in parts[1].split(","))
                edits.scale_pair(int(parts[0]), i, j, alpha)
            elif len(parts) == 2:
                edits.scale(int(parts[0]), int(parts[1]), alpha)
            elif len(parts) == 3 and parts[1] in ("bottom", "top"):
                getattr(edits, f"scale_{parts[1]}")(int(parts[0]), int(parts[2]), alpha)
            else:
                raise ValueError(spec)
        except ValueError:
            raise MonetError(f"cannot parse --steer {spec!r}; expected G:ID=ALPHA (e.g. 0:12345=0 deletes expert "
                             "12345 of group 0, 1:7=2.5 amplifies), G:I,J=ALPHA, G:bottom:I=ALPHA or G:top:J=ALPHA"
                             ) from None
    return edits


def apply_steering(model: nn.Module, steer: Iterable[str] = (), edits_file: str | os.PathLike | None = None
                   ) -> nn.Module:
    """Apply an edits file (`expert_edits.safetensors`), then `G:ID=ALPHA` specs (see `parse_steer`),
    composing with the edits already applied (what `monet generate --edits F --steer ...` does)."""
    if edits_file:
        load_edits(model, edits_file, replace=False)
    steer = list(steer)
    if steer:
        apply_edits(model, parse_steer(steer))
    return model


__all__ = ["EXPERT_EDITS_FILE", "ExpertEdits", "apply_edits", "apply_steering", "check_fits", "clear_edits",
           "current_weights", "edited", "group_routers", "load_edits", "masking_ratio", "model_shape",
           "neuron_masks", "parse_steer", "read_edit_tables", "save_edits"]
