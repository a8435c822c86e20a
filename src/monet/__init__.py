"""Monet: Mixture of Monosemantic Experts for Transformers (arXiv 2412.04139).

`import monet` registers `MonetConfig` and `MonetForCausalLM` with the transformers Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` works for directories with `model_type: monet`. The names
below are loaded on first use; the `monet` command (entry point `monet_cli`) skips the registration so
that `monet --help` starts without torch, and its commands import the model when they need it.
"""

from __future__ import annotations

import importlib
import sys

from monet.errors import MonetError

__version__ = "0.2.0"

_API = {
    "MonetConfig": "monet.config", "PRESETS": "monet.config", "preset": "monet.config",
    "MonetForCausalLM": "monet.model", "MonetModel": "monet.model", "MonetPreTrainedModel": "monet.model",
    "ExpertEdits": "monet.edits", "apply_edits": "monet.edits", "clear_edits": "monet.edits", "edited": "monet.edits",
    "load_checkpoint": "monet.checkpoint", "capture_routing": "monet.interp.capture",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'monet' has no attribute {name!r}")


if "monet_cli" not in sys.modules:
    importlib.import_module("monet.model")   # registers the Auto classes

__all__ = ["MonetError", *_API]
