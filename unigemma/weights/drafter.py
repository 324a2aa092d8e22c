"""Load an MTP drafter checkpoint (`google/gemma-4-12B-it-assistant` layout).

A directory with `config.json` (model_type `gemma4_unified_assistant`) and safetensors
(`model.safetensors` or a sharded index). Its tensor names are the module names of
models/drafter.py; `lm_head.weight`, tied to `model.embed_tokens.weight`, is skipped when the
checkpoint stores it anyway. Strict like the model loader: a missing, unexpected or misshapen
tensor is a CheckpointError naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..models.drafter import Drafter, DrafterConfig
from ..models.packed import pack_every_linear
from .options import LoadOptions
from .placer import Placer
from .sources import SafetensorsSource


def load_drafter(path: str | os.PathLike, dtype="bfloat16", device="cpu", pack: bool = True) -> Drafter:
    """pack: prepack every linear for oneDNN (models/packed.py) where the CPU supports the dtype;
    a draft step is a dozen matrix x vector products, ~4x faster packed. A packed drafter is
    for inference only (save an unpacked one)."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root}: not a drafter checkpoint directory (no config.json)")
    try:
        config = DrafterConfig.from_dict(json.loads((root / "config.json").read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{root / 'config.json'}: not valid JSON ({e})") from e
    options = LoadOptions.parse(dtype, device)
    with torch.device("meta"):
        model = Drafter(config)

    def rename(key, config):  # its tensor names are its module names; a tied head is not read
        return None if key == "lm_head.weight" and config.tie_word_embeddings else key

    source = SafetensorsSource(root, config, rename)
    model = Placer(model, options, source.describes).stream(source)
    # every linear, after loading (a small model, some with a bias); an untied lm_head stays
    # plain: the centroid head gathers its rows
    return pack_every_linear(model, skip=("lm_head",)) if pack else model


def save_drafter(model: Drafter, path: str | os.PathLike, config: dict) -> Path:
    """Write a drafter in the released layout (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    from ..models.packed import PackedLinear

    if any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError("a packed drafter holds no plain weights to save; load it with pack=False")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


__all__ = ["load_drafter", "save_drafter"]
