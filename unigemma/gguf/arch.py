"""What a GGUF file's metadata and tensor names mean: asked of the file's model family.

`config_from_gguf(f, mm)` rebuilds a config.json-style dict from the metadata (and an optional
`gemma4uv` / `gemma4ua` mmproj's, gguf/mmproj.py); `our_name` maps every llama.cpp tensor name to
ours. Both come from the family that reads `general.architecture` (models/__init__.py's registry;
each models/<family>.py holds its `gguf_config` / `gguf_name`). Norm weights are taken as stored:
llama.cpp folds Gemma 3's (1 + w) into them, which is the multiplier our Gemma 3 norms hold;
Gemma 4 has no offset. Reading and placing the tensors is weights/gguf_source.py's and
weights/placer.py's job; this module builds no model.
"""

from __future__ import annotations

from ..errors import CheckpointError
from ..models import Family, family_of_gguf, gguf_archs
from .dequant import dequantize
from .mmproj import mmproj_config
from .reader import GGUFFile


def _family(arch: str, path) -> Family:
    family = family_of_gguf(arch)
    if family is None:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (expected one of {gguf_archs()})")
    return family


def our_name(gguf_name: str, arch: str) -> str | None:
    """llama.cpp tensor name → our parameter name (None: consumed by the config, not a weight;
    an unknown name comes back as it is, for the placer to report as unexpected)."""
    return _family(arch, "GGUF").gguf_name(gguf_name)


def config_from_gguf(f: GGUFFile, mm: GGUFFile | None = None) -> dict:
    """A config.json-style dict for the file's model (ModelConfig.from_dict reads it)."""
    family = _family(f.arch, f.path)
    d = family.gguf_config(f, lambda name: dequantize(f.raw(name), f.tensors[name].type, f.tensors[name].shape))
    if mm is not None:
        if not family.takes_media:
            raise CheckpointError(f"{mm.path}: an mmproj only goes with a model that takes media, not {f.arch}")
        d.update(mmproj_config(mm, f.metadata, d["text_config"]["hidden_size"]))
    return d
