"""Image examples of experts (VisionMonet): each expert's top images — with the patch that routed to it most — and
its top captions, and a static page that shows them (the image with the patch outlined beside the captions with
the token highlighted). The same image records go into the expert atlas (`monet atlas build RUN --images PAIRS`,
atlas format 3: `image_contexts.parquet` and `images.parquet`; `vision_atlas_parts`, docs/atlas.md), where
`monet atlas query` and `monet view` show them beside the expert's text contexts.

Scores are those of `capture.active_experts` (expert (i, j) of a routing group: sum_h g1_hi g2_hj), never the
E^2 grid per token: per batch only an [examples, N] table of each example's best score per expert is formed, and
merged into a running top-k. Images are routed alone (`<s>` + P image tokens), captions alone (text only), as
in the paper's Figures 9–10, so an expert's image and text examples are independent evidence.
"""

from __future__ import annotations

import html
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from monet.checkpoint import check_vocab_fits, tokenizer_hash
from monet.data import read_manifest as read_data_manifest
from monet.data.images import Pairs, read_pairs
from monet.errors import MonetError
from monet.interp.atlas import TopK
from monet.interp.capture import capture_routing
from monet.io import atomic_write
from monet.model import MonetForCausalLM
from monet.settings import AtlasBuild
from monet.vision import VisionMonetForCausalLM, image_prompt, load_vision, pixels


@dataclass
class ExpertExamples:
    """Per routing group g and expert id n (i*E + j): the k best images (`image_refs[g, n, r]` = image index,
    patch index) and captions (`text_refs` = caption index, token position) by score, best first (score 0:
    no example)."""

    image_scores: np.ndarray   # [G, N, k] float32
    image_refs: np.ndarray     # [G, N, k, 2] int64
    text_scores: np.ndarray
    text_refs: np.ndarray


def _merge(scores: torch.Tensor, refs: torch.Tensor, new_scores: torch.Tensor, new_refs: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k: [N, k] with [N, b] candidates -> [N, k]."""
    both = torch.cat((scores, new_scores), dim=1)
    best = both.topk(scores.shape[1], dim=1)
    return best.values, torch.cat((refs, new_refs), dim=1).gather(1, best.indices[..., None].expand(-1, -1, 2))


def _batch_best(capture: Any, group: int, keep: torch.Tensor, experts: int, first: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, b] best score of each example of the batch per expert, and [N, b, 2] (example index, position)."""
    count, length = keep.shape
    token, expert, score = capture.experts(group).entries()
    valid = keep.reshape(-1)[token]
    token, expert, score = token[valid], expert[valid], score[valid].float()
    row = token // length
    best = torch.zeros(count * experts)
    best.scatter_reduce_(0, row * experts + expert, score, "amax")
    # The position of the best token: the last entry that reaches the row's maximum.
    hit = score >= best[row * experts + expert]
    where = torch.zeros(count * experts, dtype=torch.long)
    where[(row * experts + expert)[hit]] = (token % length)[hit]
    best, where = best.view(count, experts).T, where.view(count, experts).T
    index = (torch.arange(count) + first).expand(experts, -1)
    return best, torch.stack((index, where), dim=-1)


@torch.no_grad()
def top_examples(model: VisionMonetForCausalLM, tokenizer: Any, images: np.ndarray, captions: list[list[int]],
                 top_k: int = 8, batch: int = 64) -> ExpertExamples:
    """The top-k image and caption examples of every expert (images [n, S, S, 3] uint8; captions <s> ... </s>)."""
    if top_k < 1:
        raise MonetError(f"top_k must be >= 1, got {top_k}")
    text = model.config.text_config
    experts, groups = text.moe_experts ** 2, text.num_routing_groups
    device = next(model.parameters()).device
    model.eval()
    tables = []
    for kind in ("image", "text"):
        scores = [torch.zeros(experts, top_k) for _ in range(groups)]
        refs = [torch.zeros(experts, top_k, 2, dtype=torch.long) for _ in range(groups)]
        total = len(images) if kind == "image" else len(captions)
        for start in range(0, total, batch):
            if kind == "image":
                chunk = images[start : start + batch]
                ids = torch.tensor([image_prompt(model.config, tokenizer.bos_token_id)] * len(chunk))
                keep = ids == model.config.image_token_id
                call = {"input_ids": ids.to(device), "pixel_values": pixels(chunk, model.config).to(device)}
                forward = model
            else:
                rows = captions[start : start + batch]
                ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id or 0)
                keep = torch.zeros(ids.shape, dtype=torch.bool)
                for n, row in enumerate(rows):
                    ids[n, : len(row)] = torch.tensor(row)
                    keep[n, 1 : len(row) - 1] = True   # the caption's own tokens: not <s>, not </s>
                lengths = torch.tensor([len(r) for r in rows])
                mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
                call = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
                forward = model.language_model
            with capture_routing(model.language_model) as capture:
                forward(**call, use_cache=False)
                for group in range(groups):
                    best, where = _batch_best(capture, group, keep, experts, start)
                    scores[group], refs[group] = _merge(scores[group], refs[group], best, where)
        if kind == "image":   # patches are counted from the first image token, not from <s>
            offset = len(image_prompt(model.config, tokenizer.bos_token_id)) - model.config.num_image_tokens
            for group in range(groups):
                refs[group][..., 1] -= offset
        tables.append((torch.stack(scores).numpy(), torch.stack(refs).numpy()))
    (image_scores, image_refs), (text_scores, text_refs) = tables
    return ExpertExamples(image_scores, image_refs, text_scores, text_refs)


def write_image_atlas(examples: ExpertExamples, images: np.ndarray, captions: list[list[int]], tokenizer: Any,
                      out: Path, experts: list[tuple[int, int]] | None = None, names: list[str] | None = None,
                      max_experts: int = 64) -> Path:
    """OUT/index.html (static, no script), OUT/experts.json and OUT/images/*.png of the shown experts; `experts`
    defaults to those with both image and caption examples, best top image score first."""
    from PIL import Image  # the `vision` extra

    if experts is None:
        both = (examples.image_scores[..., 0] > 0) & (examples.text_scores[..., 0] > 0)
        order = np.argsort(-np.where(both, examples.image_scores[..., 0], -1).reshape(-1), kind="stable")
        experts = [divmod(int(flat), examples.image_scores.shape[1]) for flat in order[:max_experts]
                   if both.reshape(-1)[flat]]
    side = int(round(np.sqrt(examples.image_refs[..., 1].max() + 1))) if experts else 1
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, sections = [], []
    for group, expert in experts:
        tiles, lines, record = [], [], {"group": group, "expert": expert, "images": [], "captions": []}
        for score, (image, patch) in zip(examples.image_scores[group, expert], examples.image_refs[group, expert],
                                          strict=True):
            if score <= 0:
                continue
            file = out / "images" / f"{image}.png"
            if not file.is_file():
                Image.fromarray(images[image]).save(file)
            row, col = divmod(int(patch), side)
            box = (f"left:{100 * col / side:.3f}%;top:{100 * row / side:.3f}%;width:{100 / side:.3f}%;"
                   f"height:{100 / side:.3f}%")
            label = html.escape(names[image] if names else str(image))
            tiles.append(f'<figure class="tile"><div class="frame"><img src="images/{image}.png" alt="{label}">'
                         f'<span class="patch" style="{box}"></span></div><figcaption>{label} · patch {patch} · '
                         f'{score:.2f}</figcaption></figure>')
            record["images"].append({"image": int(image), "patch": int(patch), "score": float(score)})
        for score, (caption, position) in zip(examples.text_scores[group, expert], examples.text_refs[group, expert],
                                              strict=True):
            if score <= 0:
                continue
            ids = captions[caption]
            pieces = [html.escape(piece) for piece in token_pieces(tokenizer, ids[1:-1])]
            hit = int(position) - 1
            pieces[hit] = f'<mark>{pieces[hit]}</mark>'
            lines.append(f'<li><span class="score">{score:.2f}</span> {"".join(pieces)}</li>')
            record["captions"].append({"caption": int(caption), "token": int(position), "score": float(score)})
        records.append(record)
        sections.append(f'<section class="expert" id="g{group}-e{expert}"><h2>Group {group} / Expert {expert}</h2>'
                        f'<div class="images">{"".join(tiles)}</div><ol class="captions">{"".join(lines)}</ol>'
                        "</section>")
    atomic_write(out / "experts.json", json.dumps(records, indent=1) + "\n")
    atomic_write(out / "index.html", PAGE.replace("SECTIONS", "\n".join(sections)))
    return out / "index.html"


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token adds, by decoding growing prefixes: a character split over several byte-level tokens
    appears whole at the token that completes it (decoding tokens one by one would show U+FFFD halves)."""
    pieces, before = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end]).rstrip("\ufffd")
        pieces.append(text[len(before):] if text.startswith(before) else text)
        before = text
    return pieces


# ------------------------------------------------------------------------- image records in the expert atlas


@torch.no_grad()
def image_tops(model: VisionMonetForCausalLM, tokenizer: Any, images: np.ndarray, top_k: int, batch: int = 32,
               progress: bool = False) -> list[TopK]:
    """Per routing group, a `monet.interp.atlas.TopK` of every expert's k best images as (score, doc = image
    index, pos = patch index). Each image is routed alone (`<s>` then its P image tokens; causal attention makes
    these the routings the image tokens get before any caption), and counts once per expert, at its best patch
    (ties: the first patch), so an expert's top examples are k different images. Only the active (patch, expert)
    entries are formed, never the E^2 grid; ties between images are broken by the smallest (image, patch), as
    the atlas breaks them between contexts."""
    text = model.config.text_config
    experts = text.moe_experts ** 2
    tops = [TopK(experts, top_k) for _ in range(text.num_routing_groups)]
    prompt = image_prompt(model.config, tokenizer.bos_token_id)
    first = len(prompt) - model.config.num_image_tokens   # the position of patch 0
    device = next(model.parameters()).device
    model.eval()
    with capture_routing(model.language_model) as capture, \
            tqdm(total=len(images), unit="img", desc="atlas images", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            ids = torch.tensor([prompt] * len(chunk), device=device)
            model(input_ids=ids, pixel_values=pixels(chunk, model.config).to(device), use_cache=False)
            for group, top in enumerate(tops):
                token, expert, score = (t.cpu().numpy() for t in capture.experts(group).entries())
                row, position = np.divmod(token, len(prompt))
                keep = position >= first
                image, patch = row[keep] + start, position[keep] - first
                expert, score = expert[keep].astype(np.int64), score[keep].astype(np.float32)
                best = _best_patch(image, expert, patch, score, experts)
                top.add(expert[best], score[best], image[best], patch[best])
            bar.update(len(chunk))
    return tops


def _best_patch(image: np.ndarray, expert: np.ndarray, patch: np.ndarray, score: np.ndarray, experts: int
                ) -> np.ndarray:
    """Indices of the best entry of each (image, expert): the highest score, then the first patch."""
    key = image.astype(np.int64) * experts + expert
    order = np.lexsort((patch, -score, key))
    starts = np.ones(len(order), bool)
    starts[1:] = key[order][1:] != key[order][:-1]
    return order[starts]


def write_image_tables(directory: Path, tops: list[TopK], pairs: Pairs, model: VisionMonetForCausalLM) -> dict:
    """`image_contexts.parquet` (group, expert, rank, image, patch, score, label; sorted by (group, expert,
    rank)) and `images.parquet` (image, id, label, caption, png: each image that is some expert's top example,
    as PNG) in `directory`; returns the atlas manifest's "images" section."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image  # the `vision` extra

    labels = sorted(set(pairs.groups))
    label_of = np.array([labels.index(g) for g in pairs.groups], np.int16)
    parts = []
    for group, top in enumerate(tops):
        unit, rank, score, image, patch = top.rows()
        parts.append(pa.table({"group": np.full(len(unit), group, np.int16), "expert": unit.astype(np.int32),
                               "rank": rank.astype(np.int16), "image": image.astype(np.int32),
                               "patch": patch.astype(np.int16), "score": score.astype(np.float32),
                               "label": label_of[image]}))
    contexts = pa.concat_tables(parts)
    pq.write_table(contexts, directory / "image_contexts.parquet", row_group_size=32_768)
    stored = np.unique(contexts.column("image").to_numpy()).tolist()
    pngs = []
    for index in stored:
        buffer = io.BytesIO()
        Image.fromarray(pairs.images[index]).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    pq.write_table(pa.table({"image": pa.array(stored, pa.int32()), "id": [pairs.ids[i] for i in stored],
                             "label": [pairs.groups[i] for i in stored], "caption": [pairs.texts[i] for i in stored],
                             "png": pa.array(pngs, pa.binary())}), directory / "images.parquet", row_group_size=256)
    patches = model.config.num_image_tokens
    return {"images": len(pairs.images), "stored_images": len(stored), "image_size": int(pairs.images.shape[1]),
            "patches": patches, "grid": int(round(patches ** 0.5)), "labels": labels, "top_k": tops[0].k,
            "image_token_id": model.config.image_token_id,
            "routed": "each image alone: <s> then its image tokens; an image counts once per expert, at its best patch"}


def vision_atlas_parts(cmd: AtlasBuild, checkpoint: Path, device: Any = None
                       ) -> tuple[MonetForCausalLM, Any, Callable[[Path], dict] | None]:
    """What `monet atlas build` (`monet.interp.atlas.build_atlas_command`) needs for a VisionMonet checkpoint: its
    language model (the text contexts are routed as text), its tokenizer, and -- with `cmd.images`, an image–caption
    set -- the function that writes the image tables into the atlas and returns the manifest's "images" section."""
    data_dir, images_dir, split = cmd.data, cmd.images, cmd.split
    model, tokenizer = load_vision(checkpoint, device=device, verify=False)
    manifest = read_data_manifest(data_dir)
    data_hash, model_hash = manifest.get("tokenizer_sha256") or tokenizer_hash(data_dir), tokenizer_hash(checkpoint)
    if data_hash and model_hash and data_hash != model_hash:
        raise MonetError(f"the dataset {data_dir} was tokenized with another tokenizer than the model in {checkpoint}; "
                         "use the text data the language model was trained on")
    check_vocab_fits(int(manifest["vocab_size"]), model.config.text_config.vocab_size, where=str(data_dir))
    if images_dir is None:
        return model.language_model, tokenizer, None
    pairs = read_pairs(Path(images_dir), split)
    if pairs.images.ndim != 4 or pairs.images.shape[-1] != 3 or pairs.images.dtype != np.uint8:
        raise MonetError(f"{images_dir}/images.npy holds {pairs.images.dtype} {list(pairs.images.shape)}, not uint8 "
                         "[N, H, W, 3] images; rebuild the image–caption set")

    def write(directory: Path) -> dict:
        started = time.time()
        tops = image_tops(model, tokenizer, pairs.images, cmd.top_k, cmd.batch_size, progress=not cmd.quiet)
        section = write_image_tables(directory, tops, pairs, model)
        return {"pairs": str(Path(images_dir).resolve()), "split": split, **section,
                "seconds": round(time.time() - started, 2)}

    return model.language_model, tokenizer, write


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self'; style-src 'unsafe-inline'">
<title>VisionMonet: image and text examples of experts</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
.expert { border-top: 1px solid #ccc; padding: .6em 0; display: grid; grid-template-columns: minmax(0, 3fr) 2fr;
          gap: 1em; }
.expert h2 { grid-column: 1 / 3; font-size: 15px; margin: 0; }
.images { display: flex; gap: .5em; flex-wrap: wrap; }
.tile { margin: 0; width: 98px; text-align: center; font-size: 11px; color: #555; overflow-wrap: anywhere; }
.frame { position: relative; width: 96px; height: 96px; overflow: hidden; border: 1px solid #bbb; }
.frame img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
.patch { position: absolute; box-sizing: border-box; border: 3px solid #e6007e; }
.captions { margin: 0; padding-left: 1.4em; font-size: 13px; }
.captions mark { background: #ffd5ec; }
.score { color: #888; font-size: 11px; }
</style></head>
<body><h1>VisionMonet: top image and text examples of experts</h1>
<p>Images are routed alone; the outlined patch is the one that routed most to the expert. Captions are routed
alone; the highlighted token is the caption's best.</p>
SECTIONS
</body></html>
"""
