"""Loading our checkpoints from any Hugging Face client, without `import monet` in the client's code.

Every checkpoint `save_pretrained` writes carries `modeling_monet_lm.py` (`SHIM_FILE`: a few lines that
import the INSTALLED `monet` package and re-export its classes) and an `auto_map` in config.json pointing at
it (`AUTO_MAP`), so `trust_remote_code=True` clients (lm-eval, TRL, nnsight) load the model exactly as
`monet.MonetForCausalLM.from_pretrained(dir)` does. Why a shim and not a copy of the modeling code: see
docs/tools.md. The file name differs from the official `modeling_monet.py` on purpose: transformers caches
remote modules by directory base name and file name, and the official file needs transformers <= 4.47.
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


def write_shim(directory: str | os.PathLike) -> Path:
    """Write `modeling_monet_lm.py` into a checkpoint directory (atomically)."""
    path = Path(directory) / SHIM_FILE
    atomic_write(path, _SHIM.format(version=__version__))
    return path


@contextmanager
def auto_map_for_saving(model: Any) -> Iterator[None]:
    """Inside the block, `model.save_pretrained` writes our `AUTO_MAP` (whatever an official checkpoint
    carried) and copies no source files: the `_auto_class` marks that remote-code loading puts on the
    model's and config's classes are lifted. Everything is restored afterwards."""
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


__all__ = ["AUTO_MAP", "SHIM_FILE", "SHIM_MODULE", "auto_map_for_saving", "write_shim"]
