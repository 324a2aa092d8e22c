"""Checkpoint loading: build on the meta device, stream tensors in from safetensors.

A checkpoint is a directory with `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json`. The model is built without memory (meta device); each tensor
is read from the memory-mapped file, cast to the requested dtype and assigned, so peak memory
stays near the model's own size. Loading is strict: a missing, unexpected or wrongly shaped
tensor, a truncated or corrupt file, or an unknown model type is a `CheckpointError` /
`ConfigError` naming the file and the tensor. Pickle files are never opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from ..models.gemma4 import Gemma4Unified, checkpoint_name_to_module

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shards(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {missing}")
        return [root / n for n in names]
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = [p.name for p in root.glob("*.bin")] + [p.name for p in root.glob("*.pt*")]
    hint = f" (found {pickles}: pickle checkpoints are never loaded; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{root}: no model.safetensors or model.safetensors.index.json{hint}")


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def load_model(path: str | os.PathLike, dtype="bfloat16", device="cpu", block_mask: str = "sliding",
         progress: bool = False) -> Gemma4Unified:
    """Load a Gemma 4 unified checkpoint directory. dtype: float32 or bfloat16 (or float16)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory" + ("" if root.exists() else " (it does not exist)"))
    dtype = _resolve_dtype(dtype)
    config = ModelConfig.from_file(root / "config.json")
    shards = _shards(root)
    with torch.device("meta"):
        model = Gemma4Unified(config, block_mask=block_mask)
    expected = dict(model.state_dict(keep_vars=True))
    seen: dict[str, str] = {}
    bar = _progress(shards, expected, progress)
    for shard in shards:
        try:
            f = safe_open(str(shard), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard}: not a readable safetensors file ({e})") from e
        with f:
            for key in f.keys():
                name = checkpoint_name_to_module(key, config)
                if name is None:
                    continue
                if name not in expected:
                    raise CheckpointError(f"{shard}: unexpected tensor {key!r}: the {config.model_type} model "
                                          "described by config.json has no such weight")
                if name in seen:
                    raise CheckpointError(f"{shard}: tensor {key!r} also appears in {seen[name]}")
                want = tuple(expected[name].shape)
                shape = tuple(f.get_slice(key).get_shape())
                if shape != want:
                    raise CheckpointError(f"{shard}: tensor {key!r} has shape {shape}, the config implies {want}")
                try:
                    t = f.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise CheckpointError(f"{shard}: cannot read tensor {key!r} ({e})") from e
                if t.is_floating_point():
                    t = t.to(device=device, dtype=dtype)
                _assign(model, name, t.to(device))
                seen[name] = shard.name
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{root}: checkpoint is missing {len(missing)} tensors: {missing[:5]}{more}")
    return model.eval()


def _progress(shards, expected, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=len(expected), desc=f"loading {len(shards)} shard(s)", unit="tensor")
