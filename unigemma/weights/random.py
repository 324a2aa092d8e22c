"""Random checkpoints: the one writer behind the demo, the tests and the benchmarks.

`write_random_checkpoint(config, path, seed=, dtype=, via=)` writes a checkpoint directory
(config.json + safetensors) whose every weight is random, with a fixed seed:
  * via="unigemma": our own module tree, built on the meta device and written tensor by tensor
    in the released checkpoint's names (weights/save.py), so even a 12B-shaped checkpoint is
    written without holding its float32 copy; norms and layer scalars in [0.5, 1.5), biases
    zero, matrices ~ N(0, 1/fan_in). `shard_bytes` splits it into shards with an index.
  * via="transformers": transformers' own model class, randomised and written by its
    `save_pretrained` (the test oracle: the reference and we then load the very same file);
    norms and scalars in [0.5, 1.5), biases ~ N(0, 0.01), token embeddings ~ N(0, embed_std²),
    media position tables ~ N(0, 0.05²), matrices ~ N(0, 1/fan_in). transformers is imported
    only here, on that path (a test and benchmark dependency).
Each path draws its values exactly as the writer it replaced did, so checkpoints (and the
thresholds tests hold them to) are unchanged. This module knows no loading.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import ModelConfig
from ..models import model_class
from .save import module_name_to_checkpoint

ROWS = 8192  # rows of float32 noise drawn at a time: the same values as one draw, bounded memory


def write_random_checkpoint(config: dict, path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                            via: str = "unigemma", embed_std: float = 0.05, shard_bytes: int | None = None) -> Path:
    """A random model of `config` (config.json's format, with its model_type) written to `path`;
    returns `path`. embed_std: via="transformers" only; shard_bytes: via="unigemma" only."""
    if via == "transformers":
        return _via_transformers(config, Path(path), seed, dtype, embed_std)
    if via != "unigemma":
        raise ValueError(f"via must be 'unigemma' or 'transformers', got {via!r}")
    return _via_unigemma(config, Path(path), seed, dtype, shard_bytes)


@torch.no_grad()
def _via_unigemma(config: dict, path: Path, seed: int, dtype: torch.dtype, shard_bytes: int | None) -> Path:
    from safetensors.torch import save_file

    cfg = ModelConfig.from_dict(config)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    stored = set(model.state_dict())
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shard, size, weight_map = {}, 0, {}

    def flush():
        nonlocal shard, size
        name = "model.safetensors" if shard_bytes is None else f"model-{len(set(weight_map.values())):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    # every parameter and buffer in order, stored or not: each draw advances the generator
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        t = torch.empty(p.shape, dtype=dtype)
        if p.ndim <= 1:  # norm scales, biases and layer scalars near their trained ranges
            t.copy_(torch.zeros(p.shape) if name.endswith("bias") else torch.rand(p.shape, generator=g) + 0.5)
        else:
            flat = t.view(-1, p.shape[-1])
            for a in range(0, flat.shape[0], ROWS):
                b = min(flat.shape[0], a + ROWS)
                flat[a:b] = torch.randn(b - a, p.shape[-1], generator=g) / math.sqrt(p.shape[-1])
        if name in stored:
            shard[module_name_to_checkpoint(name)] = t
            size += t.numel() * t.element_size()
        if shard_bytes is not None and size >= shard_bytes:
            flush()
    if shard or shard_bytes is None:
        flush()
    if shard_bytes is not None:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({**config, "dtype": str(dtype).removeprefix("torch.")}, indent=2))
    return path


@torch.no_grad()
def randomize_reference(model: torch.nn.Module, seed: int, embed_std: float = 0.05) -> None:
    """Every float parameter of a transformers model random (their default init of ones/zeros
    would hide a missing multiply); rotary tables and embedding scales stay as computed."""
    g = torch.Generator().manual_seed(seed)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not p.is_floating_point() or "inv_freq" in name or "embed_scale" in name:
            continue
        if name.endswith("layer_scalar") or (name.endswith("weight") and p.ndim == 1):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # norm scales and layer scalars in [0.5, 1.5)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif "embed_tokens" in name:
            # small next to the blocks' outputs: with tied embeddings a large one makes the residual's
            # own token win the argmax, and greedy decoding repeats the last prompt token
            p.copy_(torch.randn(p.shape, generator=g) * embed_std)
        elif "pos_embedding" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _via_transformers(config: dict, path: Path, seed: int, dtype: torch.dtype, embed_std: float) -> Path:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kwargs = dict(config)
    model_type = kwargs.pop("model_type")
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    torch.manual_seed(seed)
    model = cls(transformers.AutoConfig.for_model(model_type, **kwargs))
    randomize_reference(model, seed, embed_std)
    model.to(dtype).eval().save_pretrained(path)
    return path
