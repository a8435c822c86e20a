"""VisionMonet (paper B.3): images routed through a Monet language model's experts, LLaVA-style.

    monet vision train --data PAIRS --out RUN --init-from TEXT_RUN [--vision-tower patch|clip|DIR] ...
    monet vision caption RUN --image FILE.png

An image encoder (a Hugging Face vision tower such as `CLIPVisionModel`, or `PatchEncoder`, a small ViT trained
from scratch here) turns an image into P patch features; a two-layer GELU projector (LLaVA's "mlp2x_gelu") maps
them into the language model's embedding space; the P embeddings replace P copies of a placeholder token
(`image_token_id`) in the input sequence, so image tokens pass through the same decoder, routers and experts as
text. Fine-tuning follows B.2/B.3: the routers' key matrices w1/w2 are frozen (`monet.train.freeze_routers`; the
BatchNorm statistics keep following the data), and the run goes through `monet.train`'s loop, so resume,
checkpoints, the NaN guard and data parallelism are those of text training.

On disk a VisionMonet is a Hugging Face directory: config.json (`model_type: vision_monet`, with `text_config` and
`vision_config` inside) and model.safetensors (keys `vision_tower.*`, `projector.*`, `language_model.*`), loaded
strictly. An image–caption set (`monet.data.images`) is images.npy (uint8 [N, H, W, 3]), captions.jsonl and the
tokenizer of the text data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_file, save_model
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPVisionConfig, CLIPVisionModel, PretrainedConfig

from monet.checkpoint import check_vocab_fits, quiet_transformers, read_config, resolve_checkpoint, tokenizer_hash
from monet.config import MonetConfig
from monet.data.images import read_pairs
from monet.data.tokenizer import load_tokenizer
from monet.errors import MonetError
from monet.generate import generate_tokens
from monet.io import atomic_write, dumps
from monet.model import MonetForCausalLM
from monet.runtime import resolve_device
from monet.settings import VisionCaptionSettings, VisionTrainSettings
from monet.train import Task, build_model_config, train

WEIGHTS = "model.safetensors"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # the normalisation CLIP was trained with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------------
# 1. Configs


class PatchEncoderConfig(PretrainedConfig):
    """A small ViT (conv patchify, learned positions, pre-norm transformer layers) trainable from scratch."""

    model_type = "monet_patch_encoder"

    def __init__(self, image_size: int = 32, patch_size: int = 8, num_channels: int = 3, hidden_size: int = 64,
                 num_hidden_layers: int = 1, num_attention_heads: int = 2, **kwargs: Any) -> None:
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = (hidden_size, num_hidden_layers,
                                                                               num_attention_heads)
        super().__init__(**kwargs)


AutoConfig.register(PatchEncoderConfig.model_type, PatchEncoderConfig, exist_ok=True)


class VisionMonetConfig(PretrainedConfig):
    """A Monet language model (`text_config`), an image encoder (`vision_config`: a `PatchEncoderConfig` or any
    Hugging Face vision config, e.g. `CLIPVisionConfig`) and how images enter the sequence."""

    model_type = "vision_monet"

    def __init__(self, text_config: dict | MonetConfig | None = None, vision_config: dict | PretrainedConfig | None
                 = None, image_token_id: int = 0, vision_feature_layer: int = -2, image_mean: tuple = CLIP_MEAN,
                 image_std: tuple = CLIP_STD, **kwargs: Any) -> None:
        self.text_config = _sub_config(text_config, MonetConfig)
        self.vision_config = _sub_config(vision_config, PatchEncoderConfig)
        self.image_token_id = int(image_token_id)
        self.vision_feature_layer = int(vision_feature_layer)   # LLaVA: the penultimate layer of a HF tower
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        super().__init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        """P: one token per patch (the class token of a HF tower is dropped, as LLaVA does)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def image_size(self) -> int:
        return int(self.vision_config.image_size)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["text_config"] = self.text_config.to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        return out


def _sub_config(value: dict | PretrainedConfig | None, default: type[PretrainedConfig]) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    value = dict(value or {})
    kind = value.pop("model_type", default.model_type)
    value.pop("transformers_version", None)
    if kind == default.model_type:
        return default(**value)
    try:
        return AutoConfig.for_model(kind, **value)
    except ValueError as exc:
        raise MonetError(f"unknown vision config model_type {kind!r} ({exc}); use a Hugging Face vision config "
                         "such as clip_vision_model, or monet_patch_encoder") from exc


# ----------------------------------------------------------------------------------------------------------
# 2. The model


class PatchEncoder(nn.Module):
    """pixels [B, C, S, S] -> patch features [B, P, hidden], P = (S / patch)^2."""

    def __init__(self, config: PatchEncoderConfig) -> None:
        super().__init__()
        if config.image_size % config.patch_size:
            raise MonetError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.config = config
        count = (config.image_size // config.patch_size) ** 2
        self.patchify = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.positions = nn.Parameter(torch.randn(count, config.hidden_size) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(config.hidden_size, config.num_attention_heads, 4 * config.hidden_size,
                                       dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patchify(pixel_values).flatten(2).transpose(1, 2) + self.positions
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class VisionMonetForCausalLM(nn.Module):
    """Vision tower -> projector -> image embeddings in place of the placeholder tokens -> Monet LM.

    `forward` takes the language model's arguments plus `pixel_values` [B, 3, S, S] (one image per sequence,
    normalised; see `pixels`); `input_ids` must hold exactly P = `config.num_image_tokens` placeholder ids per
    row when images are given (`image_prompt` builds such rows). Labels at image positions should be -100.
    """

    def __init__(self, config: VisionMonetConfig, language_model: MonetForCausalLM | None = None,
                 vision_tower: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.language_model = language_model if language_model is not None else MonetForCausalLM(config.text_config)
        self.vision_tower = vision_tower if vision_tower is not None else build_tower(config.vision_config)
        width, hidden = config.vision_config.hidden_size, config.text_config.hidden_size
        self.projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        if not 0 <= config.image_token_id < config.text_config.vocab_size:
            raise MonetError(f"image_token_id {config.image_token_id} is outside the vocabulary "
                             f"[0, {config.text_config.vocab_size})")

    # The language model's expert layers and routers are found through `modules()` (edits, capture, freezing).

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, P, d_model]: the tower's patch features (a HF tower: `vision_feature_layer`'s
        hidden states, class token dropped), projected."""
        if isinstance(self.vision_tower, PatchEncoder):
            features = self.vision_tower(pixel_values)
        else:
            out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
            features = out.hidden_states[self.config.vision_feature_layer]
            features = features[:, -self.config.num_image_tokens:]   # drop the class token(s) in front
        return self.projector(features.to(self.projector[0].weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each row's P placeholder positions replaced by its image's embeddings."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        slots = input_ids == self.config.image_token_id
        count = self.config.num_image_tokens
        per_row = slots.sum(dim=1)
        if input_ids.device.type == "cpu" and not bool((per_row == count).all()):
            raise MonetError(f"each row needs exactly {count} image placeholder tokens "
                             f"(id {self.config.image_token_id}), got {per_row.tolist()}; "
                             "build the prompt with image_prompt()")
        features = self.image_features(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(slots[..., None], features.reshape(-1, features.shape[-1]))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.language_model(inputs_embeds=self.embed(input_ids, pixel_values), **kwargs)

    # -- Hugging Face layout -----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        **_: Any) -> None:
        """config.json and model.safetensors (shared tensors stored once). `state_dict` replaces the model's own
        (`monet.checkpoint.save_checkpoint` passes the full state gathered from FSDP shards)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "config.json", dumps(self.config.to_dict()) + "\n")
        if state_dict is not None:
            save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(directory / WEIGHTS),
                      metadata={"format": "pt"})
        else:
            save_model(self, str(directory / WEIGHTS), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> VisionMonetForCausalLM:
        """Strict load: every tensor of the model must be in model.safetensors, nothing else, same shapes."""
        directory = Path(directory)
        config = read_vision_config(directory)
        if not (directory / WEIGHTS).is_file():
            raise MonetError(f"{directory} has no {WEIGHTS}; VisionMonet loads safetensors weights only")
        model = cls(config)
        try:
            missing, unexpected = load_model(model, str(directory / WEIGHTS), strict=False)
        except (RuntimeError, OSError, ValueError) as exc:   # misshapen tensors, a truncated file
            raise MonetError(f"could not load {directory / WEIGHTS}: {exc}; re-save or re-copy it") from exc
        missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise MonetError(f"the weights in {directory} do not match its config.json: missing {sorted(missing)[:8]}, "
                             f"unexpected {sorted(unexpected)[:8]}")
        return model


def build_tower(config: PretrainedConfig) -> nn.Module:
    """A randomly initialised tower for a config (weights come from a checkpoint or `load_tower`)."""
    if isinstance(config, PatchEncoderConfig):
        return PatchEncoder(config)
    with quiet_transformers():
        return AutoModel.from_config(config)


def load_tower(name: str, image_size: int, patch_size: int, width: int, layers: int) -> nn.Module:
    """`patch`: a fresh PatchEncoder; `clip`: a random-init CLIPVisionModel of that size; otherwise a local
    Hugging Face directory holding a vision model or a whole CLIP (its vision half is used), e.g. a download
    of openai/clip-vit-base-patch16 as in the paper."""
    heads = max(1, width // 32)
    if name == "patch":
        return PatchEncoder(PatchEncoderConfig(image_size=image_size, patch_size=patch_size, hidden_size=width,
                                               num_hidden_layers=layers, num_attention_heads=heads))
    if name == "clip":
        config = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=width,
                                  intermediate_size=4 * width, num_hidden_layers=max(layers, 2),
                                  num_attention_heads=heads, projection_dim=width)
        return build_tower(config)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise MonetError(f"--vision-tower {name!r} is neither 'patch', 'clip' nor a local Hugging Face model "
                         "directory with config.json (e.g. a download of openai/clip-vit-base-patch16)")
    raw = _config_object(path / "config.json", "re-download the vision tower")
    with quiet_transformers():
        if raw.get("model_type") in ("clip", "clip_vision_model"):
            return CLIPVisionModel.from_pretrained(path, use_safetensors=True)
        return AutoModel.from_pretrained(path, use_safetensors=True)


def read_vision_config(directory: Path) -> VisionMonetConfig:
    file = directory / "config.json"
    if not file.is_file():
        raise MonetError(f"{file} is missing: {directory} is not a VisionMonet checkpoint")
    raw = _config_object(file, "re-save the checkpoint")
    if raw.get("model_type") != VisionMonetConfig.model_type:
        raise MonetError(f"{file} describes a {raw.get('model_type')!r} model, not a VisionMonet "
                         "(use `monet generate` for a text-only Monet)")
    raw.pop("transformers_version", None)
    try:
        return VisionMonetConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    except (TypeError, ValueError) as exc:
        raise MonetError(f"{file} is not a valid VisionMonet config ({exc}); re-save the checkpoint") from exc


def _config_object(file: Path, fix: str) -> dict[str, Any]:
    """A config.json read as a JSON object, or one MonetError line (unreadable, not JSON, not an object)."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MonetError(f"{file} is corrupt ({exc}); {fix}") from exc
    if not isinstance(raw, dict):
        raise MonetError(f"{file} is not a JSON object; {fix}")
    return raw


def load_vision(path: str | os.PathLike, device: str | torch.device | None = None, verify: bool = True
                ) -> tuple[VisionMonetForCausalLM, Any]:
    """(model in eval mode, tokenizer) from a vision run directory (newest checkpoint) or checkpoint."""
    directory = resolve_checkpoint(path, verify)
    model = VisionMonetForCausalLM.from_pretrained(directory)
    tokenizer = load_tokenizer(directory)
    check_vocab_fits(len(tokenizer), model.config.text_config.vocab_size, where=str(directory))
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------
# 3. Sequences: pixels, prompts, training examples


def pixels(images: torch.Tensor | np.ndarray, config: VisionMonetConfig) -> torch.Tensor:
    """uint8 images [B, H, W, 3] -> normalised float pixels [B, 3, S, S] at the tower's size (bilinear)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != config.image_size or x.shape[-2] != config.image_size:
        x = F.interpolate(x, size=(config.image_size, config.image_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(config.image_mean)[:, None, None]
    std = torch.tensor(config.image_std)[:, None, None]
    return (x - mean) / std


def image_prompt(config: VisionMonetConfig, bos_id: int | None) -> list[int]:
    """<s> then P placeholder ids: the prefix every image sequence starts with (captions follow)."""
    return ([bos_id] if bos_id is not None else []) + [config.image_token_id] * config.num_image_tokens


def choose_image_token(config: MonetConfig, tokenizer: Any) -> int:
    """An embedding row no text ever uses: the first row past the tokenizer (padded vocabularies), else <unk>
    (a byte-level BPE never emits it)."""
    if len(tokenizer) < config.vocab_size:
        return len(tokenizer)
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in (tokenizer.bos_token_id,
                                                                            tokenizer.eos_token_id):
        return int(tokenizer.unk_token_id)
    raise MonetError("the vocabulary has no spare row for the image placeholder token; train the text model with "
                     "--set vocab_size=<tokenizer size + 1> (or a tokenizer with an <unk> token)")


@dataclass
class CaptionPairs:
    """Image–caption examples: `[i]` -> (uint8 image [H, W, 3], caption token ids with <s> ... </s>)."""

    images: np.ndarray
    captions: list[list[int]]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[np.ndarray, list[int]]:
        return self.images[index], self.captions[index]


def collate_pairs(examples: list[tuple[np.ndarray, list[int]]], config: VisionMonetConfig, seq_len: int,
                  pad_id: int) -> dict[str, torch.Tensor]:
    """<s> [IMG]*P caption </s> <pad>... per row, length `seq_len`; labels only on the caption (and </s>)."""
    count = config.num_image_tokens
    if seq_len < count + 3:
        raise MonetError(f"--seq-len {seq_len} leaves no room for a caption after {count} image tokens; "
                         f"use at least {count + 8}")
    ids = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, (_image, caption) in enumerate(examples):
        bos, text = caption[0], caption[1 : seq_len - count]   # caption = <s> ... </s>
        sequence = [bos] + [config.image_token_id] * count + text
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, count + 1 : len(sequence)] = torch.tensor(text)
        mask[row, : len(sequence)] = 1
    # labels[t] is predicted from position t - 1 (the loss shifts), so the last image token predicts word one.
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": pixels(np.stack([image for image, _ in examples]), config)}


def tokenize_captions(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """<s> text </s> for each caption."""
    body = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] for ids in body]


# ----------------------------------------------------------------------------------------------------------
# 4. Training (through monet.train's loop) and captioning


def vision_task(settings: VisionTrainSettings) -> Task:
    """The `monet.train.Task` of a vision run: image–caption pairs, and a VisionMonet built fresh (language
    model from --init-from, tower from --vision-tower) or loaded from the run's checkpoint on resume."""
    data_dir = Path(settings.data)
    pairs = read_pairs(data_dir, split="train")
    tokenizer = load_tokenizer(data_dir)
    examples = CaptionPairs(pairs.images, tokenize_captions(tokenizer, pairs.texts))
    config_box: list[VisionMonetConfig] = []

    def build(source: Path | None, resumed: bool) -> nn.Module:
        if resumed:
            model = VisionMonetForCausalLM.from_pretrained(source)
        else:
            if source is not None:
                data_hash, model_hash = tokenizer_hash(data_dir), tokenizer_hash(source)
                if data_hash and model_hash and data_hash != model_hash:
                    raise MonetError(f"the captions in {data_dir} use another tokenizer than the language model in "
                                     f"{source}; build the pairs with the text data's tokenizer")
                text_config = read_config(source)
                with quiet_transformers():
                    language_model = MonetForCausalLM.from_pretrained(source, config=text_config)
            else:
                language_model = MonetForCausalLM(build_model_config(settings, len(tokenizer)))
            tower = load_tower(settings.vision_tower, settings.image_size, settings.patch_size,
                               settings.vision_width, settings.vision_layers)
            config = VisionMonetConfig(text_config=language_model.config, vision_config=tower.config,
                                       image_token_id=choose_image_token(language_model.config, tokenizer))
            model = VisionMonetForCausalLM(config, language_model, tower)
        if _freeze_tower(settings):
            model.vision_tower.requires_grad_(False)
        config_box[:] = [model.config]
        return model

    def collate(batch: list[tuple[np.ndarray, list[int]]]) -> dict[str, torch.Tensor]:
        return collate_pairs(batch, config_box[0], settings.seq_len, tokenizer.pad_token_id or 0)

    return Task(examples=examples, collate=collate, build=build)


def _freeze_tower(settings: VisionTrainSettings) -> bool:
    """LLaVA keeps a pretrained encoder frozen; a tower made here (patch, clip) is trained from scratch."""
    if settings.train_tower is not None:
        return not settings.train_tower
    return settings.vision_tower not in ("patch", "clip")


def train_vision(settings: VisionTrainSettings) -> dict[str, Any]:
    """Fine-tune (or resume) a VisionMonet run; returns `monet.train.train`'s summary."""
    if not settings.data or not settings.out:
        raise MonetError("--data (an image–caption set) and --out (the run directory) are required")
    return train(settings, task=vision_task(settings))


@torch.no_grad()
def caption(model: VisionMonetForCausalLM, tokenizer: Any, images: np.ndarray, max_new_tokens: int = 24,
            greedy: bool = True, **options: Any) -> list[str]:
    """One caption per uint8 image [H, W, 3] of `images` [B, H, W, 3] (greedy by default)."""
    device = next(model.parameters()).device
    prompt = torch.tensor([image_prompt(model.config, tokenizer.bos_token_id)] * len(images), device=device)
    embeds = model.embed(prompt, pixels(images, model.config).to(device))
    new = generate_tokens(model.language_model, tokenizer, inputs_embeds=embeds, max_new_tokens=max_new_tokens,
                          greedy=greedy, **options)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def train_command(cmd: VisionTrainSettings) -> None:
    summary = train_vision(cmd)
    last = summary.get("last") or {}
    if last:
        print(f"monet vision train: step {last['step']} loss {last['loss']:.4f}; checkpoint {summary['checkpoint']}")
    else:
        print(f"monet vision train: already at step {summary['resumed_from']}; nothing to do ({summary['checkpoint']})")


def caption_command(cmd: VisionCaptionSettings) -> None:
    from PIL import Image  # optional dependency (the `vision` extra)

    model, tokenizer = load_vision(cmd.run, device=resolve_device(cmd.device))
    images = []
    for name in cmd.image:
        try:
            with Image.open(name) as image:
                images.append(np.asarray(image.convert("RGB").resize((model.config.image_size,) * 2)))
        except OSError as exc:
            raise MonetError(f"cannot read image {name}: {exc}") from exc
    for name, text in zip(cmd.image, caption(model, tokenizer, np.stack(images), cmd.max_new_tokens), strict=True):
        print(f"{name}: {text}")
