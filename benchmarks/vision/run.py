"""A miniature VisionMonet (paper B.3, Figures 9-10) on OpenMoji, offline, on a CPU.

    python benchmarks/vision/run.py --out /tmp/vision [--write benchmarks/vision] [--threads 2]

1. OpenMoji 17.0.0 (npm, via the package cache): the emoji of 7 groups, rasterised to 32x32; captions are the
   human-written annotation and tags ("weary face: crying, face, fail, ...").
2. A small Monet is pretrained on the captions alone (`monet train`), then fine-tuned on image–caption pairs with
   a patch encoder trained from scratch and the router key matrices frozen (`monet vision train`).
3. Multimodal experts: for every expert, its top-K images (max routing score over the image's patch tokens, image
   alone) and its top-K captions (max over the caption's tokens, text alone). An expert "agrees" when the majority
   group of its top images equals that of its top captions. The share of agreeing experts (bootstrap CI over
   experts) is compared with a shuffled control (image groups permuted).
4. A figure like the paper's Figure 9: a few agreeing experts, their top images beside their top captions.
5. Cross-modal unlearning: the experts of one group (top images AND top captions of that group, selected on the
   train pairs) are deleted; Δ caption loss given the image on held-out pairs of that group and of the others,
   with a paired bootstrap CI and a control of as many random active experts.
6. The expert atlas of the fine-tuned model with image tokens (`monet atlas build RUN --data TEXT --images PAIRS`):
   `monet view OUT/atlas` shows each expert's top images (patch outlined) beside its top caption contexts.

Finished steps are reused when --out already holds them. Writes results.json, RESULTS.md and figure.png into
--write.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from monet.data.documents import split_of
from monet.data.images import openmoji_items, rasterise, read_pairs, write_pairs, write_text_corpus
from monet.data.packages import cache_dir
from monet.edits import ExpertEdits, edited
from monet.experiments.protocol_stats import delta_ci, random_masks
from monet.interp.atlas import build_atlas_command
from monet.interp.capture import capture_routing
from monet.interp.image_examples import top_examples, vision_atlas_parts, write_image_atlas
from monet.model import causal_lm_loss
from monet.settings import AtlasBuild, TrainSettings, VisionTrainSettings
from monet.train import train
from monet.vision import collate_pairs, image_prompt, load_vision, tokenize_captions, train_vision

IMAGE_SIZE, PATCH = 32, 8
VALIDATION = 0.2
MODEL = ("hidden_size=64", "num_hidden_layers=4", "num_attention_heads=4", "num_key_value_heads=2", "moe_dim=8",
         "moe_heads=4", "moe_experts=16", "moe_topk=4", "moe_groups=2", "intermediate_size=128")
TOP_K = 5
SEQ_LEN = 64


def log(message: str) -> None:
    print(f"[vision {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------- data


def prepare(out: Path) -> tuple[Path, Path]:
    """(text corpus dir, image–caption dir), built once."""
    text_dir, pairs_dir = out / "text-data", out / "pairs"
    if (pairs_dir / "pairs.json").is_file():
        return text_dir, pairs_dir
    items = openmoji_items(cache_dir(), fetch=True)
    texts = [item.text for item in items]
    groups = [item.group for item in items]
    splits = [split_of(text, VALIDATION) for text in texts]
    log(f"{len(items)} emoji in {len(set(groups))} groups; rasterising at {IMAGE_SIZE} px")
    images = rasterise([item.svg for item in items], IMAGE_SIZE)
    write_text_corpus(text_dir, texts, groups, splits, vocab_size=512, source="openmoji captions")
    write_pairs(pairs_dir, images, texts, groups, text_dir, ids=[item.hexcode for item in items], splits=splits,
                provenance="npm openmoji@17.0.0 (CC BY-SA 4.0): color/svg + data/openmoji.json")
    return text_dir, pairs_dir


def pretrain(text_dir: Path, out: Path, steps: int) -> Path:
    run = out / "text-run"
    train(TrainSettings(data=str(text_dir), out=str(run), preset="tiny", set=MODEL, max_steps=steps, batch_size=16,
                        seq_len=SEQ_LEN, lr=3e-3, min_lr=3e-4, warmup_steps=30, eval_interval=steps,
                        save_interval=steps, quiet=True, device="cpu", seed=0))
    return run


def finetune(pairs_dir: Path, text_run: Path, out: Path, steps: int) -> Path:
    run = out / "vision-run"
    train_vision(VisionTrainSettings(data=str(pairs_dir), out=str(run), init_from=str(text_run), max_steps=steps,
                                     batch_size=16, seq_len=SEQ_LEN, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                                     eval_interval=0, save_interval=steps, image_size=IMAGE_SIZE, patch_size=PATCH,
                                     vision_width=64, vision_layers=2, quiet=True, device="cpu", seed=0))
    return run


# ---------------------------------------------------------------------------------------------------------- experts


@torch.no_grad()
def expert_maxima(model, tokenizer, images: np.ndarray | None, captions: list[list[int]] | None,
                  batch: int = 64) -> list[np.ndarray]:
    """Per routing group, [examples, N] of each expert's largest routing score over an example's tokens: the
    image's patch tokens (images alone) or the caption's tokens (text alone, <s> excluded)."""
    count = len(images) if images is not None else len(captions)
    experts = model.config.text_config.moe_experts ** 2
    groups = model.config.text_config.num_hidden_layers // model.config.text_config.moe_groups
    out = [np.zeros((count, experts), np.float32) for _ in range(groups)]
    pad = tokenizer.pad_token_id or 0
    for start in range(0, count, batch):
        if images is not None:
            chunk = images[start : start + batch]
            ids = torch.tensor([image_prompt(model.config, tokenizer.bos_token_id)] * len(chunk))
            keep = ids == model.config.image_token_id
            kwargs = {"input_ids": ids, "pixel_values": collate_pairs([(im, [0, 0]) for im in chunk], model.config,
                                                                      ids.shape[1] + 2, pad)["pixel_values"]}
            forward = model
        else:
            rows = captions[start : start + batch]
            length = max(len(r) for r in rows)
            ids = torch.full((len(rows), length), pad)
            mask = torch.zeros_like(ids)
            for n, row in enumerate(rows):
                ids[n, : len(row)], mask[n, : len(row)] = torch.tensor(row), 1
            keep = mask.bool()
            keep[:, 0] = False
            kwargs, forward = {"input_ids": ids, "attention_mask": mask}, model.language_model
        with capture_routing(model.language_model) as capture:
            forward(**kwargs, use_cache=False)
            for group in range(groups):
                token, expert, score = capture.experts(group).entries()
                valid = keep.reshape(-1)[token]
                row = token[valid] // ids.shape[1]
                flat = torch.zeros(len(ids) * experts)
                flat.scatter_reduce_(0, row * experts + expert[valid], score[valid].float(), "amax")
                out[group][start : start + len(ids)] = flat.view(len(ids), experts).numpy()
    return out


def majority(labels: np.ndarray) -> tuple[str, float]:
    name, hits = Counter(labels.tolist()).most_common(1)[0]
    return name, hits / len(labels)


def top(values: np.ndarray, tiebreak: np.ndarray) -> list[int]:
    """The TOP_K largest values' indices; ties are broken by a fixed random key, not by position (the package
    lists emoji group by group, so positional tie-breaking would make the top examples of a tie agree)."""
    return np.lexsort((tiebreak, -values))[:TOP_K].tolist()


def expert_table(image_max: list[np.ndarray], text_max: list[np.ndarray], groups: np.ndarray) -> list[dict]:
    """One row per expert active on at least TOP_K images and TOP_K captions: its top examples and their groups."""
    tiebreak = np.random.default_rng(0).permutation(len(groups))
    rows = []
    for group, (im, tx) in enumerate(zip(image_max, text_max, strict=True)):
        eligible = np.flatnonzero(((im > 0).sum(0) >= TOP_K) & ((tx > 0).sum(0) >= TOP_K))
        for expert in eligible:
            rows.append({"group": group, "expert": int(expert), "top_images": top(im[:, expert], tiebreak),
                         "top_texts": top(tx[:, expert], tiebreak)})
    return rows


def agreement(rows: list[dict], image_groups: np.ndarray, text_groups: np.ndarray) -> np.ndarray:
    return np.array([majority(image_groups[r["top_images"]])[0] == majority(text_groups[r["top_texts"]])[0]
                     for r in rows], dtype=np.float64)


def multimodal_share(rows: list[dict], groups: np.ndarray, reps: int = 1000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    agree = agreement(rows, groups, groups)
    boots = agree[rng.integers(0, len(agree), size=(reps, len(agree)))].mean(axis=1)
    shuffled = np.array([agreement(rows, rng.permutation(groups), groups).mean() for _ in range(200)])
    return {"experts": len(rows), "share": float(agree.mean()), "ci95": np.percentile(boots, [2.5, 97.5]).tolist(),
            "shuffled_mean": float(shuffled.mean()), "shuffled_p95": float(np.percentile(shuffled, 95)),
            "top_k": TOP_K}


# ---------------------------------------------------------------------------------------------------------- unlearning


@torch.no_grad()
def caption_losses(model, tokenizer, images: np.ndarray, captions: list[list[int]], batch: int = 64) -> np.ndarray:
    """Mean loss (nats/token) of each caption given its image."""
    out = []
    for start in range(0, len(captions), batch):
        examples = list(zip(images[start : start + batch], captions[start : start + batch], strict=True))
        inputs = collate_pairs(examples, model.config, SEQ_LEN, tokenizer.pad_token_id or 0)
        logits = model(**inputs, use_cache=False).logits
        per_token = causal_lm_loss(logits, inputs["labels"], reduction="none")
        counts = (inputs["labels"][:, 1:] != -100).sum(1)
        out.append((per_token.sum(1) / counts).numpy())
    return np.concatenate(out)


def image_use(model, tokenizer, val_pairs) -> dict:
    """Does the caption loss depend on the image? Held-out captions given their own image vs given another
    image (a fixed derangement), paired bootstrap CI: without a gap there is nothing for multimodal experts
    to carry."""
    captions = tokenize_captions(tokenizer, val_pairs.texts)
    own = caption_losses(model, tokenizer, val_pairs.images, captions)
    other = np.roll(np.random.default_rng(0).permutation(len(captions)), 1)
    shuffled = caption_losses(model, tokenizer, val_pairs.images[other], captions)
    return {"own_image": float(own.mean()), "other_image": float(shuffled.mean()), "delta": delta_ci(own, shuffled)}


def unlearning(model, tokenizer, train_pairs, val_pairs, train_rows: list[dict], random_draws: int = 8) -> list[dict]:
    groups = np.array(train_pairs.groups)
    val_groups = np.array(val_pairs.groups)
    captions = tokenize_captions(tokenizer, val_pairs.texts)
    before = caption_losses(model, tokenizer, val_pairs.images, captions)
    seen = {}
    for r in train_rows:
        seen.setdefault(r["group"], []).append(r["expert"])
    results = []
    for name in sorted(set(groups)):
        chosen: dict[int, list[int]] = {}
        for r in train_rows:
            if majority(groups[r["top_images"]])[0] == name and majority(groups[r["top_texts"]])[0] == name:
                chosen.setdefault(r["group"], []).append(r["expert"])
        total = sum(len(v) for v in chosen.values())
        if not total:
            results.append({"group": name, "experts": 0})
            continue

        def deltas(selection: dict[int, list[int]], name: str = name) -> tuple[dict, dict]:
            edits = ExpertEdits()
            for group, ids in selection.items():
                edits.delete(group, ids)
            with edited(model.language_model, edits):
                after = caption_losses(model, tokenizer, val_pairs.images, captions)
            target, others = val_groups == name, val_groups != name
            return delta_ci(before[target], after[target]), delta_ci(before[others], after[others])

        target, others = deltas(chosen)
        controls = [deltas({g: m.tolist() for g, m in mask.items()})
                    for mask in random_masks({g: len(v) for g, v in chosen.items()}, seen, n=random_draws)]
        random_target = [c[0]["delta"] for c in controls]
        random_others = [c[1]["delta"] for c in controls]
        results.append({"group": name, "experts": total, "delta_target": target, "delta_others": others,
                        "random_delta_target_mean": float(np.mean(random_target)),
                        "random_delta_target_p95": float(np.percentile(random_target, 95)),
                        "random_delta_others_mean": float(np.mean(random_others))})
        log(f"unlearning {name}: {total} experts, Δ target {target['delta']:+.3f}, Δ others {others['delta']:+.3f}, "
            f"random Δ target p95 {results[-1]['random_delta_target_p95']:+.3f}")
    return results


# ---------------------------------------------------------------------------------------------------------- report


def figure(rows: list[dict], pairs, path: Path, count: int = 4) -> list[dict]:
    """Figure 9 in miniature: agreeing experts (purest first), top images left, top captions right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = np.array(pairs.groups)

    def purity(r: dict) -> float:
        return majority(groups[r["top_images"]])[1] + majority(groups[r["top_texts"]])[1]

    agreeing = [r for r in rows if majority(groups[r["top_images"]])[0] == majority(groups[r["top_texts"]])[0]]
    shown = sorted(agreeing, key=lambda r: (-purity(r), r["group"], r["expert"]))[:count]
    fig, axes = plt.subplots(len(shown), TOP_K + 1, figsize=(2 * TOP_K + 6, 2.1 * len(shown)), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * TOP_K + [4]})
    for line, r in zip(axes, shown, strict=True):
        for ax, index in zip(line[:TOP_K], r["top_images"], strict=True):
            ax.imshow(pairs.images[index], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        line[0].set_ylabel(f"G{r['group']} #{r['expert']}\n{majority(groups[r['top_images']])[0]}", fontsize=9)
        text = "\n".join(pairs.texts[i].split(":")[0][:48] for i in r["top_texts"])
        line[-1].text(0.02, 0.5, text, va="center", fontsize=9, family="monospace")
        line[-1].axis("off")
    fig.suptitle("VisionMonet (miniature, OpenMoji): top images and top captions of multimodal experts", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [{"group": r["group"], "expert": r["expert"], "images": [pairs.ids[i] for i in r["top_images"]],
             "captions": [pairs.texts[i].split(":")[0] for i in r["top_texts"]]} for r in shown]


def markdown(result: dict) -> str:
    share = result["multimodal"]
    lines = [
        "# VisionMonet miniature (OpenMoji): results", "",
        "Emoji images and annotations: OpenMoji 17.0.0 (openmoji.org, npm `openmoji`), CC BY-SA 4.0.", "",
        f"Command: `{result['command']}`; {result['seconds']:.0f} s wall on {result['machine']}.", "",
        "## Does the model use the image?", "",
        f"Held-out caption loss given its own image {result['image_use']['own_image']:.3f} nats/token, given another "
        f"image {result['image_use']['other_image']:.3f}: Δ {result['image_use']['delta']['delta']:+.3f} "
        f"(95% CI {result['image_use']['delta']['ci95'][0]:+.3f}, {result['image_use']['delta']['ci95'][1]:+.3f}; "
        f"{result['pairs']['validation']} pairs).", "",
        "## Multimodal experts", "",
        f"Experts active on at least {share['top_k']} images and {share['top_k']} captions: {share['experts']}. "
        f"Share whose top-{share['top_k']} images and top-{share['top_k']} captions have the same majority group: "
        f"**{share['share']:.3f}** (95% bootstrap CI over experts {share['ci95'][0]:.3f}–{share['ci95'][1]:.3f}); "
        f"shuffled control (image groups permuted, 200 draws): mean {share['shuffled_mean']:.3f}, "
        f"p95 {share['shuffled_p95']:.3f}.", "",
        "![experts](figure.png)", "",
        "## Cross-modal unlearning (caption loss given the image, held-out pairs)", "",
        "| group | experts deleted | Δ target [95% CI] | Δ others [95% CI] | random Δ target mean / p95 |"
        " random Δ others |",
        "|---|---:|---|---|---|---:|",
    ]
    for row in result["unlearning"]:
        if not row["experts"]:
            lines.append(f"| {row['group']} | 0 | – | – | – | – |")
            continue
        t, o = row["delta_target"], row["delta_others"]
        lines.append(f"| {row['group']} | {row['experts']} | "
                     f"{t['delta']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] | "
                     f"{o['delta']:+.3f} [{o['ci95'][0]:+.3f}, {o['ci95'][1]:+.3f}] | "
                     f"{row['random_delta_target_mean']:+.3f} / {row['random_delta_target_p95']:+.3f} | "
                     f"{row['random_delta_others_mean']:+.3f} |")
    lines += ["", "Image examples of the figure's experts (patch outlined, token marked): "
              "[image-examples/index.html](image-examples/index.html).", "",
              f"Expert atlas with image tokens (format {result['atlas']['format_version']}: "
              f"{result['atlas']['tokens']:,} caption tokens and {result['atlas']['images']:,} images of the train "
              f"split, {result['atlas']['build_seconds']:.0f} s): `monet view {result['atlas']['path']}`.", "",
              f"Training: {json.dumps(result['training'])}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("vision-demo"))
    parser.add_argument("--write", type=Path, default=None, help="where results.json, RESULTS.md, figure.png go")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--text-steps", type=int, default=400)
    parser.add_argument("--vision-steps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    write = args.write or args.out
    write.mkdir(parents=True, exist_ok=True)
    text_dir, pairs_dir = prepare(args.out)
    log("pretraining on captions")
    text_run = pretrain(text_dir, args.out, args.text_steps)
    log("fine-tuning with images (routers frozen)")
    vision_run = finetune(pairs_dir, text_run, args.out, args.vision_steps)
    model, tokenizer = load_vision(vision_run)
    everything, train_pairs, val_pairs = (read_pairs(pairs_dir), read_pairs(pairs_dir, "train"),
                                          read_pairs(pairs_dir, "validation"))
    log("routing scores of images and captions")
    rows = expert_table(expert_maxima(model, tokenizer, everything.images, None),
                        expert_maxima(model, tokenizer, None, tokenize_captions(tokenizer, everything.texts)),
                        np.array(everything.groups))
    share = multimodal_share(rows, np.array(everything.groups))
    log(f"multimodal share {share['share']:.3f} {share['ci95']} vs shuffled {share['shuffled_mean']:.3f}")
    shown = figure(rows, everything, write / "figure.png")
    train_rows = expert_table(expert_maxima(model, tokenizer, train_pairs.images, None),
                              expert_maxima(model, tokenizer, None, tokenize_captions(tokenizer, train_pairs.texts)),
                              np.array(train_pairs.groups))
    uses = image_use(model, tokenizer, val_pairs)
    log(f"caption loss with its own image {uses['own_image']:.3f}, with another image {uses['other_image']:.3f}")
    forget = unlearning(model, tokenizer, train_pairs, val_pairs, train_rows)
    log("image examples page")
    examples = top_examples(model, tokenizer, everything.images, tokenize_captions(tokenizer, everything.texts),
                            top_k=6)
    write_image_atlas(examples, everything.images, tokenize_captions(tokenizer, everything.texts), tokenizer,
                      write / "image-examples", experts=[(r["group"], r["expert"]) for r in shown],
                      names=[t.split(":")[0] for t in everything.texts])
    log("expert atlas with image tokens")
    atlas = build_atlas_command(AtlasBuild(run=str(vision_run), data=str(text_dir), out=str(args.out / "atlas"),
                                           images=str(pairs_dir), split="train", max_tokens=None, top_k=TOP_K,
                                           device="cpu", quiet=True, force=True), vision=vision_atlas_parts)
    manifest = json.loads((atlas / "manifest.json").read_text(encoding="utf-8"))
    metrics = {name: (args.out / name / "metrics.csv").read_text().strip().splitlines()[-1]
               for name in ("text-run", "vision-run")}
    result = {"command": f"python benchmarks/vision/run.py --out {args.out} --threads {args.threads}",
              "seconds": time.perf_counter() - started,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, load average "
                         f"{os.getloadavg()[0]:.1f} at the end",
              "pairs": {"train": len(train_pairs.texts), "validation": len(val_pairs.texts)},
              "training": {"text_steps": args.text_steps, "vision_steps": args.vision_steps, "last_rows": metrics},
              "image_use": uses, "multimodal": share, "figure_experts": shown, "unlearning": forget,
              "atlas": {"path": str(atlas), "format_version": manifest["format_version"], "tokens": manifest["tokens"],
                        "images": manifest["images"]["images"], "build_seconds": manifest["build_seconds"]}}
    (write / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (write / "RESULTS.md").write_text(markdown(result), encoding="utf-8")
    log(f"done in {result['seconds']:.0f} s; wrote {write}")


if __name__ == "__main__":
    main()
