"""A sparse-autoencoder baseline for the unlearning protocol (issue 23, item 4; the paper's Figure 3b).

The paper compares Monet's expert deletion with suppressing Gemma Scope SAE features. Here a short TopK SAE
(Gao et al. 2024: x ~ W_dec topk(W_enc (x - b_dec) + b_enc) + b_dec, decoder columns of unit norm) is trained
on each layer's MLP output of the demo's dense model, and the protocol runs on its latents:

* deleting latents S removes their decoder contribution from the MLP output, y -> y - W_dec[:, S] z_S, and
  keeps the SAE's error term y - y_hat, so with nothing deleted the model is exactly the dense model and
  every Δ is the latents' own effect (`sae_deleted`);
* the price of reading the model through the SAE at all is reported apart: the loss rise when every MLP
  output is replaced by its reconstruction (`sae_reconstructed`), the cost Gemma Scope pays in the paper;
* latents are ranked by the class-mean difference of their activations (`latent_label_means`), like the
  dense rule of `dense_rules`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from monet.errors import MonetError
from monet.experiments.dense_rules import dense_layers, label_means, window_batches
from monet.io import atomic_write, write_json

SAE_CONFIG = "sae.json"
SAE_WEIGHTS = "sae.safetensors"


@dataclass
class SAEConfig:
    width: int          # the MLP output's size (hidden_size)
    latents: int        # dictionary size per layer
    k: int              # active latents per token


class TopKSAE(nn.Module):
    """One layer's TopK sparse autoencoder."""

    def __init__(self, config: SAEConfig) -> None:
        super().__init__()
        if not 0 < config.k <= config.latents:
            raise MonetError(f"a TopK SAE needs 0 < k <= latents, got k={config.k}, latents={config.latents}")
        self.config = config
        decoder = torch.randn(config.width, config.latents)
        self.decoder = nn.Parameter(decoder / decoder.norm(dim=0, keepdim=True))      # [width, latents]
        self.encoder = nn.Linear(config.width, config.latents)
        with torch.no_grad():   # encoder starts as the decoder's transpose (Gao et al. 2024, §2.1)
            self.encoder.weight.copy_(self.decoder.T)
            self.encoder.bias.zero_()
        self.b_dec = nn.Parameter(torch.zeros(config.width))

    def active(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, ids) [..., k]: the k largest pre-activations (ReLU'd) and their latents."""
        values, index = self.encoder(x - self.b_dec).topk(self.config.k, dim=-1)
        return F.relu(values), index

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., latents] codes: the k active latents' values, every other latent 0."""
        values, index = self.active(x)
        return x.new_zeros(*x.shape[:-1], self.config.latents).scatter(-1, index, values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.decoder.T + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction, summing only the k active decoder columns per token (never [.., latents])."""
        values, index = self.active(x)
        flat = F.embedding_bag(index.reshape(-1, self.config.k), self.decoder.T,
                               per_sample_weights=values.reshape(-1, self.config.k), mode="sum")
        return flat.view(*x.shape[:-1], -1) + self.b_dec

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.decoder.div_(self.decoder.norm(dim=0, keepdim=True).clamp_min(1e-12))


def train_sae(x: torch.Tensor, latents: int, k: int, steps: int, batch_size: int = 1024, lr: float = 1e-3,
              seed: int = 0) -> tuple[TopKSAE, dict[str, float]]:
    """Train one TopK SAE on activations `x` [n, width] with Adam on the normalised MSE (MSE over the
    activations' total variance), decoder columns renormalised after every step. Returns the SAE and
    its training statistics: the final normalised MSE on all of `x` (fraction of variance unexplained)
    and the share of latents that never fire on `x` (dead)."""
    if len(x) < 2:
        raise MonetError("training an SAE needs at least 2 activation vectors")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(x.shape[1], latents, k))
    x = x.float()
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    variance = (x - x.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
    optimiser = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        batch = x[torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)]
        loss = (sae(batch) - batch).pow(2).sum(1).mean() / variance
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        sae.normalise_decoder()
    with torch.no_grad():
        fired = torch.zeros(latents, dtype=torch.bool)
        error = 0.0
        for chunk in x.split(8192):
            z = sae.encode(chunk)
            fired |= (z > 0).any(0)
            error += float((sae.decode(z) - chunk).pow(2).sum())
    return sae, {"fvu": error / len(x) / float(variance), "dead_fraction": float(1 - fired.float().mean())}


@torch.no_grad()
def mlp_outputs(model: nn.Module, dataset: Any, windows: np.ndarray, batch_size: int = 16) -> list[torch.Tensor]:
    """Per layer [tokens, hidden] float32 MLP outputs of the real tokens of `windows` (rows as for
    `dense_rules.neuron_label_means`), on the CPU: an SAE's training set."""
    mlps = dense_layers(model)
    captured: list[torch.Tensor] = []
    hooks = [mlp.register_forward_hook(lambda module, args, out: captured.append(out.detach())) for mlp in mlps]
    device = next(model.parameters()).device
    chunks: list[list[torch.Tensor]] = [[] for _ in mlps]
    was_training = model.training
    model.eval()
    try:
        for ids, real, _ in window_batches(dataset, windows, batch_size):
            captured.clear()
            model(input_ids=ids.to(device), use_cache=False)
            for layer, out in enumerate(captured):
                chunks[layer].append(out[real.to(out.device)].float().cpu())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [torch.cat(c) for c in chunks]


@contextmanager
def _spliced(model: nn.Module, saes: list[TopKSAE], edit: Any) -> Iterator[nn.Module]:
    """Inside the block each layer's MLP output y becomes `edit(layer, sae, y)`."""
    mlps = dense_layers(model)
    if len(saes) != len(mlps):
        raise MonetError(f"{len(saes)} SAE(s) for a model of {len(mlps)} layers; train one per layer")
    handles = []
    try:
        for layer, (mlp, sae) in enumerate(zip(mlps, saes, strict=True)):
            def hook(module: nn.Module, args: tuple, out: torch.Tensor, layer: int = layer, sae: TopKSAE = sae):
                return edit(layer, sae.to(device=out.device), out.float()).to(out.dtype)

            handles.append(mlp.register_forward_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def sae_deleted(model: nn.Module, saes: list[TopKSAE], latents: dict[int, np.ndarray]) -> Iterator[nn.Module]:
    """Delete SAE latents (layer -> ids): each layer's MLP output loses those latents' decoder terms,
    y - W_dec[:, S] z_S(y); the SAE's error term stays, so nothing deleted changes nothing."""
    chosen = {layer: torch.as_tensor(np.asarray(ids), dtype=torch.long) for layer, ids in latents.items() if len(ids)}

    def edit(layer: int, sae: TopKSAE, y: torch.Tensor) -> torch.Tensor:
        if layer not in chosen:
            return y
        index = chosen[layer].to(y.device)
        z = sae.encode(y)[..., index]
        return y - z @ sae.decoder[:, index].T

    with torch.no_grad(), _spliced(model, saes, edit):
        yield model


@contextmanager
def sae_reconstructed(model: nn.Module, saes: list[TopKSAE], layers: list[int] | None = None) -> Iterator[nn.Module]:
    """Replace the MLP output of `layers` (default: all) by its SAE reconstruction (the error term dropped)."""
    chosen = set(range(len(saes)) if layers is None else layers)

    def edit(layer: int, sae: TopKSAE, y: torch.Tensor) -> torch.Tensor:
        return sae(y) if layer in chosen else y

    with torch.no_grad(), _spliced(model, saes, edit):
        yield model


@torch.no_grad()
def latent_label_means(model: nn.Module, saes: list[TopKSAE], dataset: Any, windows: np.ndarray,
                       batch_size: int = 16) -> tuple[list[np.ndarray], np.ndarray]:
    """(per layer [num_labels, latents] mean activation of each latent per token of each label, token
    counts per label), on the real tokens of `windows` (rows as for `dense_rules.neuron_label_means`)."""
    return label_means(model, dataset, windows, dense_layers(model), [sae.config.latents for sae in saes],
                       lambda layer, out: saes[layer].to(out.device).encode(out.float()), batch_size)


def save_saes(saes: list[TopKSAE], directory: str | Path, stats: list[dict[str, float]] | None = None) -> None:
    """`sae.safetensors` (layer.{i}.{parameter}) and `sae.json` (config, training statistics)."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer.{i}.{name}": value.detach().cpu().contiguous()
               for i, sae in enumerate(saes) for name, value in sae.state_dict().items()}
    atomic_write(directory / SAE_WEIGHTS, save(tensors))
    write_json(directory / SAE_CONFIG, {"config": asdict(saes[0].config), "layers": len(saes), "stats": stats or []})


def load_saes(directory: str | Path) -> list[TopKSAE]:
    """The SAEs `save_saes` wrote (safetensors: no pickle)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / SAE_CONFIG).is_file() or not (directory / SAE_WEIGHTS).is_file():
        raise MonetError(f"{directory} holds no SAE ({SAE_CONFIG} and {SAE_WEIGHTS}); train one first")
    meta = json.loads((directory / SAE_CONFIG).read_text())
    tensors = load_file(str(directory / SAE_WEIGHTS))
    saes = []
    for layer in range(int(meta["layers"])):
        sae = TopKSAE(SAEConfig(**meta["config"]))
        sae.load_state_dict({name.split(".", 2)[2]: value for name, value in tensors.items()
                             if name.startswith(f"layer.{layer}.")})
        saes.append(sae.eval())
    return saes


__all__ = ["SAEConfig", "TopKSAE", "latent_label_means", "load_saes", "mlp_outputs", "sae_deleted",
           "sae_reconstructed", "save_saes", "train_sae"]
