"""The family registry: a config's model_type (or a GGUF file's arch) → its family module's `Family`.

Config parsing, the safetensors and GGUF loaders, checkpoint saving and quantization ask this
registry and nothing else about a family (models/base.py `Family` lists what each supplies).
Adding a family is one models/<family>.py exporting `FAMILY` and one line in `FAMILIES`.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import ConfigError
from . import gemma3, gemma4, mini
from .base import Family

FAMILIES: tuple[Family, ...] = (
    gemma4.FAMILY,
    gemma3.FAMILY,
    mini.FAMILY,
)


def family_of(model_type: str | None) -> Family:
    """The family reading config.json's `model_type` (ConfigError naming the known ones if none does)."""
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    known = [t for f in FAMILIES for t in f.model_types]
    raise ConfigError(f"config: unknown model_type {model_type!r}; expected one of {known}")


def family_of_gguf(arch: str) -> Family | None:
    """The family reading llama.cpp architecture `arch`, or None."""
    return next((f for f in FAMILIES if arch in f.gguf_archs), None)


def gguf_archs() -> tuple[str, ...]:
    return tuple(a for f in FAMILIES for a in f.gguf_archs)


def model_class(config: ModelConfig):
    return family_of(config.model_type).model


def renames(config: ModelConfig):
    """(rename, transform) for this config's safetensors checkpoints: on-disk name → ours, value → ours."""
    f = family_of(config.model_type)
    return f.to_ours, f.load_transform
