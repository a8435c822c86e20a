"""Units: what the interpretation tools read, select and mask, behind one interface.

A "unit" is a Monet expert of a routing group (id i*E + j, score sum_h g1_hi g2_hj, paper Eq. 3-4) or a
dense baseline's MLP neuron of a layer (score max(act(gate x) * up x, 0)); a "group" is a routing group or a
layer. `units_of(model)` is the one place that tells the two apart: the atlas, the probes, the toxicity
correlations, unlearning and the monosemanticity measures only see a `Units` -- its layout, the layers of a
group, each batch's active units (ragged: memory follows the active units, never the N = E^2 grid), score
lookups, and `masked(selection)`. A third kind (SAE latents) is one more subclass and one more line in
`units_of`.

Windows are (doc, start, length) rows of a `TokenDataset` split; `run_windows` runs them through a model in
batches (right-padded, in the given order) and `Units.stream` yields each batch's active units on its real
tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from monet.edits import ExpertEdits, edited, neuron_masks
from monet.errors import MonetError
from monet.interp.capture import RoutingCapture, capture_routing
from monet.model import MonetRouter, expert_output

# Per group, a score lookup: (b, t, unit) arrays -> the unit's score at those tokens (0 where inactive).
Lookup = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class UnitBatch:
    """One batch of windows run through the model: the windows [B, 3] (doc, start, length), the real tokens'
    mask [B, T], and per group the active units on real tokens as flat arrays (b, t, unit id int64, score
    float32), grouped by token in row-major order (in no order within a token). `kept`: what `Units.stored_lookup`
    needs to answer score lookups on this batch without running the model again (`stream`'s `keep`), or None."""

    windows: np.ndarray
    valid: np.ndarray
    groups: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    kept: Any = None


class Units:
    """The units of one model, grouped; see the module docstring. Subclasses fill in the layout and the reads."""

    kind: str = ""          # the atlas manifest's "kind"
    groups: int             # routing groups (Monet) or layers (dense)
    per_group: int          # units per group
    scale: float            # a score divided by it is a share of 1 (Monet: H heads each spread 1 over experts)
    # What the tools may offer for this kind; read from the class, so an atlas's manifest is enough (`kind_of`).
    group_word: str = "group"   # what a group is called in reports
    unit_word: str = "unit"     # ... and a unit
    score_word: str = "of its scale"   # what a score as a percentage of `scale` is (the viewer's "12% ...")
    steerable: bool = False     # units scaled inside their layer (steering)
    coactive: bool = False      # units compared by routing co-activation (the viewer's "similar experts")

    @staticmethod
    def halves(manifest: dict[str, Any], unit: int) -> tuple[int, int] | None:
        """The unit's two halves (i, j) when its id is i * E + j (product-key experts), else None."""
        return None

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.config = model, model.config

    def layers(self, group: int) -> list[int]:
        """Decoder layers whose units make up `group`."""
        raise NotImplementedError

    def layout_fields(self) -> dict[str, Any]:
        """The atlas manifest's fields on the layout beyond groups, units and scale."""
        raise NotImplementedError

    def entries(self, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per group, the active units of every token, ragged: (token index over B*T, unit id, score), each
        [entries], grouped by token."""
        raise NotImplementedError

    def lookup(self, input_ids: torch.Tensor) -> list[Lookup]:
        """Per group, a score lookup (b, t, unit) -> score (0 where inactive); the numbers of `entries` up to
        the order of the sum over heads."""
        raise NotImplementedError

    def read(self, input_ids: torch.Tensor, keep: bool = False) -> tuple[list[tuple[torch.Tensor, ...]], Any]:
        """`entries(input_ids)` and, with `keep`, a compact copy of what `lookup` reads from the same forward
        pass (for `stored_lookup`); None where this kind has no compact form (then `lookup` reruns the model)."""
        return self.entries(input_ids), None

    def stored_lookup(self, kept: Any) -> list[Lookup]:
        """`lookup` of the batch `kept` was read from, without a forward pass: the same numbers, bit for bit."""
        raise NotImplementedError

    def masked(self, selection: Any) -> contextlib.AbstractContextManager:
        """A context in which the units of `selection` (a `criteria.Selection`: ids per group) are deleted."""
        raise NotImplementedError

    def output_direction(self, group: int, unit: int, prefixes: Callable[[], list[list[int]]],
                         max_score: float) -> torch.Tensor:
        """What the unit writes into the residual stream, [d] (float32): `prefixes()` gives the token ids of its
        top contexts up to their activating token, `max_score` its largest score in the atlas."""
        raise NotImplementedError

    @torch.no_grad()
    def stream(self, dataset, windows: np.ndarray, batch_size: int, desc: str = "units",
               progress: bool = False, keep: int = 0) -> Iterator[UnitBatch]:
        """Run `windows` in batches of `batch_size` (in order) and yield each batch's active units; with `keep`
        (bytes), each batch's `kept` lookup state (`read`) as long as their total stays within `keep` bytes
        (None for the later batches: the atlas's second pass reruns only those)."""
        kept_bytes = 0
        for batch, input_ids, valid in run_windows(self.model, dataset, list(batches_of(windows, batch_size)),
                                                   desc, progress):
            width = valid.shape[1]
            groups = []
            entries, kept = self.read(input_ids, keep=kept_bytes < keep)
            if kept is not None:
                kept_bytes += kept.nbytes
                if kept_bytes > keep:
                    kept = None
            for token, ids, scores in entries:
                b, t = np.divmod(token.cpu().numpy(), width)
                real = valid[b, t]   # right padding is not part of the corpus
                groups.append((b[real], t[real], ids.cpu().numpy()[real].astype(np.int64),
                               scores.float().cpu().numpy()[real]))
            yield UnitBatch(batch, valid, groups, kept)


class MonetExperts(Units):
    """A Monet model's experts: E^2 per routing group (a group is `moe_groups` consecutive layers that share
    one routing)."""

    kind = "monet"
    unit_word = "expert"
    score_word = "of a token's routing"
    steerable = coactive = True

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.groups, self.per_group = self.config.num_routing_groups, self.config.moe_experts ** 2
        self.scale = float(self.config.moe_heads)

    @staticmethod
    def halves(manifest: dict[str, Any], unit: int) -> tuple[int, int] | None:
        experts = manifest.get("experts_per_side")
        return divmod(int(unit), int(experts)) if experts else None

    def layers(self, group: int) -> list[int]:
        return list(self.config.group_layers(group))

    def layout_fields(self) -> dict[str, Any]:
        return {"experts_per_side": int(self.config.moe_experts), "layers_per_group": int(self.config.moe_groups)}

    @torch.no_grad()
    def entries(self, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        capture = _routing(self.model, input_ids)
        return [capture.experts(g).entries() for g in range(len(capture.groups))]

    @torch.no_grad()
    def lookup(self, input_ids: torch.Tensor) -> list[Lookup]:
        # sum_h g1_hi g2_hj read from the captured routing for just the asked (i, j) (no active-pair lists)
        routing = _routing(self.model, input_ids).groups
        return [_MonetLookup(g1.float().numpy(), g2.float().numpy()) for g1, g2 in routing]

    @torch.no_grad()
    def read(self, input_ids: torch.Tensor, keep: bool = False) -> tuple[list[tuple[torch.Tensor, ...]], Any]:
        capture = _routing(self.model, input_ids)
        entries = [capture.experts(g).entries() for g in range(len(capture.groups))]
        return entries, (KeptRouting.of(capture.groups) if keep else None)

    def stored_lookup(self, kept: KeptRouting) -> list[Lookup]:
        return kept.lookups()

    def masked(self, selection: Any) -> contextlib.AbstractContextManager:
        return edited(self.model, deletions(selection, int(self.config.moe_experts)))

    @torch.no_grad()
    def output_direction(self, group: int, unit: int, prefixes: Callable[[], list[list[int]]],
                         max_score: float) -> torch.Tensor:
        """The expert's output (`monet.model.expert_output`) on the input of each layer of its group at the last
        token of each prefix, summed over the layers, averaged over the prefixes."""
        contexts = prefixes()
        if not contexts:
            raise MonetError(f"expert {group}:{unit} has no contexts in this atlas, so it has no measured output")
        layers = [self.model.model.layers[layer] for layer in self.layers(group)]
        i, j = divmod(int(unit), self.config.moe_experts)
        device = next(self.model.parameters()).device
        total = torch.zeros(self.config.hidden_size, device=device)
        inputs: dict[int, torch.Tensor] = {}

        def keep_input(module, args, n: int) -> None:
            inputs[n] = args[0][0, -1]
            if n == len(layers) - 1:   # every input needed is known: skip the layers above and the LM head
                raise _EnoughLayers

        hooks = [layer.moe.register_forward_pre_hook(lambda mod, args, n=n: keep_input(mod, args, n))
                 for n, layer in enumerate(layers)]
        try:
            for prefix in contexts:
                with contextlib.suppress(_EnoughLayers):
                    self.model.model(input_ids=torch.tensor([prefix], device=device), use_cache=False)
                for n, layer in enumerate(layers):
                    total += expert_output(layer.moe, inputs[n].float(), i, j).float()
        finally:
            for hook in hooks:
                hook.remove()
        return total / len(contexts)


def deletions(selection: Any, num_experts: int) -> ExpertEdits:
    """`selection.to_edits(num_experts)` (every selected expert deleted), built from the id arrays at once rather
    than one validated `ExpertEdits.delete` call per expert: the same edits and tables (ids are checked by
    `ExpertEdits.table`), for the unlearning protocol's thousands of masks of ~10^4 experts."""
    if num_experts * num_experts != selection.units_per_group:
        return selection.to_edits(num_experts)   # raises the selection's own error
    return ExpertEdits(experts={int(group): dict.fromkeys(np.asarray(ids, np.int64).tolist(), 0.0)
                                for group, ids in selection.ids.items() if len(ids)},
                       num_experts=num_experts, num_groups=selection.groups)


class DenseNeurons(Units):
    """A dense baseline's MLP neurons: `intermediate_size` per layer."""

    kind = "dense"
    group_word = "layer"
    unit_word = "neuron"
    score_word = "of an activation of 1"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.groups, self.per_group, self.scale = self.config.num_hidden_layers, self.config.intermediate_size, 1.0

    def layers(self, group: int) -> list[int]:
        return [group]

    def layout_fields(self) -> dict[str, Any]:
        return {"experts_per_side": None, "layers_per_group": 1}

    @torch.no_grad()
    def entries(self, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        flats = [scores.flatten(0, -2) for scores in self._scores(input_ids)]   # [B*T, units]
        return [(*(flat > 0).nonzero(as_tuple=True), flat[flat > 0]) for flat in flats]

    @torch.no_grad()
    def lookup(self, input_ids: torch.Tensor) -> list[Lookup]:
        return [_DenseLookup(scores.numpy()) for scores in self._scores(input_ids)]

    def masked(self, selection: Any) -> contextlib.AbstractContextManager:
        return neuron_masks(self.model, selection.ids)

    @torch.no_grad()
    def output_direction(self, group: int, unit: int, prefixes: Callable[[], list[list[int]]],
                         max_score: float) -> torch.Tensor:
        """The neuron's column of its layer's down projection times its largest score (no context needed)."""
        return self.model.model.layers[group].mlp.down_proj.weight[:, unit].float() * max(max_score, 1e-6)

    def _scores(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, max(act(gate x) * up x, 0) of every neuron of its MLP hidden layer ([B, T, units], CPU)."""
        found: list[torch.Tensor] = []

        def record(module, args, output):
            x = args[0]
            found.append(torch.relu(module.act(module.gate_proj(x)) * module.up_proj(x)).float().cpu())

        with contextlib.ExitStack() as hooks:
            for layer in self.model.model.layers:
                hooks.enter_context(layer.mlp.register_forward_hook(record))
            self.model.model(input_ids=input_ids, use_cache=False)
        return found


KINDS: dict[str, type[Units]] = {"monet": MonetExperts, "dense": DenseNeurons}


def kind_of(kind: str) -> type[Units]:
    """The units class of a kind ("monet", "dense": a model's `mlp_type`, an atlas manifest's "kind"); its class
    attributes say what the tools may offer without a model (`group_word`, `unit_word`, `steerable`, `coactive`,
    `halves`)."""
    if kind not in KINDS:
        raise MonetError(f"the interpretation tools support {' and '.join(KINDS)} models, not {kind!r} (a model's "
                         "mlp_type, or an atlas manifest's kind)")
    return KINDS[kind]


def expect_kind(config: Any, expect: str | None = None, what: str = "the model", hint: str = "") -> str:
    """The kind of units a model of `config` has (its `mlp_type`); with `expect`, MonetError unless it is that
    kind (naming `what` and adding `hint`). Takes the config so that a command can check a checkpoint before
    loading its weights."""
    kind = getattr(config, "mlp_type", "monet")
    if expect is not None and kind != expect:
        raise MonetError(f"{what} is a {kind} model, not a {expect} one{hint}")
    return kind


def units_of(model: torch.nn.Module, expect: str | None = None, what: str = "the model", hint: str = "") -> Units:
    """The units of `model` (its `mlp_type` picks the kind); with `expect`, see `expect_kind`."""
    return kind_of(expect_kind(model.config, expect, what, hint))(model)


# ------------------------------------------------------------------------------------------ Monet reads

class _EnoughLayers(Exception):
    """Raised by `MonetExperts.output_direction`'s hook once the group's last expert layer has its input."""


class _RoutingDone(Exception):
    """Raised by a hook on the last router: the rest of the forward pass cannot change the routing."""


def _routing(model: torch.nn.Module, input_ids: torch.Tensor) -> RoutingCapture:
    """The routing of every group, from a forward pass of the decoder (no unembedding: logits are not needed)
    that stops once the last router has run."""
    def stop(module, args, output):
        raise _RoutingDone

    with capture_routing(model) as capture:
        last = [m for m in model.modules() if isinstance(m, MonetRouter)][-1]
        with last.register_forward_hook(stop), contextlib.suppress(_RoutingDone):   # after capture's hooks
            getattr(model, "model", model)(input_ids=input_ids, use_cache=False)
    return capture


@dataclass
class _MonetLookup:
    g1: np.ndarray   # [B, T, H, E]
    g2: np.ndarray

    def __call__(self, b: np.ndarray, t: np.ndarray, unit: np.ndarray) -> np.ndarray:
        # g1[b, t, :, i] * g2[b, t, :, j] summed over heads, gathered through flat indices ([n, H] each, the
        # same float32 products summed in the same order as the fancy index; 1.5x faster)
        _, width, heads, experts = self.g1.shape
        i, j = np.divmod(unit, experts)
        at = ((np.asarray(b, np.int64) * width + t) * heads)[:, None] + np.arange(heads)
        at *= experts
        return (np.ravel(self.g1)[at + i[:, None]] * np.ravel(self.g2)[at + j[:, None]]).sum(-1)


@dataclass
class KeptRouting:
    """The routing of one batch, compact: per group and side, the flat positions and values of the nonzero
    entries of g ([B, T, H, E], float32; about k of E per head, so ~2 k / E of the dense size). Rebuilding g
    from them gives the captured tensors exactly (every other entry is +0.0; an entry stored as -0.0 is kept
    as such, since only all-zero bit patterns are left out), so lookups from it equal `lookup`'s bit for bit."""

    shape: tuple[int, ...]
    sides: list[tuple[np.ndarray, np.ndarray]]     # (positions int64, values float32), g1 and g2 of each group

    @classmethod
    def of(cls, groups: list[tuple[torch.Tensor, torch.Tensor]]) -> KeptRouting:
        sides = []
        for g in (side for pair in groups for side in pair):
            flat = g.float().reshape(-1)
            where = torch.nonzero(flat.view(torch.int32) != 0).squeeze(1)   # nonzero bit patterns (-0.0 kept)
            sides.append((where.numpy(), flat[where].numpy()))
        return cls(tuple(groups[0][0].shape) if groups else (), sides)

    @property
    def nbytes(self) -> int:
        return sum(where.nbytes + values.nbytes for where, values in self.sides)

    def lookups(self) -> list[Lookup]:
        dense = []
        for where, values in self.sides:
            g = np.zeros(int(np.prod(self.shape)), np.float32)
            g[where] = values
            dense.append(g.reshape(self.shape))
        return [_MonetLookup(g1, g2) for g1, g2 in zip(dense[::2], dense[1::2], strict=True)]


@dataclass
class _DenseLookup:
    scores: np.ndarray

    def __call__(self, b: np.ndarray, t: np.ndarray, unit: np.ndarray) -> np.ndarray:
        return self.scores[b, t, unit]


# ----------------------------------------------------------------------------------------------- windows

def cut_document(doc: int, length: int, seq_len: int) -> list[tuple[int, int, int]]:
    """Document `doc` of `length` tokens cut into (doc, start, length) windows of at most `seq_len` tokens."""
    return [(doc, start, min(seq_len, length - start)) for start in range(0, length, seq_len)]


def batches_of(windows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive batches of at most `batch_size` windows."""
    return (windows[first:first + batch_size] for first in range(0, len(windows), batch_size))


def run_windows(model: torch.nn.Module, dataset, batches: list[np.ndarray], desc: str,
                progress: bool) -> Iterator[tuple[np.ndarray, torch.Tensor, np.ndarray]]:
    """(batch, input ids on the model's device, validity mask) of each batch, with a progress bar in tokens."""
    device = next(model.parameters()).device
    model.eval()
    total = sum(int(batch[:, 2].sum()) for batch in batches)
    with tqdm(total=total, unit="tok", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            input_ids, valid = batch_inputs(dataset, batch)
            yield batch, input_ids.to(device), valid
            bar.update(int(valid.sum()))


def batch_inputs(dataset, batch: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Right-padded input ids [B, T] and a validity mask. Right padding needs no attention mask: causal
    attention never lets a real token see the padding after it, and routing uses running statistics."""
    width = int(batch[:, 2].max())
    ids = np.zeros((len(batch), width), np.int64)
    for row, (doc, offset, length) in enumerate(batch):
        ids[row, :length] = dataset.document(int(doc))[offset:offset + length]
    return torch.from_numpy(ids), np.arange(width) < batch[:, 2, None]


__all__ = ["DenseNeurons", "KeptRouting", "MonetExperts", "UnitBatch", "Units", "batch_inputs", "batches_of",
           "cut_document", "expect_kind", "run_windows", "units_of"]
