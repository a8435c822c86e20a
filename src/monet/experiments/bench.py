"""`monet bench`: side-by-side speed and memory of Monet blocks, dense MLPs and the official contraction order.

Every section times its cases interleaved (A, B, C, A, B, C, ... with the starting case rotated each
round), after a warm-up, and reports the median with the min-max range, because the machine may be
shared and one number would mostly measure the neighbours. Ratios are medians over medians.

Sections (all run by default; `--quick` shrinks every one to a smoke run of seconds):
- blocks:   forward+backward of one Monet block (HD and VD experts + the router amortised over
            `moe_groups`: router time / moe_groups) against a dense relu2 MLP of the same hidden width
            E*m (two matmuls, the cost Monet's factored form reduces to), the gated LLaMA MLP of that
            width (three matmuls), and a reference in the official contraction order (the einsums of the
            paper's Algorithms 1-2, with a BatchNorm1d router and plain autograd), shapes from tiny to the
            released 1.4B layer (d 2048, E 512, m 16, H 8, k 8).
- scaling:  block time and parameters as E (= sqrt(N)) grows at fixed d: both should grow like E.
- masking:  block forward with 0.1%, 1% and 15% of the N = E^2 experts masked (`edit_weights`) vs none.
- train:    whole-model training tokens/s (AdamW steps) of Monet vs a dense LLaMA of equal MLP width
            (and a parameter-matched one).
- capture:  tokens/s of a forward under `capture_routing` + `active_experts` per group vs a plain forward.

Peak memory: the largest amount of CPU tensor memory live at once during one forward+backward,
counted from torch.profiler memory events (allocations attributed to the op that made them, frees
where they happen), relative to the start of the step: activations, saved tensors and gradients,
not the parameters and inputs that exist before. It is measured in a separate, untimed run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monet.config import MonetConfig
from monet.errors import MonetError
from monet.interp.capture import capture_routing
from monet.io import atomic_write, dumps, write_json
from monet.model import DenseMLP, MonetForCausalLM, MonetRouter, build_experts
from monet.settings import BenchSettings

Step = Callable[[], Any]

# Goals of issue 6 (reported beside the figures, never asserted).
GOALS = {
    "monet_vs_dense": ("<=", 1.2),
    "masked_vs_unmasked": ("<=", 1.15),
    "train_monet_vs_dense": (">=", 0.85),
    "capture_vs_forward": (">=", 0.5),
}


@dataclass(frozen=True)
class BlockShape:
    name: str
    hidden: int
    experts: int
    moe_dim: int
    heads: int
    topk: int
    groups: int = 4

    def config(self, decompose: str = "vertical", **overrides: Any) -> MonetConfig:
        fields = dict(hidden_size=self.hidden, num_attention_heads=max(1, self.hidden // 128), vocab_size=256,
                      moe_experts=self.experts, moe_dim=self.moe_dim, moe_heads=self.heads, moe_topk=self.topk,
                      moe_groups=self.groups, moe_decompose=decompose, hidden_act="relu2")
        return MonetConfig(**{**fields, **overrides})


BLOCK_SHAPES = [
    BlockShape("tiny", 256, 64, 8, 4, 4),
    BlockShape("medium", 1024, 256, 8, 4, 8),
    BlockShape("monet-850m", 1536, 512, 12, 6, 8),
    BlockShape("monet-1.4b", 2048, 512, 16, 8, 8),
]
QUICK_SHAPES = [BlockShape("micro", 64, 32, 4, 2, 4)]


@dataclass
class Settings:
    quick: bool = False
    tokens: int = 512
    repeats: int = 3
    warmup: int = 1
    sections: tuple[str, ...] = ("blocks", "scaling", "masking", "train", "capture")
    seed: int = 0
    threads: int | None = None   # torch intra-op threads (None: torch's default)


SECTIONS = ("blocks", "scaling", "masking", "train", "capture")


# --------------------------------------------------------------------------------------------------
# Measuring


def summarise(seconds: list[float]) -> dict[str, float]:
    """Median, min and max in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "runs": len(ms)}


def interleaved(cases: dict[str, Step], repeats: int, warmup: int = 1, progress=None) -> dict[str, dict]:
    """Time each case `repeats` times, interleaved round by round (starting case rotated), after warm-up."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
            if progress is not None:
                progress.update(1)
    return {name: summarise(values) for name, values in times.items()}


def peak_memory_mib(step: Step) -> float:
    """Peak live CPU tensor memory (MiB) during `step`, relative to its start (torch.profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    deltas = []
    for event in prof.events():
        change = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if change:
            deltas.append((event.time_range.start, change))
    deltas.sort(key=lambda item: item[0])
    live = peak = 0
    for _, change in deltas:
        live += change
        peak = max(peak, live)
    return peak / 2**20


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# Reference implementations, written from the paper's Algorithms 1-2 (official contraction order)


def official_order_hd(layer: nn.Module, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Algorithm 1: hidden units contracted with g1 and g2 in one einsum, then v, plus the g2-weighted bias."""
    hidden = F.relu(layer.u(x)).square().unflatten(-1, (layer.experts, layer.expert_dim))
    top = torch.einsum("btim,bthi,bthj->btjm", hidden, g1, g2)
    return layer.v(top.flatten(-2)) + torch.einsum("bthj,jd->btd", g2, layer.b)


def official_order_vd(layer: nn.Module, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Algorithm 2: the six terms X11..X23 as separate einsums."""
    x1 = F.relu(layer.u1(x)).square().unflatten(-1, (layer.experts, layer.half_dim))
    x2 = F.relu(layer.u2(x)).square().unflatten(-1, (layer.experts, layer.half_dim))
    x11 = layer.v11(torch.einsum("btim,bthi->btim", x1, g1).flatten(-2))
    x12 = layer.v12(torch.einsum("btjm,bthj,bthi->btim", x2, g2, g1).flatten(-2))
    x13 = torch.einsum("bthi,id->btd", g1, layer.b1)
    x21 = layer.v21(torch.einsum("btim,bthi,bthj->btjm", x1, g1, g2).flatten(-2))
    x22 = layer.v22(torch.einsum("btjm,bthj->btjm", x2, g2).flatten(-2))
    x23 = torch.einsum("bthj,jd->btd", g2, layer.b2)
    return torch.cat((x11 + x12 + x13, x21 + x22 + x23), dim=-1)


def official_router(router: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The router as the official code runs it: BatchNorm1d over the normalised copy, threshold, softmax."""

    def gate(keys: nn.Linear, norm: nn.BatchNorm1d) -> torch.Tensor:
        z = keys(x).unflatten(-1, (router.heads, router.experts)).to(torch.promote_types(x.dtype, torch.float32))
        normalised = norm(z.flatten(0, -3)).view_as(z)
        keep = normalised >= normalised.amax(-1, keepdim=True).clamp_max(router.threshold)
        return torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1)

    return gate(router.w1, router.norm1), gate(router.w2, router.norm2)


class ReluSquaredMLP(nn.Module):
    """Plain dense MLP: down(relu(up(x))^2), hidden width `width` (what a Monet block costs in matmuls)."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, width)
        self.down = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


# --------------------------------------------------------------------------------------------------
# Building cases


def _init(module: nn.Module, seed: int) -> nn.Module:
    """Small random weights everywhere (biases too), so every term of every case does real work."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return module


def _backward_step(forward: Callable[[], Any], params: list[torch.Tensor]) -> Step:
    """A step that runs forward, backward against a fixed random probe, and clears the gradients."""
    probes: dict[int, torch.Tensor] = {}

    def step() -> None:
        outputs = forward()
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        loss = 0.0
        for index, out in enumerate(outputs):
            if index not in probes:
                probes[index] = torch.randn_like(out)
            loss = loss + (out * probes[index]).sum()
        loss.backward()
        for param in params:
            param.grad = None

    return step


def _block_parts(shape: BlockShape, decompose: str, tokens: int, seed: int):
    """(experts layer, router, x, g1, g2) for one shape, with routing from the router in training mode."""

    config = shape.config(decompose)
    layer = _init(build_experts(config), seed)
    router = _init(MonetRouter(config), seed + 1).train()
    generator = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(1, tokens, shape.hidden, generator=generator).requires_grad_(True)
    with torch.no_grad():
        g1, g2 = router(x)
    return layer, router, x, g1.requires_grad_(True), g2.requires_grad_(True)


def block_cases(shape: BlockShape, tokens: int, seed: int) -> dict[str, Step]:
    """Forward+backward steps for every block case of one shape (routers timed alone, amortised later)."""

    cases: dict[str, Step] = {}
    width = shape.experts * shape.moe_dim
    hd, router, x, g1, g2 = _block_parts(shape, "horizontal", tokens, seed)
    vd = _init(build_experts(shape.config("vertical")), seed + 3)
    inputs = [x, g1, g2]
    cases["router"] = _backward_step(lambda: router(x), [x, *router.parameters()])
    cases["router_official"] = _backward_step(lambda: official_router(router, x), [x, *router.parameters()])
    cases["hd"] = _backward_step(lambda: hd(x, g1, g2), [*inputs, *hd.parameters()])
    cases["hd_official"] = _backward_step(lambda: official_order_hd(hd, x, g1, g2), [*inputs, *hd.parameters()])
    cases["vd"] = _backward_step(lambda: vd(x, g1, g2), [*inputs, *vd.parameters()])
    cases["vd_official"] = _backward_step(lambda: official_order_vd(vd, x, g1, g2), [*inputs, *vd.parameters()])
    dense = _init(ReluSquaredMLP(shape.hidden, width), seed + 4)
    cases["dense_relu2"] = _backward_step(lambda: dense(x), [x, *dense.parameters()])
    gated = _init(DenseMLP(shape.config(intermediate_size=width, mlp_type="dense")), seed + 5)
    cases["dense_gated"] = _backward_step(lambda: gated(x), [x, *gated.parameters()])
    return cases


def block_ratios(times: dict[str, dict], groups: int) -> dict[str, dict[str, float]]:
    """Monet block = experts + router / moe_groups; the official-order block likewise."""
    med = {name: value["median_ms"] for name, value in times.items()}
    out = {}
    for kind in ("hd", "vd"):
        block = med[kind] + med["router"] / groups
        official = med[f"{kind}_official"] + med["router_official"] / groups
        out[kind] = {
            "block_ms": block,
            "official_block_ms": official,
            "monet_vs_dense": ratio(block, med["dense_relu2"]),
            "monet_vs_gated": ratio(block, med["dense_gated"]),
            "monet_vs_official_order": ratio(block, official),
            "experts_vs_dense": ratio(med[kind], med["dense_relu2"]),
        }
    return out


def run_blocks(settings: Settings, shapes: list[BlockShape], progress) -> list[dict]:
    results = []
    for shape in shapes:
        progress.set_description(f"blocks {shape.name}")
        cases = block_cases(shape, settings.tokens, settings.seed)
        times = interleaved(cases, settings.repeats, settings.warmup, progress)
        memory = {name: peak_memory_mib(step) for name, step in cases.items()}
        results.append({"shape": asdict(shape), "tokens": settings.tokens, "times": times, "peak_mib": memory,
                        "ratios": block_ratios(times, shape.groups)})
        del cases
    return results


def run_scaling(settings: Settings, progress) -> dict:
    """Block time and parameters for E = 64 .. 512 at fixed d, m, H, k (quick: E = 8 .. 32)."""

    if settings.quick:
        base, experts_list = BlockShape("scale", 64, 8, 4, 2, 2), [8, 16, 32]
    else:
        base, experts_list = BlockShape("scale", 1024, 64, 8, 4, 8), [64, 128, 256, 512]
    rows = []
    for experts in experts_list:
        progress.set_description(f"scaling E={experts}")
        shape = BlockShape(f"E{experts}", base.hidden, experts, base.moe_dim, base.heads, base.topk, base.groups)
        _, router, x, g1, g2 = _block_parts(shape, "horizontal", settings.tokens, settings.seed)
        layers = {kind: _init(build_experts(shape.config(kind)), settings.seed) for kind in ("horizontal", "vertical")}
        cases = {"router": _backward_step(lambda r=router, x=x: r(x), [x, *router.parameters()])}
        for kind, layer in layers.items():
            cases[kind] = _backward_step(lambda lay=layer, x=x, g1=g1, g2=g2: lay(x, g1, g2),
                                         [x, g1, g2, *layer.parameters()])
        times = interleaved(cases, settings.repeats, settings.warmup, progress)
        router_params = sum(p.numel() for p in MonetRouter(shape.config()).parameters())
        for kind, layer in layers.items():
            rows.append({
                "experts": experts, "num_experts": experts**2, "decompose": kind,
                "block_ms": times[kind]["median_ms"] + times["router"]["median_ms"] / shape.groups,
                "experts_ms": times[kind]["median_ms"], "router_ms": times["router"]["median_ms"],
                "expert_params": sum(p.numel() for p in layer.parameters()), "router_params": router_params,
            })
    summary = {}
    for kind in ("horizontal", "vertical"):
        mine = [row for row in rows if row["decompose"] == kind]
        summary[kind] = {
            "time_exponent_vs_E": _log_slope([r["experts"] for r in mine], [r["block_ms"] for r in mine]),
            "param_exponent_vs_E": _log_slope([r["experts"] for r in mine],
                                              [r["expert_params"] + r["router_params"] for r in mine]),
        }
    return {"shape": asdict(base), "tokens": settings.tokens, "rows": rows, "summary": summary,
            "note": "exponent 1 vs E means linear in sqrt(N); 2 would mean linear in N"}


def _log_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(v) for v in xs], [math.log(max(v, 1e-12)) for v in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    den = sum((a - mx) ** 2 for a in lx)
    return num / den if den else float("nan")


def run_masking(settings: Settings, shape: BlockShape, progress) -> dict:
    """Eval-mode block forward (router / groups + experts) with a fraction of the N experts masked."""
    fractions = (0.001, 0.01, 0.15)
    results = {}
    for kind in ("horizontal", "vertical"):
        progress.set_description(f"masking {kind}")
        layer, router, x, _, _ = _block_parts(shape, kind, settings.tokens, settings.seed)
        router.eval()
        x = x.detach()
        num = shape.experts**2
        tables = {"unmasked": None}
        generator = torch.Generator().manual_seed(settings.seed)
        for fraction in fractions:
            table = torch.zeros(num)
            table[torch.randperm(num, generator=generator)[: max(1, round(fraction * num))]] = 1.0
            tables[f"masked_{fraction:g}"] = table

        def forward(table, layer=layer, router=router, x=x):
            def step():
                with torch.no_grad():
                    layer.edit_weights = table
                    g1, g2 = router(x)
                    layer(x, g1, g2)
                    layer.edit_weights = None
            return step

        def route_only(router=router, x=x):
            with torch.no_grad():
                router(x)

        cases = {name: forward(table) for name, table in tables.items()}
        cases["router"] = route_only
        times = interleaved(cases, settings.repeats, settings.warmup, progress)
        router_ms = times["router"]["median_ms"]
        # Each case ran the router once; a block pays it once per group.
        block = {name: times[name]["median_ms"] - router_ms + router_ms / shape.groups for name in tables}
        results[kind] = {
            "times": times,
            "ratios": {name: ratio(block[name], block["unmasked"]) for name in tables if name != "unmasked"},
        }
    return {"shape": asdict(shape), "tokens": settings.tokens, "fractions": list(fractions), **results}


def _model_configs(quick: bool) -> tuple[MonetConfig, MonetConfig, MonetConfig, int, int]:
    """(Monet, dense equal width, dense parameter-matched, batch, length) for whole-model runs."""
    if quick:
        fields = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, moe_experts=16,
                      moe_dim=4, moe_heads=2, moe_topk=2, moe_groups=2, max_position_embeddings=64)
        batch, length = 2, 32
    else:
        fields = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                      moe_experts=256, moe_dim=8, moe_heads=4, moe_topk=8, moe_groups=4,
                      max_position_embeddings=512)
        batch, length = 4, 256
    monet = MonetConfig(**fields, moe_decompose="vertical", hidden_act="relu2")
    width = monet.moe_experts * monet.moe_dim
    dense = MonetConfig(**fields, mlp_type="dense", intermediate_size=width)
    matched = MonetConfig(**fields, mlp_type="dense", intermediate_size=max(1, round(2 * width / 3)))
    return monet, dense, matched, batch, length


def run_train(settings: Settings, progress) -> dict:
    """AdamW training steps/s of whole models on random tokens, interleaved step by step."""

    configs = dict(zip(("monet", "dense", "dense_param_matched"), _model_configs(settings.quick)[:3], strict=True))
    batch, length = _model_configs(settings.quick)[3:]
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, configs["monet"].vocab_size, (batch, length), generator=generator)
    cases, params = {}, {}
    for name, config in configs.items():
        torch.manual_seed(settings.seed)
        model = MonetForCausalLM(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        params[name] = sum(p.numel() for p in model.parameters())

        def step(model=model, optimizer=optimizer):
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        cases[name] = step
    progress.set_description("train")
    times = interleaved(cases, max(settings.repeats, 3), settings.warmup, progress)
    tokens = batch * length
    tps = {name: tokens / (value["median_ms"] / 1e3) for name, value in times.items()}
    return {"tokens_per_step": tokens, "times": times, "tokens_per_s": tps, "parameters": params,
            "configs": {name: _config_summary(config) for name, config in configs.items()},
            "train_monet_vs_dense": ratio(tps["monet"], tps["dense"]),
            "train_monet_vs_dense_param_matched": ratio(tps["monet"], tps["dense_param_matched"])}


def _config_summary(config: MonetConfig) -> dict:
    keys = ("hidden_size", "num_hidden_layers", "mlp_type", "intermediate_size", "moe_experts", "moe_dim",
            "moe_heads", "moe_topk", "moe_groups", "moe_decompose")
    return {key: getattr(config, key) for key in keys}


def run_capture(settings: Settings, progress) -> dict:
    """Eval forward tokens/s, plain vs under `capture_routing` with `active_experts` of every group."""

    config, _, _, batch, length = _model_configs(settings.quick)
    torch.manual_seed(settings.seed)
    model = MonetForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))

    def plain():
        with torch.no_grad():
            model(ids)

    def captured():
        with torch.no_grad(), capture_routing(model) as capture:
            model(ids)
            for group in range(len(capture.groups)):
                capture.experts(group)

    progress.set_description("capture")
    times = interleaved({"forward": plain, "capture": captured}, settings.repeats, settings.warmup, progress)
    tokens = batch * length
    tps = {name: tokens / (value["median_ms"] / 1e3) for name, value in times.items()}
    return {"tokens": tokens, "times": times, "tokens_per_s": tps,
            "capture_vs_forward": ratio(tps["capture"], tps["forward"])}


# --------------------------------------------------------------------------------------------------
# Orchestration and reporting


def machine_info() -> dict:
    """CPU model, cores, torch version and threads, load average."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(), "gpu": "none (CPU only)",
            "compile": os.environ.get("MONET_COMPILE", "0")}


def _progress_total(settings: Settings, shapes: list[BlockShape]) -> int:
    total = 0
    per = settings.repeats
    if "blocks" in settings.sections:
        total += len(shapes) * 8 * per
    if "scaling" in settings.sections:
        total += (3 if settings.quick else 4) * 3 * per
    if "masking" in settings.sections:
        total += 2 * 5 * per
    if "train" in settings.sections:
        total += 3 * max(per, 3)
    if "capture" in settings.sections:
        total += 2 * per
    return total


def run(settings: Settings, command: str = "monet bench") -> dict:
    """Run the chosen sections and return the report (JSON-serialisable)."""
    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, command)
    finally:
        torch.set_num_threads(previous_threads)


def _run(settings: Settings, command: str) -> dict:
    from tqdm import tqdm

    torch.manual_seed(settings.seed)
    shapes = QUICK_SHAPES if settings.quick else BLOCK_SHAPES
    report: dict[str, Any] = {"command": command, "machine": machine_info(), "settings": asdict(settings),
                              "load_average_start": list(os.getloadavg()),
                              "memory_method": "torch.profiler memory events: peak live CPU tensor bytes during "
                                               "one forward+backward, relative to its start"}
    started = time.perf_counter()
    with tqdm(total=_progress_total(settings, shapes), desc="bench", file=sys.stderr, leave=False) as progress:
        if "blocks" in settings.sections:
            report["blocks"] = run_blocks(settings, shapes, progress)
        if "scaling" in settings.sections:
            report["scaling"] = run_scaling(settings, progress)
        if "masking" in settings.sections:
            report["masking"] = run_masking(settings, shapes[-1], progress)
        if "train" in settings.sections:
            report["train"] = run_train(settings, progress)
        if "capture" in settings.sections:
            report["capture"] = run_capture(settings, progress)
    report["seconds"] = time.perf_counter() - started
    report["load_average_end"] = list(os.getloadavg())
    report["ratios"] = headline_ratios(report)
    report["goals"] = {name: {"goal": f"{op} {bound}", "met": _goal_met(report["ratios"].get(name), op, bound)}
                       for name, (op, bound) in GOALS.items()}
    return report


def headline_ratios(report: dict) -> dict:
    """The ratios of issue 6, per shape where they have one."""
    out: dict[str, Any] = {}
    for block in report.get("blocks", []):
        for kind, values in block["ratios"].items():
            key = f"{block['shape']['name']}/{kind}"
            for name in ("monet_vs_dense", "monet_vs_gated", "monet_vs_official_order"):
                out.setdefault(name, {})[key] = values[name]
    masking = report.get("masking")
    if masking:
        for kind in ("horizontal", "vertical"):
            for name, value in masking[kind]["ratios"].items():
                out.setdefault("masked_vs_unmasked", {})[f"{masking['shape']['name']}/{kind}/{name}"] = value
    if "train" in report:
        out["train_monet_vs_dense"] = report["train"]["train_monet_vs_dense"]
        out["train_monet_vs_dense_param_matched"] = report["train"]["train_monet_vs_dense_param_matched"]
    if "capture" in report:
        out["capture_vs_forward"] = report["capture"]["capture_vs_forward"]
    return out


def _goal_met(value, op: str, bound: float) -> bool | None:
    if value is None:
        return None
    values = list(value.values()) if isinstance(value, dict) else [value]
    return all(v <= bound for v in values) if op == "<=" else all(v >= bound for v in values)


def _fmt(stats: dict) -> str:
    return f"{stats['median_ms']:.1f} ({stats['min_ms']:.1f}–{stats['max_ms']:.1f})"


def markdown(report: dict) -> str:
    """The report as markdown tables (the body of benchmarks/RESULTS.md)."""
    machine = report["machine"]
    lines = ["# Benchmark results", "",
             f"Command: `{report['command']}`  ", f"Machine: {machine['cpu']}, {machine['cores']} cores, "
             f"torch {machine['torch']} ({machine['threads']} threads), {machine['gpu']}, "
             f"MONET_COMPILE={machine['compile']}  ",
             f"Load average (1, 5, 15 min) at start: {_loads(report['load_average_start'])}, "
             f"at end: {_loads(report['load_average_end'])}; total {report['seconds']:.0f} s  ",
             f"Settings: {report['settings']['tokens']} tokens per block case, {report['settings']['repeats']} "
             "interleaved repeats after warm-up; times are medians (min–max) in ms, forward+backward "
             "unless stated.  ",
             f"Peak memory: {report['memory_method']}.", ""]
    if "blocks" in report:
        lines += ["## Monet block vs dense MLP vs official contraction order", "",
                  "Block = experts + router / moe_groups. dense relu2 = `down(relu(up x)^2)` of width E*m; "
                  "gated = LLaMA gated MLP of width E*m; official = Algorithms 1-2 einsums + BatchNorm1d router.",
                  "",
                  "| shape | d | E | m | H | k | case | time ms | peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
        for block in report["blocks"]:
            s = block["shape"]
            for name, stats in block["times"].items():
                lines.append(f"| {s['name']} | {s['hidden']} | {s['experts']} | {s['moe_dim']} | {s['heads']} | "
                             f"{s['topk']} | {name} | {_fmt(stats)} | {block['peak_mib'][name]:.1f} |")
        lines += ["", "| shape | decomposition | block ms | monet/dense relu2 | monet/gated | monet/official order "
                  "| experts only/dense |", "|---|---|---|---|---|---|---|"]
        for block in report["blocks"]:
            for kind, r in block["ratios"].items():
                lines.append(f"| {block['shape']['name']} | {kind.upper()} | {r['block_ms']:.1f} | "
                             f"{r['monet_vs_dense']:.2f} | {r['monet_vs_gated']:.2f} | "
                             f"{r['monet_vs_official_order']:.2f} | {r['experts_vs_dense']:.2f} |")
        lines.append("")
    if "scaling" in report:
        sc = report["scaling"]
        lines += ["## Scaling with the number of experts", "",
                  f"d {sc['shape']['hidden']}, m {sc['shape']['moe_dim']}, H {sc['shape']['heads']}, "
                  f"k {sc['shape']['topk']}, {sc['tokens']} tokens. {sc['note']}.", "",
                  "| E | N = E² | decomposition | block ms | expert params | router params |",
                  "|---|---|---|---|---|---|"]
        for row in sc["rows"]:
            lines.append(f"| {row['experts']} | {row['num_experts']} | {row['decompose']} | {row['block_ms']:.1f} | "
                         f"{row['expert_params']:,} | {row['router_params']:,} |")
        for kind, values in sc["summary"].items():
            lines.append(f"\n{kind}: time ∝ E^{values['time_exponent_vs_E']:.2f}, "
                         f"parameters ∝ E^{values['param_exponent_vs_E']:.2f}")
        lines.append("")
    if "masking" in report:
        mk = report["masking"]
        lines += ["## Masked vs unmasked forward", "",
                  f"Shape {mk['shape']['name']}, {mk['tokens']} tokens, eval mode, no grad; block = experts + "
                  "router / moe_groups; fractions of the N = E² experts masked through `edit_weights`.", "",
                  "| decomposition | case | time ms (incl. one router call) | block ratio to unmasked |",
                  "|---|---|---|---|"]
        for kind in ("horizontal", "vertical"):
            for name, stats in mk[kind]["times"].items():
                r = mk[kind]["ratios"].get(name)
                lines.append(f"| {kind} | {name} | {_fmt(stats)} | {'' if r is None else f'{r:.2f}'} |")
        lines.append("")
    if "train" in report:
        tr = report["train"]
        lines += ["## Whole-model training", "",
                  f"AdamW steps on {tr['tokens_per_step']} random tokens per step; configs: "
                  f"`{json.dumps(tr['configs'])}`", "",
                  "| model | parameters | step ms | tokens/s |", "|---|---|---|---|"]
        for name, stats in tr["times"].items():
            lines.append(f"| {name} | {tr['parameters'][name]:,} | {_fmt(stats)} | {tr['tokens_per_s'][name]:.0f} |")
        lines.append("")
    if "capture" in report:
        cp = report["capture"]
        lines += ["## Atlas capture vs plain forward", "",
                  f"{cp['tokens']} tokens per batch; capture = forward under `capture_routing` + `active_experts` "
                  "of every group.", "", "| case | time ms | tokens/s |", "|---|---|---|"]
        for name, stats in cp["times"].items():
            lines.append(f"| {name} | {_fmt(stats)} | {cp['tokens_per_s'][name]:.0f} |")
        lines.append("")
    lines += ["## Headline ratios and goals", "", "| ratio | goal | met | values |", "|---|---|---|---|"]
    for name, value in report["ratios"].items():
        goal = report["goals"].get(name, {})
        shown = ", ".join(f"{k}: {v:.2f}" for k, v in value.items()) if isinstance(value, dict) else f"{value:.2f}"
        lines.append(f"| {name} | {goal.get('goal', '')} | {goal.get('met', '')} | {shown} |")
    return "\n".join(lines) + "\n"


def _loads(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def bench_command(cmd: BenchSettings) -> dict:
    """`monet bench`: run the sections, print markdown (or JSON), optionally write both."""
    tokens = cmd.tokens if cmd.tokens is not None else (32 if cmd.quick else 512)
    repeats = cmd.repeats if cmd.repeats is not None else (1 if cmd.quick else 3)
    unknown = sorted(set(cmd.sections) - set(SECTIONS))
    if unknown:
        raise MonetError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    threads = cmd.threads if cmd.threads is not None else (1 if cmd.quick else None)
    settings = Settings(quick=cmd.quick, tokens=tokens, repeats=repeats, sections=tuple(cmd.sections), threads=threads)
    command = "monet bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "monet bench"
    report = run(settings, command=command)
    if cmd.out:
        write_json(cmd.out, report)
    if cmd.markdown:
        atomic_write(cmd.markdown, markdown(report))
    print(dumps(report) if cmd.json else markdown(report))
    return report
