"""Shared set-up of the atlas, viewer and explain/export tests: a small real code corpus, tiny models
saved as checkpoints, and atlases built from them (cached under pytest's session temp directory)."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import torch

import monet
from monet.checkpoint import save_checkpoint
from monet.interp.atlas import AtlasOptions, build_atlas
from monet.settings import AtlasBuild

OPTIONS = AtlasOptions(max_tokens=3000, top_k=3, split="validation", batch_size=4, seq_len=32)
HOSTILE = [
    'var page = "<script>window.__pwned = 1;</script>";',
    '<img src=x onerror="window.__pwned = 2"> <b>bold</b> &amp; done',
]


def system_code_roots() -> dict[str, list[str]]:
    """Source files every Debian machine with Python and Node.js has (no download): the tests' languages."""
    node = shutil.which("node")
    node_modules = [os.path.normpath(os.path.join(os.path.dirname(os.path.realpath(node)), "..", "lib",
                                                  "node_modules"))] if node else []
    roots = {"python": [sysconfig.get_paths()["stdlib"]], "c": ["/usr/include"],
             "javascript": node_modules + ["/usr/share/nodejs"], "perl": sorted(glob.glob("/usr/share/perl/*")),
             "shell": ["/usr/bin"]}
    return {label: [d for d in dirs if os.path.isdir(d)] for label, dirs in roots.items()
            if any(os.path.isdir(d) for d in dirs)}


def corpus(base: Path) -> Path:
    """The code corpus the other test modules use too (same path and options, built once per session)."""
    from monet.data import build_corpus

    path = base / "monet-train-corpus"
    if not (path / "manifest.json").is_file():
        build_corpus("code", path, max_bytes=300_000, vocab_size=512, progress=False, cache_dir=base / "cache",
                     source_options={"roots": system_code_roots()})
    return path


def tiny_config(**overrides) -> monet.MonetConfig:
    return monet.preset("tiny", vocab_size=512, num_hidden_layers=4, **overrides)


def save_run(path: Path, config: monet.MonetConfig, data: Path, seed: int = 0) -> Path:
    """An untrained model saved as a one-checkpoint run (weights fixed by the seed)."""
    torch.manual_seed(seed)
    model = monet.MonetForCausalLM(config)
    save_checkpoint(path, 1, model, tokenizer_dir=data)
    return path


def load(run: Path):
    from monet.checkpoint import load_checkpoint

    return load_checkpoint(run)


def build_settings(run: Path, data: Path, out: Path, options: AtlasOptions = OPTIONS, **more) -> AtlasBuild:
    """`monet atlas build`'s settings for these options, quiet."""
    return AtlasBuild(run=str(run), data=str(data), out=str(out), quiet=True,
                      **{**dataclasses.asdict(options), **more})


def atlas_of(run: Path, data: Path, out: Path, options: AtlasOptions = OPTIONS) -> Path:
    if not (out / "manifest.json").is_file():
        model, tokenizer = load(run)
        build_atlas(model, tokenizer, build_settings(run, data, out, options, force=True))
    return out


def start_dataset_like(data: Path, out: Path):
    """Create `out` with `data`'s tokenizer files; returns (data's manifest, its tokenizer)."""
    from monet.data import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(data / name, out / name)
    return json.loads((data / "manifest.json").read_text()), load_tokenizer(data)


def hostile_dataset(data: Path, out: Path) -> Path:
    """A dataset whose documents contain HTML/script text, with the corpus's tokenizer."""
    from monet.data.storage import write_split

    if (out / "manifest.json").is_file():
        return out
    manifest, tokenizer = start_dataset_like(data, out)
    docs = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            for t in HOSTILE]
    labels = [manifest["labels"].index("javascript"), manifest["labels"].index("c")]
    for split in ("train", "validation"):
        write_split(out, split, docs, labels, [{"source": "test"} for _ in docs], manifest["vocab_size"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def window_tokens(dataset, doc: int, pos: int, before: int = 12, after: int = 4) -> list[int]:
    tokens = np.asarray(dataset.document(doc))
    return [int(t) for t in tokens[max(0, pos - before):pos + after + 1]]
