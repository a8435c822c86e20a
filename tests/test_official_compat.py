"""A directory in the official release layout loads and computes what the official equations compute.

The official modeling file needs transformers 4.42, so it cannot run here. Instead this test writes a
checkpoint directory the way the official code lays it out (config.json with `model_type: monet`,
`auto_map`, `rope_scaling: null`, `torch_dtype`; model.safetensors with the official key names) and
compares our model against an independent reference written in this file from the official
formulation: routing through `nn.BatchNorm1d` over [tokens*E, H], experts as the official einsums
(Algorithm 1-2 of the paper), plain softmax attention with RoPE.
"""

import json
from statistics import NormalDist

import pytest
import torch
from safetensors.torch import save_file

import monet

OFFICIAL_CONFIG = {
    "architectures": ["MonetForCausalLM"],
    "auto_map": {"AutoConfig": "modeling_monet.MonetConfig", "AutoModelForCausalLM": "modeling_monet.MonetForCausalLM"},
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "relu2", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": None,
    "max_position_embeddings": 64, "mlp_bias": None, "model_type": "monet", "moe_decompose": "vertical",
    "moe_dim": 4, "moe_experts": 6, "moe_groups": 2, "moe_heads": 2, "moe_topk": 2,
    "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 4, "output_router_probs": False,
    "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.42.0",
    "use_cache": True, "vocab_size": 50,
}


def official_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    d, E, m, H, V = cfg["hidden_size"], cfg["moe_experts"], cfg["moe_dim"], cfg["moe_heads"], cfg["vocab_size"]

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"model.embed_tokens.weight": rand(V, d, scale=1.0), "model.norm.weight": 1 + rand(d),
          "lm_head.weight": rand(V, d)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = rand(d, d)
        sd[p + "input_layernorm.weight"] = 1 + rand(d)
        sd[p + "post_attention_layernorm.weight"] = 1 + rand(d)
        if cfg["moe_decompose"] == "vertical":
            for name in ("u1", "u2"):
                sd[p + f"moe.{name}.weight"] = rand(E * m // 2, d)
                sd[p + f"moe.{name}.bias"] = rand(E * m // 2)
            for name in ("v11", "v12", "v21", "v22"):
                sd[p + f"moe.{name}.weight"] = rand(d // 2, E * m // 2)
            sd[p + "moe.b1"], sd[p + "moe.b2"] = rand(E, d // 2), rand(E, d // 2)
        else:
            sd[p + "moe.u.weight"], sd[p + "moe.u.bias"] = rand(E * m, d), rand(E * m)
            sd[p + "moe.v.weight"], sd[p + "moe.b"] = rand(d, E * m), rand(E, d)
        if layer % cfg["moe_groups"] == 0:
            sd[p + "router.w1.weight"], sd[p + "router.w2.weight"] = rand(H * E, d), rand(H * E, d)
            for norm in ("norm1", "norm2"):
                sd[p + f"router.{norm}.running_mean"] = rand(H)
                sd[p + f"router.{norm}.running_var"] = 0.5 + torch.rand(H, generator=g)
                sd[p + f"router.{norm}.num_batches_tracked"] = torch.tensor(1000)
    return sd


class Reference:
    """The official computation, written from the paper's Algorithms 1-2 and the LLaMA decoder."""

    def __init__(self, cfg: dict, sd: dict[str, torch.Tensor]):
        self.cfg, self.sd = cfg, {k: v.float() for k, v in sd.items()}

    def rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"]))

    def attention(self, x, p):
        cfg, sd = self.cfg, self.sd
        B, T, d = x.shape
        nh = cfg["num_attention_heads"]
        hd = d // nh

        def heads(w):
            return (x @ sd[p + w].T).view(B, T, nh, hd).transpose(1, 2)

        q, k, v = heads("self_attn.q_proj.weight"), heads("self_attn.k_proj.weight"), heads("self_attn.v_proj.weight")
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.arange(T).float()[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(t):
            a, b = t[..., : hd // 2], t[..., hd // 2:]
            return t * cos + torch.cat([-b, a], -1) * sin

        q, k = rope(q), rope(k)
        scores = q @ k.transpose(-1, -2) / hd**0.5
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
        return out @ sd[p + "self_attn.o_proj.weight"].T

    def router(self, x, p):
        cfg, sd = self.cfg, self.sd
        H, E = cfg["moe_heads"], cfg["moe_experts"]
        sigma = NormalDist().inv_cdf(1 - cfg["moe_topk"] / E)
        probs = []
        for w, norm in (("w1", "norm1"), ("w2", "norm2")):
            z = (x @ sd[p + f"router.{w}.weight"].T).unflatten(-1, (H, E)).float()
            bn = torch.nn.BatchNorm1d(H, affine=False).eval()
            bn.running_mean.copy_(sd[p + f"router.{norm}.running_mean"])
            bn.running_var.copy_(sd[p + f"router.{norm}.running_var"])
            zn = bn(z.transpose(2, 3).flatten(0, -2)).view(z.size(0), z.size(1), E, H).transpose(2, 3)
            thresh = zn.amax(-1, keepdim=True).clamp_max(sigma)
            probs.append(torch.softmax(torch.where(zn >= thresh, z, torch.tensor(-1e10)), dim=-1))
        return tuple(probs)

    def experts(self, x, g1, g2, p):
        cfg, sd = self.cfg, self.sd
        E = cfg["moe_experts"]

        def relu2(t):
            return torch.relu(t) ** 2

        if cfg["moe_decompose"] == "vertical":
            x1 = relu2(x @ sd[p + "moe.u1.weight"].T + sd[p + "moe.u1.bias"]).unflatten(-1, (E, -1))
            x2 = relu2(x @ sd[p + "moe.u2.weight"].T + sd[p + "moe.u2.bias"]).unflatten(-1, (E, -1))
            x11 = torch.einsum("btim,bthi->btim", x1, g1).flatten(-2) @ sd[p + "moe.v11.weight"].T
            x12 = torch.einsum("btjm,bthj,bthi->btim", x2, g2, g1).flatten(-2) @ sd[p + "moe.v12.weight"].T
            x13 = torch.einsum("bthi,id->btd", g1, sd[p + "moe.b1"])
            x21 = torch.einsum("btim,bthi,bthj->btjm", x1, g1, g2).flatten(-2) @ sd[p + "moe.v21.weight"].T
            x22 = torch.einsum("btjm,bthj->btjm", x2, g2).flatten(-2) @ sd[p + "moe.v22.weight"].T
            x23 = torch.einsum("bthj,jd->btd", g2, sd[p + "moe.b2"])
            return torch.cat((x11 + x12 + x13, x21 + x22 + x23), dim=-1)
        h = relu2(x @ sd[p + "moe.u.weight"].T + sd[p + "moe.u.bias"]).unflatten(-1, (E, -1))
        out = torch.einsum("btim,bthi,bthj->btjm", h, g1, g2).flatten(-2) @ sd[p + "moe.v.weight"].T
        return out + torch.einsum("bthj,jd->btd", g2, sd[p + "moe.b"])

    def forward(self, ids):
        sd, routing, all_probs = self.sd, None, []
        h = sd["model.embed_tokens.weight"][ids]
        for layer in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            h = h + self.attention(self.rms(h, sd[p + "input_layernorm.weight"]), p)
            normed = self.rms(h, sd[p + "post_attention_layernorm.weight"])
            if layer % self.cfg["moe_groups"] == 0:
                routing = self.router(normed, p)
                all_probs.append(routing)
            else:
                all_probs.append(None)
            h = h + self.experts(normed, *routing, p)
        return self.rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T, all_probs


def write_official_dir(path, cfg, dtype=torch.float32):
    sd = official_state_dict(cfg)
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": str(dtype).split(".")[-1]}, indent=2))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    return sd


@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_official_layout_loads_and_matches_reference(tmp_path, decompose):
    cfg = {**OFFICIAL_CONFIG, "moe_decompose": decompose}
    sd = write_official_dir(tmp_path, cfg)
    model = monet.MonetForCausalLM.from_pretrained(tmp_path).eval()
    reference = Reference(cfg, sd)
    ids = torch.randint(0, cfg["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    out = model(ids, output_router_probs=True)
    ref_logits, ref_probs = reference.forward(ids)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert len(out.router_probs) == len(ref_probs) == 3
    for got, want in zip(out.router_probs, ref_probs, strict=True):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)

    # Greedy generation equals greedy decoding with the reference (full recomputation each step).
    prompt = ids[:1, :3]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                               do_sample=False, pad_token_id=0)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, reference.forward(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_official_bfloat16_checkpoint(tmp_path):
    sd = write_official_dir(tmp_path, OFFICIAL_CONFIG, dtype=torch.bfloat16)
    model = monet.MonetForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.model.layers[0].moe.u1.weight.dtype == torch.bfloat16
    # Reference on the same (bf16-rounded) weights, in float32.
    reference = Reference(OFFICIAL_CONFIG, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                            for k, v in sd.items()})
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(2))
    ref_logits, _ = reference.forward(ids)
    logits = model(ids).logits
    assert logits.dtype == torch.float32
    assert (logits - ref_logits).abs().max() < 0.15 * ref_logits.abs().max()
    # Loading the bf16 file into float32 gives the reference closely.
    model32 = monet.MonetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(model32(ids).logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_auto_class_loads_official_layout_without_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    write_official_dir(tmp_path, OFFICIAL_CONFIG)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)   # auto_map is present, no trust_remote_code
    assert isinstance(model, monet.MonetForCausalLM)
