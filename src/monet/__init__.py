"""Monet: Mixture of Monosemantic Experts for Transformers (arXiv 2412.04139).

`import monet` registers `MonetConfig` and `MonetForCausalLM` with the transformers Auto classes,
so `AutoModelForCausalLM.from_pretrained(dir)` works for directories with `model_type: monet`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from monet.config import PRESETS, MonetConfig, preset
from monet.errors import MonetError
from monet.model import MonetForCausalLM, MonetModel, MonetPreTrainedModel

AutoConfig.register("monet", MonetConfig, exist_ok=True)
AutoModel.register(MonetConfig, MonetModel, exist_ok=True)
AutoModelForCausalLM.register(MonetConfig, MonetForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "MonetConfig",
    "MonetError",
    "MonetForCausalLM",
    "MonetModel",
    "MonetPreTrainedModel",
    "PRESETS",
    "preset",
]
