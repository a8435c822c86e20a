"""Loading our checkpoints from any Hugging Face client, without `import monet` in the client's code.

transformers finds the class of a `model_type` either in its registry (which `import monet` fills) or,
with `trust_remote_code=True`, through `auto_map` in config.json: "class X lives in file F.py beside the
weights". Clients that never import us -- lm-eval's command line, TRL scripts, text-generation servers,
`nnsight.TransformersModel(path)` -- can only take the second road. So every checkpoint this package
writes (`save_pretrained`, hence `save_checkpoint` and `monet train`) carries

* `modeling_monet_lm.py` (`SHIM_FILE`): a few lines that import the INSTALLED `monet` package and re-export
  `MonetConfig`, `MonetModel` and `MonetForCausalLM`;
* `"auto_map"` in config.json pointing at it (`AUTO_MAP`).

Then `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` imports the shim, the shim
imports `monet` (which registers the Auto classes), and loading proceeds exactly as
`monet.MonetForCausalLM.from_pretrained(dir)`: strict weight checks, expert edits re-applied.

Why a shim and not a copy of the modeling code (what transformers' `register_for_auto_class` does):
a copy would be imported a second time under another module name, so the loaded model's classes would
not be ours (routing capture, edits and `isinstance` checks would miss them), and the copy would freeze
today's code in every checkpoint. The shim runs only the tested, installed package; its one cost is that
the client's environment must have `monet-lm` installed -- a missing package is an ImportError that
says so. Directories in the official release layout (whose `auto_map` names the official
`modeling_monet.py`) are untouched by this: after `import monet` our registered classes load them
without remote code, as before; re-saved with `save_pretrained` they get our shim and `auto_map`.

The file name differs from the official `modeling_monet.py` on purpose: transformers caches remote
modules by directory base name and file name, and the official file needs transformers <= 4.47.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monet import __version__
from monet.io import atomic_write

SHIM_MODULE = "modeling_monet_lm"
SHIM_FILE = f"{SHIM_MODULE}.py"
AUTO_MAP = {
    "AutoConfig": f"{SHIM_MODULE}.MonetConfig",
    "AutoModel": f"{SHIM_MODULE}.MonetModel",
    "AutoModelForCausalLM": f"{SHIM_MODULE}.MonetForCausalLM",
}

_SHIM = '''"""Load this checkpoint from any Hugging Face client with the installed `monet` package (monet-lm).

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True ...
    nnsight.TransformersModel(DIR, task="text-generation", trust_remote_code=True)

Written by monet-lm {version}. This file holds no model code: it imports the installed package, whose
classes load the weights exactly as `monet.MonetForCausalLM.from_pretrained(DIR)` does.
"""

try:
    from monet.config import MonetConfig
    from monet.model import MonetForCausalLM, MonetModel
except ImportError as exc:
    raise ImportError(
        "this checkpoint was written by monet-lm and loads with its installed package; "
        f"`pip install monet-lm` in this environment ({{exc}})"
    ) from exc

__all__ = ["MonetConfig", "MonetForCausalLM", "MonetModel"]
'''

_ABSENT = object()


def shim_source() -> str:
    """The text of `modeling_monet_lm.py` (the version that wrote it in a comment; no model code)."""
    return _SHIM.format(version=__version__)


def write_shim(directory: str | os.PathLike) -> Path:
    """Write `modeling_monet_lm.py` into a checkpoint directory (atomically)."""
    path = Path(directory) / SHIM_FILE
    atomic_write(path, shim_source())
    return path


@contextmanager
def auto_map_for_saving(model: Any) -> Iterator[None]:
    """Inside the block, `model.save_pretrained` writes our `AUTO_MAP` into config.json and copies no
    source files: the config's `auto_map` is set to ours (whatever an official checkpoint carried), and the
    `_auto_class` marks that transformers puts on a class it loaded through remote code (which make it copy
    monet/model.py and monet/config.py beside the weights) are lifted from the model's and the config's
    classes. Everything is restored afterwards."""
    config = model.config
    had_map, old_map = hasattr(config, "auto_map"), getattr(config, "auto_map", None)
    config.auto_map = dict(AUTO_MAP)
    classes = [cls for cls in {type(model), type(config)} if getattr(cls, "_auto_class", None) is not None]
    saved = {cls: vars(cls).get("_auto_class", _ABSENT) for cls in classes}
    for cls in classes:
        cls._auto_class = None
    try:
        yield
    finally:
        for cls, value in saved.items():
            if value is _ABSENT:
                del cls._auto_class
            else:
                cls._auto_class = value
        if had_map:
            config.auto_map = old_map
        else:
            del config.auto_map


__all__ = ["AUTO_MAP", "SHIM_FILE", "SHIM_MODULE", "auto_map_for_saving", "shim_source", "write_shim"]
