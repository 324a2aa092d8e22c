"""unigemma: a fast, faithful, hackable engine for Gemma 4 unified (encoder-free) models.

    model = unigemma.load("path/to/checkpoint", dtype="bfloat16")
    logits = model.logits(input_ids, mm_token_type_ids=..., pixel_values=..., ...)
"""

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, InputError, UnigemmaError
from .generate.greedy import greedy_generate
from .models.gemma4 import Gemma4Unified
from .weights.loader import load

__all__ = ["load", "Gemma4Unified", "ModelConfig", "greedy_generate",
           "UnigemmaError", "ConfigError", "CheckpointError", "InputError"]
__version__ = "0.1.0"
