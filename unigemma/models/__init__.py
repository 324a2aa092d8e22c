"""Model registry: a config's model_type → the module that builds it and its checkpoint renames.

Each entry gives the model class, `rename(name, config) → our name or None (not stored by us)`
and `transform(our name, tensor) → tensor`: the one place a safetensors checkpoint's tensor
names and values are turned into this package's.
"""

from __future__ import annotations

from ..config import ModelConfig
from . import gemma3, gemma4


def _identity(name, tensor):
    return tensor


REGISTRY = {
    "gemma4_unified": (gemma4.Gemma4Unified, gemma4.checkpoint_name_to_module, _identity),
    "gemma4_unified_text": (gemma4.Gemma4Unified, gemma4.checkpoint_name_to_module, _identity),
    "gemma3_text": (gemma3.Gemma3ForCausalLM, gemma3.checkpoint_name_to_module, gemma3.transform),
}


def model_class(config: ModelConfig):
    return REGISTRY[config.model_type][0]


def renames(config: ModelConfig):
    """(rename, transform) for this config's safetensors checkpoints."""
    return REGISTRY[config.model_type][1:]
