"""The SAE baseline (issue 23, item 4): a TopK SAE on the dense MLP output, latent deletion keeping the error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import monet
from monet.errors import MonetError
from monet.experiments.sae import (
    SAEConfig,
    TopKSAE,
    latent_label_means,
    load_saes,
    mlp_outputs,
    sae_deleted,
    sae_reconstructed,
    save_saes,
    train_sae,
)


class _Tokens:
    """What the window readers use of a TokenDataset."""

    def __init__(self, docs: list[list[int]], labels: list[int]) -> None:
        lengths = np.array([len(d) for d in docs])
        ends = np.cumsum(lengths)
        self.docs = np.stack([ends - lengths, ends, np.array(labels)], axis=1)
        self.tokens = np.concatenate([np.array(d) for d in docs])
        self.labels = ["a", "b", "c"]


def _model_and_saes(latents: int = 48, k: int = 5) -> tuple[torch.nn.Module, list[TopKSAE]]:
    torch.manual_seed(0)
    model = monet.MonetForCausalLM(monet.preset("tiny", mlp_type="dense")).eval()
    width = model.config.hidden_size
    saes = []
    for _ in model.model.layers:
        sae = TopKSAE(SAEConfig(width, latents, k))
        with torch.no_grad():   # a non-trivial encoder and bias, so every term of the edit matters
            sae.encoder.weight.mul_(5.0).add_(torch.randn_like(sae.encoder.weight))
            sae.b_dec.normal_(0, 0.05)
        saes.append(sae.eval())
    return model, saes


def test_topk_codes_and_the_sparse_reconstruction():
    sae = _model_and_saes()[1][0]
    x = torch.randn(3, 7, sae.config.width)
    z = sae.encode(x)
    assert ((z > 0).sum(-1) <= sae.config.k).all() and (z >= 0).all()
    torch.testing.assert_close(sae(x), sae.decode(z), rtol=1e-5, atol=1e-6)   # embedding_bag == dense decode
    with pytest.raises(MonetError, match="k <= latents"):
        TopKSAE(SAEConfig(8, 4, 5))


def test_deleting_latents_removes_their_decoder_terms_and_keeps_the_error():
    model, saes = _model_and_saes()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        plain = model(ids).logits
        with sae_deleted(model, saes, {}):
            torch.testing.assert_close(model(ids).logits, plain)   # nothing deleted: exactly the dense model
    chosen = {0: np.array([1, 4, 30]), 1: np.array([0, 47])}

    def reference(layer: int):
        def hook(module, args, y):
            if layer not in chosen:
                return y
            sae = saes[layer]
            z = sae.encode(y)
            kept = z.clone()
            kept[..., torch.as_tensor(chosen[layer])] = 0
            error = y - sae.decode(z)
            return sae.decode(kept) + error   # the reconstruction without S, plus the SAE's error
        return hook

    with torch.no_grad(), sae_deleted(model, saes, chosen):
        got = model(ids).logits
    handles = [layer.mlp.register_forward_hook(reference(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        want = model(ids).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)   # the deletion does something
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain)   # hooks removed


def test_reconstruction_replaces_the_mlp_output():
    model, saes = _model_and_saes()
    ids = torch.randint(3, 200, (1, 8))
    with torch.no_grad():
        plain = model(ids).logits
        with sae_reconstructed(model, saes, layers=[1]):
            got = model(ids).logits
        handle = model.model.layers[1].mlp.register_forward_hook(lambda m, a, y: saes[1].decode(saes[1].encode(y)))
        want = model(ids).logits
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, got, atol=1e-4)
    with pytest.raises(MonetError, match="one per layer"), sae_deleted(model, saes[:1], {}):
        pass


def test_training_learns_a_sparse_dictionary():
    """Data made of k-sparse combinations of a dictionary: training must beat the untrained SAE by far."""
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(32, 16, generator=gen)
    codes = torch.zeros(2000, 32)
    picks = torch.rand(2000, 32, generator=gen).argsort(-1)[:, :3]
    codes.scatter_(1, picks, torch.rand(2000, 3, generator=gen) + 0.5)
    x = codes @ atoms + 0.3
    _, untrained = train_sae(x, latents=64, k=3, steps=0)
    _, trained = train_sae(x, latents=64, k=3, steps=150, batch_size=256, lr=3e-3)
    assert trained["fvu"] < 0.3 < 0.5 < untrained["fvu"]   # measured: 0.22 and 0.64
    assert 0 <= trained["dead_fraction"] < 1


def test_latent_label_means_match_the_encoded_mlp_outputs(tmp_path):
    model, saes = _model_and_saes()
    rng = np.random.default_rng(0)
    data = _Tokens([rng.integers(3, 200, n).tolist() for n in (9, 5, 12)], [0, 1, 0])
    windows = np.array([[0, 0, 6], [1, 0, 5], [2, 2, 8]])
    means, counts = latent_label_means(model, saes, data, windows, batch_size=2)
    outputs = mlp_outputs(model, data, windows, batch_size=2)
    assert counts.tolist() == [14, 5, 0] and [len(o) for o in outputs] == [19] * len(saes)
    labels = np.array([0] * 6 + [1] * 5 + [0] * 8)   # the real tokens in window order
    for layer, (out, sae) in enumerate(zip(outputs, saes, strict=True)):
        with torch.no_grad():
            z = sae.encode(out).double().numpy()
        np.testing.assert_allclose(means[layer][0], z[labels == 0].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(means[layer][1], z[labels == 1].mean(0), rtol=1e-5, atol=1e-6)
        assert (means[layer][2] == 0).all()
    save_saes(saes, tmp_path / "sae")
    again = load_saes(tmp_path / "sae")
    x = torch.randn(4, saes[0].config.width)
    for a, b in zip(saes, again, strict=True):
        torch.testing.assert_close(a(x), b(x))
    with pytest.raises(MonetError, match="holds no SAE"):
        load_saes(tmp_path)
