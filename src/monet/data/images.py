"""Image–caption sets for VisionMonet (monet.vision): OpenMoji's emoji with their annotations, rasterised.

An image–caption directory holds ``images.npy`` (uint8 [N, S, S, 3], loaded without pickles), ``captions.jsonl``
(one {"id", "text", "group", "split"} per image, in the same order), the tokenizer files of the text data the
language model was trained on, and ``pairs.json`` (count, image size, groups, tokenizer SHA-256, provenance).

OpenMoji (npm ``openmoji``, CC BY-SA 4.0) ships 4,495 colour SVGs and ``data/openmoji.json``: per emoji its
hexcode, a human-written annotation ("weary face"), tags and a group (animals-nature, food-drink, ...). The SVGs
are rasterised with CairoSVG (the ``vision`` extra; it needs the system's libcairo2) onto white.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monet.data.documents import split_of
from monet.data.packages import npm_package
from monet.data.storage import FORMAT_VERSION, MANIFEST, SPLITS, token_dtype, write_split
from monet.data.tokenizer import SPECIAL_TOKENS, save_tokenizer, train_bpe
from monet.errors import MonetError
from monet.io import atomic_write, sha256_file

OPENMOJI = "openmoji@17.0.0"
PAIRS_MANIFEST = "pairs.json"
# Groups with a concept a small image can show; people-body (skin-tone variants of a few hundred gestures),
# flags, components and OpenMoji's own extras are left out.
OPENMOJI_GROUPS = ("smileys-emotion", "animals-nature", "food-drink", "travel-places", "activities", "objects",
                   "symbols")


@dataclass
class Emoji:
    hexcode: str
    group: str
    text: str   # "weary face: crying, face, fail, ..." (annotation, then tags)
    svg: Path


def openmoji_items(cache: Path, fetch: bool = False, groups: tuple[str, ...] = OPENMOJI_GROUPS) -> list[Emoji]:
    """The emoji of `groups` (base forms: no skin-tone variants), in the package's order."""
    root = npm_package(OPENMOJI, cache, fetch)
    if root is None:
        raise MonetError(f"the npm package {OPENMOJI} is not in the cache {cache}; rerun with fetch (needs npm)")
    try:
        table = json.loads((root / "data" / "openmoji.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MonetError(f"cannot read {root / 'data' / 'openmoji.json'}: {exc}") from exc
    items = []
    for row in table:
        svg = root / "color" / "svg" / f"{row['hexcode']}.svg"
        if row["group"] not in groups or row.get("skintone") or not row.get("annotation") or not svg.is_file():
            continue
        tags = ", ".join(t.strip() for t in row.get("tags", "").split(",") if t.strip())
        items.append(Emoji(row["hexcode"], row["group"], f"{row['annotation']}: {tags}" if tags else row["annotation"],
                           svg))
    return items


def rasterise(svgs: list[Path], size: int) -> np.ndarray:
    """uint8 [N, size, size, 3]: each SVG drawn by CairoSVG at `size` pixels, composited onto white."""
    try:
        import cairosvg  # optional: the `vision` extra
        from PIL import Image
    except (ImportError, OSError) as exc:
        raise MonetError(f"rasterising SVGs needs cairosvg and pillow (pip install 'monet[vision]') and the "
                         f"system's libcairo2 (apt-get install libcairo2): {exc}") from exc
    out = np.empty((len(svgs), size, size, 3), dtype=np.uint8)
    for n, path in enumerate(svgs):
        png = cairosvg.svg2png(url=str(path), output_width=size, output_height=size)
        with Image.open(io.BytesIO(png)) as image:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            out[n] = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return out


def write_pairs(out: Path, images: np.ndarray, texts: list[str], groups: list[str], tokenizer_dir: Path,
                ids: list[str] | None = None, splits: list[str] | None = None, provenance: str = "") -> Path:
    """Write an image–caption directory (see the module docstring); splits default to the content-hash split of
    the caption, as text corpora do."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) != len(texts):
        raise MonetError(f"images must be uint8 [N, S, S, 3] with one caption each, got {images.shape} {images.dtype} "
                         f"for {len(texts)} captions")
    out.mkdir(parents=True, exist_ok=True)
    ids = ids or [str(n) for n in range(len(texts))]
    splits = splits or [split_of(text) for text in texts]
    atomic_write(out / "images.npy", lambda fh: np.save(fh, images, allow_pickle=False))
    lines = "".join(json.dumps({"id": i, "text": t, "group": g, "split": s}, ensure_ascii=False) + "\n"
                    for i, t, g, s in zip(ids, texts, groups, splits, strict=True))
    atomic_write(out / "captions.jsonl", lines)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            atomic_write(out / name, (tokenizer_dir / name).read_bytes())
    manifest = {"kind": "image-captions", "count": len(texts), "image_size": int(images.shape[1]),
                "groups": sorted(set(groups)), "tokenizer_sha256": sha256_file(out / "tokenizer.json"),
                "provenance": provenance}
    atomic_write(out / PAIRS_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out


@dataclass
class Pairs:
    images: np.ndarray   # uint8 [n, S, S, 3]
    texts: list[str]
    groups: list[str]
    ids: list[str]


def read_pairs(directory: Path, split: str | None = None) -> Pairs:
    """The pairs of one split ("train", "validation") or all of them."""
    if not (directory / PAIRS_MANIFEST).is_file():
        raise MonetError(f"{directory} is not an image–caption set (no {PAIRS_MANIFEST}); build one with "
                         "monet.data.images.write_pairs (benchmarks/vision/run.py does it for OpenMoji)")
    try:
        images = np.load(directory / "images.npy", allow_pickle=False)
        rows = [json.loads(line) for line in (directory / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError) as exc:
        raise MonetError(f"cannot read the image–caption set {directory}: {exc}; rebuild it") from exc
    if len(rows) != len(images):
        raise MonetError(f"{directory}: {len(images)} images but {len(rows)} captions; rebuild it")
    keep = [n for n, row in enumerate(rows) if split is None or row["split"] == split]
    if not keep:
        raise MonetError(f"{directory} has no {split} pairs")
    return Pairs(images[keep], [rows[n]["text"] for n in keep], [rows[n]["group"] for n in keep],
                 [rows[n]["id"] for n in keep])


def write_text_corpus(out: Path, texts: list[str], labels: list[str], splits: list[str], vocab_size: int = 512,
                      source: str = "captions") -> Path:
    """A `monet data build`-layout dataset (storage format 1) of the captions alone, labelled by group, with a
    byte-level BPE trained on the train split: the text the language model is pretrained on before it sees images.
    """
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(set(labels))
    model = train_bpe((t for t, s in zip(texts, splits, strict=True) if s == "train"), vocab_size)
    save_tokenizer(model, out)
    bos, eos = model.token_to_id(SPECIAL_TOKENS["bos_token"]), model.token_to_id(SPECIAL_TOKENS["eos_token"])
    counts = {}
    for split in SPLITS:
        rows = [n for n, s in enumerate(splits) if s == split]
        ids = [[bos, *enc.ids, eos] for enc in model.encode_batch([texts[n] for n in rows], add_special_tokens=False)]
        counts[split] = write_split(out, split, ids, [names.index(labels[n]) for n in rows],
                                    [{"label": labels[n]} for n in rows], model.get_vocab_size())
    manifest = {"format_version": FORMAT_VERSION, "source": source, "labels": names,
                "vocab_size": model.get_vocab_size(), "tokenizer": "bpe",
                "tokenizer_sha256": sha256_file(out / "tokenizer.json"),
                "special_tokens": {"bos_id": bos, "eos_id": eos}, "dtype": token_dtype(model.get_vocab_size()).name,
                "splits": counts}
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out
