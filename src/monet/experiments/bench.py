"""`monet bench`: one Monet block against a dense relu^2 MLP of equal width, at the released shapes.

A block is the expert layer (HD or VD) plus its router and, on the sparse path, the routing structure
(`prep`), both divided by `moe_groups` (one routing layer serves that many layers); the dense baseline is
down(relu(up x)^2) with hidden width E*m. Sections per shape: forward, train (forward + backward, and the
bytes autograd saves), masking (0.1 %, 1 %, 15 % of the E^2 experts deleted vs none), decode (one new
token for 1 and 4 sequences: the decode path of `monet.sparse.KeptHalves`) and capture. Cases of
a section run interleaved; figures are medians with min-max, ratios medians over medians. How it is
measured, and why, is in docs/performance.md; `--json` writes everything, `ratios` the headline numbers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from monet import sparse
from monet.config import MonetConfig, preset
from monet.errors import MonetError
from monet.interp.capture import capture_routing
from monet.io import atomic_write, write_json
from monet.model import MonetForCausalLM, MonetRouter, RoutingGroup, build_experts
from monet.runtime import resolve_device
from monet.settings import BenchSettings, flag_name

GOALS = {"sparse_vs_dense": ("<=", 0.5), "train_vs_dense": ("<=", 1.0), "masked_vs_unmasked": ("<=", 1.05),
         "capture_vs_forward": (">=", 0.9), "train_memory_vs_dense": ("<=", 1.2), "decode_vs_dense": ("<=", 0.4),
         "decode_batch4_vs_dense": ("<=", 1.0)}
MASK_FRACTIONS = (0.001, 0.01, 0.15)
DECODE_BATCHES = (1, 4)
QUICK = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, moe_experts=16, moe_dim=4, moe_heads=2,
             moe_topk=2, moe_groups=2, vocab_size=256)


def machine_info(expert_path: str = "auto") -> dict:
    """CPU model, cores, torch version and threads, load average, GPU if any, and the forced expert path."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "gpu": gpu, "load_average": list(os.getloadavg()),
            "expert_path": expert_path}


class Timer:
    """Seconds of one call: perf_counter on CPU (or, with clock="cpu", the CPU time of the calling thread,
    which with one torch thread is the op's own time, without the slices the OS gives other processes on a
    loaded machine), CUDA events after a synchronisation on GPU."""

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        self.cuda = device.type == "cuda"
        self.now = time.thread_time if clock == "cpu" else time.perf_counter

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = self.now()
            fn()
            return self.now() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1000.0


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int, timer: Callable) -> dict:
    """Run every case once per round, the first case rotating; {case: [seconds per round]} after warm-up."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timer(cases[name]))
    return times


def summarise(seconds: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(seconds), "min_ms": 1e3 * min(seconds),
            "max_ms": 1e3 * max(seconds), "runs": len(seconds)}


def saved_bytes(fn: Callable[[], object], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn runs, minus `exclude`'s."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _init(module: nn.Module, seed: int) -> nn.Module:
    """Random weights with non-zero biases (zero-initialised ones would hide terms)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02)
    return module


def _with(config: MonetConfig, **fields: object) -> MonetConfig:
    config = copy.deepcopy(config)
    config.update(fields)
    return config


def _backward(out: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    torch.autograd.grad(out, inputs, grad_outputs=torch.ones_like(out) / out.numel() ** 0.5)


def bench_shape(config: MonetConfig, args: BenchSettings) -> dict:
    """Forward, train, memory and masking sections of one shape (HD and VD share the router and baseline)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    timer = Timer(device, args.clock)
    d, width = config.hidden_size, config.moe_experts * config.moe_dim
    x = torch.randn(1, args.tokens, d, device=device, dtype=dtype)
    mlp = _init(nn.Sequential(nn.Linear(d, width), _ReLU2(), nn.Linear(width, d, bias=False)), 0).to(device, dtype)
    router = _init(MonetRouter(config), 1).to(device, dtype).train()
    with torch.no_grad():
        g1, g2 = router(x)
    layers = {kind: _init(build_experts(_with(config, moe_decompose=decompose)), 2).to(device, dtype)
              for kind, decompose in (("hd", "horizontal"), ("vd", "vertical"))}
    routing = [g.detach().requires_grad_(True) for g in (g1, g2)]
    xg = x.detach().requires_grad_(True)
    # Context managers used as decorators: each call of a wrapped case runs on that expert path.
    forced, dense_path = sparse.expert_path(args.path), sparse.expert_path("dense")
    forward = {"dense": lambda: mlp(x), "router": lambda: router(x)}
    train = {"dense": lambda: _backward(mlp(xg), [xg, *mlp.parameters()]),
             "router": lambda: _backward(torch.cat([g.flatten() for g in router(xg)]),
                                         [xg, *router.parameters()])}
    # As in a model, the layers share their routing group, so its sparse structure is built once (in the
    # warm-up) and timed apart ("prep").
    group, train_group = RoutingGroup(g1, g2), RoutingGroup(*routing)
    for kind, layer in layers.items():
        forward[kind] = forced(lambda layer=layer: layer(x, g1, g2, group=group))
        forward[f"{kind}_dense_path"] = dense_path(lambda layer=layer: layer(x, g1, g2, group=group))
        train[kind] = forced(lambda layer=layer: _backward(layer(xg, *routing, group=train_group),
                                                           [xg, *routing, *layer.parameters()]))
    with sparse.expert_path(args.path), torch.no_grad():
        # Only the sparse path builds the routing structure (`prep`); the decode path gathers weights instead.
        sparse_path = {kind: isinstance(sparse.choose(layer, x, g1, g2, lambda: group.sparse_routing(g1, g2, x.dtype)),
                                        sparse.Routing)
                       for kind, layer in layers.items()}
    if any(sparse_path.values()):     # the structure a routing group's first layer builds (reused after)
        forward["prep"] = lambda: sparse.sparse_routing(g1, g2)
    result: dict = {"tokens": args.tokens, "sparse_path": sparse_path,
                    "kept_per_head": float((g1 > 0).sum(-1).float().mean()),
                    "active_halves_per_token": float((g1 > 0).any(-2).sum(-1).float().mean())}
    with torch.no_grad():
        result["forward"] = {k: summarise(v) for k, v in interleaved(forward, args.repeats, args.warmup, timer).items()}
    result["train"] = {k: summarise(v) for k, v in interleaved(train, args.repeats, args.warmup, timer).items()}
    if device.type == "cuda":
        result["cuda_peak_mib"] = {}
        for case, fn in train.items():
            torch.cuda.reset_peak_memory_stats()
            fn()
            result["cuda_peak_mib"][case] = torch.cuda.max_memory_allocated() / 2**20
    weights = [*mlp.parameters(), *router.parameters(), *[p for layer in layers.values() for p in layer.parameters()]]
    memory = {"dense": lambda: mlp(xg), "router": lambda: router(xg),
              **{kind: forced(lambda layer=layer: layer(xg, *routing, group=train_group))
                 for kind, layer in layers.items()}}
    result["saved_mib"] = {k: saved_bytes(fn, [xg, *routing, *weights]) / 2**20 for k, fn in memory.items()}
    result["masking"] = bench_masking(layers, x, g1, g2, args, timer, any(sparse_path.values()))
    result["decode"] = bench_decode(layers, mlp, router, x, args, timer)
    if args.sync_check:
        result["host_syncs"] = sync_check(layers, router, xg, routing, args.path)
    if args.profile:
        result["profiles"] = {kind: _profile(forced(lambda layer=layer: layer(x, g1, g2, group=group)))
                              for kind, layer in layers.items()}
    return result


def sync_check(layers: dict[str, nn.Module], router: MonetRouter, x: torch.Tensor, routing: list[torch.Tensor],
               path: str) -> dict:
    """Each case once under torch.cuda.set_sync_debug_mode("error"), after a synchronisation: "none", or the first
    line of the error the first host sync raised. The expert cases get a fresh routing group, so the routing
    structure (on the kernel path: `monet.sparse.static_routing`) is built inside the check; "masked" deletes
    1 % of the experts (an edit table on the group)."""
    experts = next(iter(layers.values())).experts
    table = torch.zeros(experts * experts, device=x.device)
    table[torch.randperm(experts * experts, device=x.device)[: max(1, experts * experts // 100)]] = 1.0
    g1, g2 = (g.detach() for g in routing)
    cases = {"router_train": lambda: _backward(torch.cat([g.flatten() for g in router(x)]), [x, *router.parameters()])}
    for kind, layer in layers.items():
        cases[f"{kind}_forward"] = lambda layer=layer: layer(x.detach(), g1, g2, group=RoutingGroup(g1, g2))
        cases[f"{kind}_train"] = lambda layer=layer: _backward(layer(x, *routing, group=RoutingGroup(*routing)),
                                                               [x, *routing, *layer.parameters()])
        cases[f"{kind}_masked"] = lambda layer=layer: layer(x.detach(), g1, g2, group=RoutingGroup(g1, g2, table))
    found = {}
    with sparse.expert_path(path):
        for name, fn in cases.items():
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
                found[name] = "none"
            except RuntimeError as error:
                found[name] = (str(error).strip().splitlines() or ["sync"])[0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return found


class _ReLU2(nn.Module):
    """relu(x)^2, the released experts' activation, for the dense baseline."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


def bench_masking(layers: dict[str, nn.Module], x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
                  args: BenchSettings, timer: Timer, prep: bool) -> dict:
    """Eval expert forward with a fraction of the E^2 experts deleted vs none, per decomposition; with
    the sparse path, also the per-group preparation (structure, plus the edited pairs of each table)."""
    n = g1.shape[-1] ** 2
    generator = torch.Generator().manual_seed(3)
    tables = {}
    for fraction in MASK_FRACTIONS:
        deleted = torch.randperm(n, generator=generator)[: max(1, round(fraction * n))]
        tables[f"{100 * fraction:g}%"] = torch.zeros(n).index_fill_(0, deleted, 1.0).to(x.device)

    # One routing group per table, as the decoder passes it: structure and edited pairs built once, timed apart.
    groups = {label: RoutingGroup(g1, g2, table) for label, table in [("none", None), *tables.items()]}

    def masked(layer: nn.Module, group: RoutingGroup) -> object:
        with sparse.expert_path(args.path):
            return layer(x, g1, g2, group=group)

    cases = {f"{kind}/{label}": functools.partial(masked, layer, group) for kind, layer in layers.items()
             for label, group in groups.items()}
    if prep:
        for label, table in [("none", None), *tables.items()]:
            cases[f"prep/{label}"] = lambda table=table: sparse.sparse_routing(g1, g2, table)
    with torch.no_grad():
        times = interleaved(cases, args.repeats, args.warmup, timer)
    return {k: summarise(v) for k, v in times.items()}


def _first_layer(layer: nn.Module, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """The layer as the first of a routing group: a new group, whose plans it builds."""
    return layer(x, g1, g2, group=RoutingGroup(g1, g2))


def bench_decode(layers: dict[str, nn.Module], mlp: nn.Module, router: MonetRouter, x: torch.Tensor,
                 args: BenchSettings, timer: Timer) -> dict:
    """One decoding step of 1 and 4 sequences (one new token each): the experts on the decode path
    (`monet.sparse.KeptHalves`) as the first layer of a routing group (`{kind}_first`: builds the group's
    plan) and as one of the others (`{kind}`: reuses it), on the dense path, the eval router and the dense
    MLP on those tokens (`decode_step` combines them per layer).

    The router is an eval router whose running statistics are those of the section's batch, so each
    head keeps about k halves, as a trained model's does. `auto_path` records what the auto rule picks.
    """
    router = copy.deepcopy(router)
    with torch.no_grad():
        for norm in (router.norm1, router.norm2):
            norm.momentum = 1.0
        router.train()(x)
    router.eval()
    decode, dense_path = sparse.expert_path("decode"), sparse.expert_path("dense")
    generator = torch.Generator().manual_seed(5)
    cases: dict[str, Callable[[], object]] = {}
    auto_path, kept = {}, {}
    for batch in DECODE_BATCHES:
        tokens = torch.randn(batch, 1, x.shape[-1], generator=generator).to(x.device, x.dtype)
        with torch.no_grad():
            g1, g2 = router(tokens)
        cases[f"dense/b{batch}"] = functools.partial(mlp, tokens)
        cases[f"router/b{batch}"] = functools.partial(router, tokens)
        for kind, layer in layers.items():
            # The group's first layer builds the decode plan (a fresh group each call); the others reuse it.
            cases[f"{kind}_first/b{batch}"] = decode(functools.partial(_first_layer, layer, tokens, g1, g2))
            group = RoutingGroup(g1, g2)
            cases[f"{kind}/b{batch}"] = decode(functools.partial(layer, tokens, g1, g2, group=group))
            cases[f"{kind}_dense_path/b{batch}"] = dense_path(functools.partial(layer, tokens, g1, g2))
            with torch.no_grad():
                plan = sparse.choose(layer, tokens, g1, g2, functools.partial(sparse.sparse_routing, g1, g2))
            auto_path[f"{kind}/b{batch}"] = "decode" if isinstance(plan, sparse.KeptHalves) else \
                "sparse" if isinstance(plan, sparse.Routing) else "dense"
        kept[f"b{batch}"] = sparse.kept_halves(g1, g2).active_fraction
    with torch.no_grad():
        times = interleaved(cases, args.repeats, args.warmup, timer)
    return {"batches": list(DECODE_BATCHES), "auto_path": auto_path, "kept_halves_fraction": kept,
            **{k: summarise(v) for k, v in times.items()}}


def bench_capture(config: MonetConfig, args: BenchSettings) -> dict:
    """Forward of a one-routing-group model (eval, calibrated routing statistics) with vs without capture."""
    device, timer = torch.device(args.device), Timer(torch.device(args.device), args.clock)
    config = _with(config, num_hidden_layers=config.moe_groups, vocab_size=1024)
    torch.manual_seed(4)
    model = MonetForCausalLM(config).to(device, getattr(torch, args.dtype))
    length = min(args.tokens, 512)
    ids = torch.randint(0, config.vocab_size, (max(1, args.tokens // length), length), device=device)
    routers = [m for m in model.modules() if isinstance(m, MonetRouter)]
    with torch.no_grad():
        for router in routers:          # running statistics = this batch's (about k kept halves per head)
            router.norm1.momentum = router.norm2.momentum = 1.0
        model.train()(ids)
    model.eval()

    def plain() -> object:
        return model.model(input_ids=ids, use_cache=False)

    def captured() -> object:
        with capture_routing(model, keep_on_device=True) as capture:
            model.model(input_ids=ids, use_cache=False)
            return [capture.experts(group) for group in range(len(capture.groups))]

    with torch.no_grad(), sparse.expert_path(args.path):
        times = interleaved({"forward": plain, "capture": captured}, args.repeats, args.warmup, timer)
    return {"tokens": int(ids.numel()), **{k: summarise(v) for k, v in times.items()}}


def _profile(fn: Callable[[], object], rows: int = 15) -> str:
    with torch.no_grad(), torch.profiler.profile() as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def ratios(report: dict, stat: str = "median_ms") -> dict:
    """The headline ratios from the per-shape sections: medians over medians (or mins over mins: with
    a busy machine the noise only adds time, so the mins are a second, less noisy estimate)."""
    out: dict = {name: {} for name in GOALS if name != "capture_vs_forward"}
    for shape, result in report["shapes"].items():
        groups = result["groups"]
        fwd, train, saved, masking = result["forward"], result["train"], result["saved_mib"], result["masking"]

        def per_group(section: dict, case: str, groups: int = groups) -> float:   # a group's work, per layer
            return section[case][stat] / groups if case in section else 0.0

        router = per_group(fwd, "router")
        for kind in ("hd", "vd"):
            key = f"{shape}/{kind}"
            out["sparse_vs_dense"][key] = (fwd[kind][stat] + router + per_group(fwd, "prep")) / fwd["dense"][stat]
            block = train[kind][stat] + per_group(train, "router") + per_group(fwd, "prep")
            out["train_vs_dense"][key] = block / train["dense"][stat]
            out["train_memory_vs_dense"][key] = (saved[kind] + saved["router"] / groups) / saved["dense"]
            labels = [k.split("/")[1] for k in masking if k.startswith(f"{kind}/")]
            masked = {label: masking[f"{kind}/{label}"][stat] + router + per_group(masking, f"prep/{label}")
                      for label in labels}
            out["masked_vs_unmasked"][key] = max(v / masked["none"] for label, v in masked.items() if label != "none")
            for name, batch in (("decode_vs_dense", 1), ("decode_batch4_vs_dense", 4)):
                out[name][key] = decode_step(result["decode"], kind, batch, groups, stat)
    capture = report["capture"]
    out["capture_vs_forward"] = capture["forward"][stat] / capture["capture"][stat]
    return out


def decode_step(decode: dict, kind: str, batch: int, groups: int, stat: str = "median_ms") -> float:
    """One layer's decoding step over the dense MLP's: a routing group's mean layer (the first builds the
    plan, the other groups - 1 reuse it) plus the router's share, router / groups."""
    def ms(case: str) -> float:
        return decode[f"{case}/b{batch}"][stat]

    layer = (ms(f"{kind}_first") + (groups - 1) * ms(kind)) / groups
    return (layer + ms("router") / groups) / ms("dense")


def _table(title: str, cases: dict) -> list[str]:
    return ["", f"## {title}", "", "| case | median ms | min-max ms |", "|---|---|---|",
            *(f"| {case} | {s['median_ms']:.1f} | {s['min_ms']:.1f}-{s['max_ms']:.1f} |" for case, s in cases.items())]


def to_markdown(report: dict) -> str:
    """A readable page generated from the JSON report (no figures that are not in it)."""
    lines = [f"# monet bench ({report['device']}, {report['dtype']})", "", f"Command: `{report['command']}`", "",
             f"Machine: {json.dumps(report['machine'])}", "",
             f"Load average before / after: {report['load_average_start']} / {report['load_average_end']}", "",
             "| ratio | key | medians | mins | goal (on medians) |", "|---|---|---|---|---|"]
    for name, values in report["ratios"].items():
        op, goal = GOALS[name]
        mins = report["ratios_min"][name]
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            low = mins[key] if isinstance(mins, dict) else mins
            met = value <= goal if op == "<=" else value >= goal
            lines.append(f"| {name} | {key} | {value:.3f} | {low:.3f} | {op} {goal} {'met' if met else 'missed'} |")
    for shape, result in report["shapes"].items():
        for section in ("forward", "train", "masking"):
            lines += _table(f"{shape}: {section} ({result['tokens']} tokens)", result[section])
        decode = result["decode"]
        lines += _table(f"{shape}: decode (one new token per sequence; kept halves {decode['kept_halves_fraction']}, "
                        f"auto picks {decode['auto_path']})", {k: v for k, v in decode.items() if "/b" in k})
        saved = {k: round(v, 1) for k, v in result["saved_mib"].items()}
        lines += ["", f"Saved for backward (MiB): {json.dumps(saved)}"]
    capture = report["capture"]
    lines += _table(f"capture ({capture['tokens']} tokens)", {c: capture[c] for c in ("forward", "capture")})
    return "\n".join(lines) + "\n"


def run(args: BenchSettings) -> dict:
    """The whole report: every shape's sections, capture, the machine and its load, the headline ratios."""
    resolve_device(args.device)   # a clear error when CUDA is asked for and absent
    if args.clock == "cpu" and args.threads != 1:
        raise MonetError("--clock cpu times the calling thread only; use it with --threads 1")
    torch.set_num_threads(args.threads)
    shapes = {"tiny": MonetConfig(**QUICK)} if args.quick else {name: preset(name) for name in args.shapes}
    report: dict = {"command": command_line(args), "device": args.device, "dtype": args.dtype,
                    "machine": machine_info(args.path), "load_average_start": list(os.getloadavg()), "shapes": {}}
    for name, config in shapes.items():
        print(f"monet bench: {name} ({args.tokens} tokens, {args.repeats} repeats)", file=sys.stderr, flush=True)
        report["shapes"][name] = {"groups": config.moe_groups, **bench_shape(config, args)}
    print("monet bench: capture", file=sys.stderr, flush=True)
    report["capture"] = bench_capture(next(iter(shapes.values())), args)
    report["load_average_end"] = list(os.getloadavg())
    report["ratios"] = ratios(report)
    report["ratios_min"] = ratios(report, "min_ms")
    report["goals"] = {name: f"{op} {value}" for name, (op, value) in GOALS.items()}
    return report


def bench_command(args: BenchSettings) -> dict:
    """`monet bench`: run, print the headline ratios, write --json / --markdown (each atomically, and only over
    a file that an earlier `monet bench` wrote, unless --force)."""
    for path, mark in ((args.json, '"ratios"'), (args.markdown, "# monet bench")):
        if path and Path(path).exists() and not args.force:
            text = Path(path).read_text(encoding="utf-8", errors="replace") if Path(path).is_file() else ""
            if mark not in text[:200_000]:
                raise MonetError(f"{path} exists and is not a `monet bench` report; choose another path, "
                                 "or pass --force")
    if args.json and args.markdown and Path(args.json).expanduser().resolve() == \
            Path(args.markdown).expanduser().resolve():
        raise MonetError(f"--json and --markdown name the same file {args.json}; give each its own path")
    if args.quick:
        defaults = {f.name: f.default for f in dataclasses.fields(BenchSettings)}
        ignored = [flag_name(name) for name in ("tokens", "repeats", "warmup", "shapes")
                   if getattr(args, name) != defaults[name]]
        if ignored:
            print(f"monet bench: note: --quick sets its own tiny shape and sizes; {', '.join(ignored)} capped or "
                  "ignored", file=sys.stderr)
        args.tokens, args.repeats, args.warmup = min(args.tokens, 128), min(args.repeats, 2), min(args.warmup, 1)
    report = run(args)
    if args.json:
        write_json(args.json, report)
    if args.markdown:
        atomic_write(args.markdown, to_markdown(report))
    print(json.dumps(report["ratios"], indent=1))
    return report


def command_line(args: BenchSettings) -> str:
    """The options of this run, spelled out (so a report says how to reproduce it)."""
    words = ["monet bench", f"--device {args.device}", f"--dtype {args.dtype}", f"--tokens {args.tokens}",
             f"--repeats {args.repeats}", f"--warmup {args.warmup}", f"--threads {args.threads}", f"--path {args.path}"]
    words += [f"--clock {args.clock}"] if args.clock != "wall" else []
    words += ["--quick"] if args.quick else ["--shapes " + " ".join(args.shapes)]
    return " ".join(words + (["--profile"] if args.profile else []) + (["--sync-check"] if args.sync_check else []))
