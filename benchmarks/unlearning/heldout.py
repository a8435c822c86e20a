"""Held-out projects: each language's Monet mask applied to a project the atlas never saw (issue 23, item 5b).

    OMP_NUM_THREADS=1 python benchmarks/unlearning/heldout.py --demo DEMO --out OUT [--tokens 8192]
                                                             [--dense-rule attribution] [--control N] [--fetch]

DEMO is a finished `monet demo` directory (data/, run/, atlas/, report/; dense-run/ for --dense-rule). For
each language of `HELD_OUT` a second project (its own package, recorded with its version) is read by the
code corpus's own reader (`monet.data.code`: licence headers dropped, generated/minified files and test
trees skipped, long files excerpted) and tokenized with the demo's tokenizer (`build_corpus` with the
demo's data directory as the tokenizer); documents whose content also sits in the demo corpus are refused.
Each language's mask is selected exactly as `monet unlearn` does (`select_for_label` on the demo atlas at the
report's ratio and min_mass) and measured by the protocol's `edit_effect` (paired Δ on the same windows,
95 % CIs from a bootstrap clustered by document):

* held-out: Δ on the language's held-out project, and Δ on the other languages' held-out projects (their
  mean, documents resampled within each language, and the worst one): selectivity off the atlas's data;
* same-project: Δ on the demo's own validation windows of the language (the split `monet unlearn` reads),
  measured here on the same number of tokens.

`--control N` measures N random masks per language, matched to the selection on the target's routing mass
(`unlearn.random_control`, as `monet unlearn` draws them), on a subset of the held-out windows: Δ target
and Δ others of each, and the protocol's `control_comparison` (p-value).

`--dense-rule attribution` also runs the dense model's attribution rule (h23, `monet.experiments.dense_rules`;
zero ablation), as many neurons per language as Monet masked experts (share of units). Writes OUT/heldout.json
and OUT/heldout.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from monet.checkpoint import load_checkpoint
from monet.data import TokenDataset
from monet.data.build import build_corpus
from monet.data.code import CodeSource, _dpkg_version, locate
from monet.data.packages import cache_dir
from monet.evaluate import label_window_sets
from monet.experiments.dense_rules import (
    attribution_rises,
    class_mean_difference,
    neuron_attributions,
    neuron_label_means,
    top_by_score,
)
from monet.experiments.unlearn import (
    EvalPlan,
    Measure,
    atlas_label_means,
    edit_effect,
    open_atlas,
    random_control,
    seen_units,
    select_for_label,
    target_mass,
)
from monet.interp.atlas import plan_windows
from monet.interp.criteria import Selection
from monet.io import write_json

# label -> the held-out project: never in the demo corpus (glibc, Go 1.19's tree, eslint, nmap's NSE scripts,
# php-pear/phpunit/doctrine-dbal, the Python stdlib, Ruby's stdlib, Rust's std library). kind "pypi" is a
# package installed in this venv from PyPI (an immutable release); the others as in `monet.data.code`.
HELD_OUT = (
    CodeSource("c", "system", "libpython3.11-dev", "/usr/include/python3.11", "PSF-2.0", (".c", ".h")),
    CodeSource("go", "deb", "golang-github-spf13-cobra-dev", "usr/share/gocode/src/github.com/spf13/cobra",
               "Apache-2.0", (".go",), r"_test\.go$"),
    CodeSource("javascript", "npm", "webpack@5.94.0", "lib", "MIT", (".js", ".mjs", ".cjs"), r"\.min\.js$"),
    CodeSource("lua", "deb", "lua-penlight", "usr/share/lua/5.1/pl", "MIT", (".lua",)),
    CodeSource("php", "deb", "php-symfony-console", "usr/share/php/Symfony/Component/Console", "MIT", (".php",)),
    CodeSource("python", "pypi", "rich", "rich", "MIT", (".py",), r"^test_"),
    CodeSource("ruby", "deb", "ruby-rack", "usr/share/rubygems-integration/all/gems/rack-*/lib", "MIT", (".rb",)),
    CodeSource("rust", "deb", "librust-serde-dev", "usr/share/cargo/registry/serde-*/src", "MIT OR Apache-2.0",
               (".rs",)),
)
SUFFIX = "@heldout"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def resolve(source: CodeSource, cache: Path, fetch: bool) -> tuple[list[str], str]:
    """(roots, version) of a held-out project."""
    if source.kind == "pypi":
        try:
            dist = importlib.metadata.distribution(source.package)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{source.package} is not installed: pip install {source.package}==15.0.0 "
                             "(the version measured here)") from None
        return [str(dist.locate_file(source.inner))], dist.version
    if source.kind == "system":
        return [source.inner], _dpkg_version(source.package) or "unknown"   # the package that installed it
    found = locate(source, cache, fetch)
    if found is None:
        raise SystemExit(f"{source.package} not found; rerun with --fetch")
    return found


def build_heldout(demo: Path, out: Path, max_bytes: int, fetch: bool) -> tuple[Path, dict]:
    """The held-out dataset (demo tokenizer) and per label its package, version and document overlap."""
    cache = cache_dir()
    packages, roots = {}, {}
    for source in HELD_OUT:
        dirs, version = resolve(source, cache, fetch)
        roots[source.label] = dirs
        packages[source.label] = {"package": source.package, "kind": source.kind, "version": version,
                                  "license": source.license, "roots": dirs}
    data = build_corpus("code", out / "data", max_bytes=max_bytes, tokenizer=str(demo / "data"), seed=0,
                        validation_fraction=0.8, source_options={"roots": roots}, progress=False)
    # Content hashes of the demo corpus: a held-out document must not be one of them.
    demo_hashes = set()
    for split in ("train", "validation"):
        with open(demo / "data" / f"{split}.meta.jsonl") as fh:
            demo_hashes.update(json.loads(line)["sha256"] for line in fh)
    manifest = json.loads((data / "manifest.json").read_text())
    for split in ("train", "validation"):
        with open(data / f"{split}.meta.jsonl") as fh:
            overlap = sum(json.loads(line)["sha256"] in demo_hashes for line in fh)
        if overlap:
            raise SystemExit(f"{overlap} held-out {split} documents are in the demo corpus")
    for label, entry in packages.items():
        entry["validation"] = manifest["splits"]["validation"]["labels"].get(label)
    return data, packages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per label and measurement")
    parser.add_argument("--max-bytes", type=int, default=1_600_000, help="held-out corpus budget (all labels)")
    parser.add_argument("--dense-rule", choices=["attribution"], default=None)
    parser.add_argument("--rule-tokens", type=int, default=40_000)
    parser.add_argument("--control", type=int, default=0,
                        help="matched random masks per language on the held-out projects (Monet; 0: none)")
    parser.add_argument("--control-tokens", type=int, default=1024,
                        help="held-out target tokens per control mask (a quarter of that per other language)")
    parser.add_argument("--fetch", action="store_true", help="download the held-out packages into the cache")
    args = parser.parse_args(argv)
    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = json.loads((demo / "report" / "report.json").read_text())
    seq_len, batch, seed = report["seq_len"], report["batch_size"], report["seed"]

    data, packages = build_heldout(demo, out, args.max_bytes, args.fetch)
    log(f"held-out corpus {data}: " + ", ".join(f"{k} {v['package']} {v['version']}" for k, v in packages.items()))
    heldout_sets, skipped = label_window_sets(TokenDataset(data, split="validation"), seq_len)
    same_sets, _ = label_window_sets(TokenDataset(demo / "data", split="validation"), seq_len)
    sets = {**{f"{k}{SUFFIX}": v for k, v in heldout_sets.items()}, **same_sets}
    plan = EvalPlan.build(sets, seq_len, args.tokens, batch)
    labels = sorted(heldout_sets)

    def measure_all(model) -> dict[str, np.ndarray]:
        return plan.measure(model, {label: plan.positions(label, None) for label in plan.sets})

    def effects(model, select, control=None) -> dict[str, dict]:
        before = measure_all(model)
        rows = {}
        for target in labels:
            selection = select(target)
            held = EvalPlan({k: v for k, v in plan.sets.items() if k.endswith(SUFFIX)},
                            {k: v for k, v in plan.windows.items() if k.endswith(SUFFIX)}, seq_len, batch)
            own = EvalPlan({target: plan.sets[target]}, {target: plan.windows[target]}, seq_len, batch)
            h = edit_effect(model, held, before, selection, f"{target}{SUFFIX}", Measure(None, None), seed)
            s = edit_effect(model, own, before, selection, target, Measure(None, None), seed)
            rows[target] = {
                "masking_ratio": selection.masking_ratio, "units": selection.total,
                "same_project": {"delta": s["delta_target"], "ci95": s["delta_target_ci95"],
                                 "tokens": s["after"][target]["tokens"], "documents": s["after"][target]["documents"],
                                 "before": s["after"][target]["before"]},
                "heldout": {"delta": h["delta_target"], "ci95": h["delta_target_ci95"],
                            "tokens": h["after"][f"{target}{SUFFIX}"]["tokens"],
                            "documents": h["after"][f"{target}{SUFFIX}"]["documents"],
                            "before": h["after"][f"{target}{SUFFIX}"]["before"]},
                "heldout_others": {"delta": h["delta_others"], "ci95": h["delta_others_ci95"],
                                   "worst": h["worst_other"]},
                "heldout_per_label": {k.removesuffix(SUFFIX): {"delta": h["delta"][k], "ci95": h["delta_ci95"][k]}
                                      for k in h["delta"]},
            }
            if control is not None:   # (pools, target -> per-group target mass): matched random masks
                c = random_control(model, held, before, selection, h["windows"], control[0], f"{target}{SUFFIX}",
                                   args.control, args.control_tokens, args.control_tokens // 4, control[1](target),
                                   seed)
                c.pop("windows")
                rows[target]["heldout_control"] = c
            r = rows[target]
            log(f"{target}: same {r['same_project']['delta']:+.3f} held-out {r['heldout']['delta']:+.3f} "
                f"held-out others {r['heldout_others']['delta']:+.3f}")
        return rows

    started = time.perf_counter()
    model, _ = load_checkpoint(demo / "run", device="cpu", load_tokenizer=False)
    model.eval()
    atlas = open_atlas(demo / "atlas", model, demo / "data")
    atlas_labels, means = atlas_label_means(atlas)
    ratio, min_mass = report["ratio"], report["min_mass"]
    control = (seen_units(means), target_mass(means, atlas_labels)) if args.control else None
    results = {"monet": effects(model, lambda t: select_for_label(means, atlas_labels, t, ratio, min_mass), control)}
    log(f"monet: {time.perf_counter() - started:.0f} s")

    if args.dense_rule:
        started = time.perf_counter()
        dense, _ = load_checkpoint(demo / "dense-run", device="cpu", load_tokenizer=False)
        dense.eval()
        train = TokenDataset(demo / "data", split="train")
        windows = plan_windows(train.docs, seq_len, args.rule_tokens)
        _, counts = neuron_label_means(dense, train, windows, batch)
        rises = attribution_rises(*neuron_attributions(dense, train, windows, batch), None)
        width = dense.model.layers[0].mlp.down_proj.in_features
        layers = len(dense.model.layers)
        shares = {t: r["masking_ratio"] for t, r in results["monet"].items()}

        def select_dense(target: str) -> Selection:
            n = max(1, round(shares[target] * width))
            scores = [class_mean_difference(s, train.labels.index(target), counts) for s in rises]
            return Selection(width, layers, top_by_score(scores, n), criterion=f"top {n} by attribution")

        results["dense attribution:zero"] = effects(dense, select_dense)
        log(f"dense: {time.perf_counter() - started:.0f} s")

    write_json(out / "heldout.json", {
        "demo": str(demo), "command": " ".join(sys.argv), "tokens_per_label": args.tokens, "seq_len": seq_len,
        "ratio": ratio, "min_mass": min_mass, "seed": seed, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "packages": packages, "skipped_labels": skipped, "results": results})
    text = markdown(results)
    (out / "heldout.md").write_text(text)
    print(text)
    return 0


def markdown(results: dict) -> str:
    def cell(entry: dict) -> str:
        return f"{entry['delta']:+.3f} [{entry['ci95'][0]:+.3f}, {entry['ci95'][1]:+.3f}]"

    lines = []
    for name, rows in results.items():
        lines += [f"{name}:", "", "| label | share masked | loss before: same / held-out | Δ same-project val | "
                  "Δ held-out project | held-out / same | Δ other languages' held-out (mean) | worst other held-out |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            worst, same, held = r["heldout_others"]["worst"], r["same_project"], r["heldout"]
            lines.append(f"| {label} | {r['masking_ratio']:.3f} | {same['before']:.2f} / {held['before']:.2f} | "
                         f"{cell(same)} | {cell(held)} | {held['delta'] / same['delta']:.2f} | "
                         f"{cell(r['heldout_others'])} | {worst['label'].removesuffix(SUFFIX)} {cell(worst)} |")
        lines.append("")
        controlled = {label: r["heldout_control"] for label, r in rows.items() if "heldout_control" in r}
        if controlled:
            lines += [f"{name}, matched random masks on the held-out projects (a subset of the windows above):", "",
                      "| label | masks | selection Δ target / Δ others | masks' Δ target p95 | masks' Δ others "
                      "median | masks' Δ others near the selection's Δ target | p (dominated) |",
                      "|---|---|---|---|---|---|---|"]
            for label, c in controlled.items():
                comparison = c["comparison"]
                lines.append(f"| {label} | {len(c['deltas'])} | {c['selection_delta']:+.3f} / "
                             f"{c['selection_delta_others']:+.3f} | {c['p95']:+.3f} | "
                             f"{float(np.median(c['others_deltas'])):+.3f} | {comparison['others_near']:+.3f} | "
                             f"{comparison['p_value']:.3f} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
