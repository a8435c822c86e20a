"""The naive oracle: Monet layers as explicit sums over all N = E^2 experts (paper eq. 7 and 14).

This is the only place where every expert E_ij(x) is built, one by one, from the weight slices the
paper names. It is slow and only meant for float64 checks on tiny sizes.
"""

from __future__ import annotations

import torch

from monet.model import MonetHorizontalExperts, MonetVerticalExperts


def hd_expert(layer: MonetHorizontalExperts, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """E_ij(x) = V_j sigma(U_i x + b1_i) + b2_j (eq. 6) for x [d]."""
    m = layer.expert_dim
    rows = slice(i * m, (i + 1) * m)
    U_i, b1_i = layer.u.weight[rows], layer.u.bias[rows]
    V_j = layer.v.weight[:, j * m:(j + 1) * m]
    return V_j @ layer.act(U_i @ x + b1_i) + layer.b[j]


def vd_expert(layer: MonetVerticalExperts, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """E_ij(x) of eq. 13: left half from i, right half from j, second layer in four blocks."""
    m = layer.half_dim
    block_i, block_j = slice(i * m, (i + 1) * m), slice(j * m, (j + 1) * m)
    left = layer.act(layer.u1.weight[block_i] @ x + layer.u1.bias[block_i])    # sigma(U1_i x + b11_i)
    right = layer.act(layer.u2.weight[block_j] @ x + layer.u2.bias[block_j])   # sigma(U2_j x + b21_j)
    top = layer.v11.weight[:, block_i] @ left + layer.v12.weight[:, block_i] @ right + layer.b1[i]
    bottom = layer.v21.weight[:, block_j] @ left + layer.v22.weight[:, block_j] @ right + layer.b2[j]
    return torch.cat((top, bottom))


def naive_layer(layer, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
                mask: set[tuple[int, int]] | None = None,
                scale: dict[tuple[int, int], float] | None = None) -> torch.Tensor:
    """sum_h sum_i sum_j g1_hi g2_hj E_ij(x) for x [B, T, d], g [B, T, H, E] (eq. 7 / 14).

    `mask` drops the listed (i, j) experts; `scale` multiplies their terms (steering).
    """
    expert = hd_expert if isinstance(layer, MonetHorizontalExperts) else vd_expert
    batch, length, _ = x.shape
    heads, experts = g1.shape[-2:]
    out = torch.zeros_like(x)
    for b in range(batch):
        for t in range(length):
            for i in range(experts):
                for j in range(experts):
                    if mask and (i, j) in mask:
                        continue
                    weight = sum(g1[b, t, h, i] * g2[b, t, h, j] for h in range(heads))
                    if scale and (i, j) in scale:
                        weight = weight * scale[(i, j)]
                    if float(weight.detach()) != 0.0:
                        out[b, t] = out[b, t] + weight * expert(layer, x[b, t], i, j)
    return out
