"""Modules trained in full next to the LoRA adapters: `unigemma finetune --train-full media`.

A model whose media embedders start untrained (unigemma-mini: Gemma 3's decoder with fresh
Gemma 4 embedders) needs every weight of those embedders learned, not a low-rank change of
random ones. Such modules are named by group or by path:

    media                the image and audio embedders (`model.embed_vision`, `model.embed_audio`)
    model.embed_vision   any module path of our module tree

Their weights are trained at their own learning rate (`--full-lr`; embedders from scratch want
a larger one than adapters) and saved whole, under our module names, as `full_weights.safetensors`
beside the adapter (PEFT's `modules_to_save` has no meaning for a model transformers has no
class for). `load_full_weights` puts them back, strict on names and shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, InputError

FULL_FILE = "full_weights.safetensors"
FULL_GROUPS = {"media": ("model.embed_vision", "model.embed_audio")}


def resolve(model: nn.Module, spec: str) -> dict[str, nn.Module]:
    """`spec` (comma-separated groups / module paths) → {path: module}; InputError naming what
    is not there."""
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for item in (t.strip() for t in spec.split(",")):
        if not item:
            continue
        paths = FULL_GROUPS.get(item, (item,))
        present = [p for p in paths if p in modules and modules[p] is not None]
        if not present:
            raise InputError(f"--train-full {item!r}: the model has no such module"
                             + (f" (expected {', '.join(paths)})" if item in FULL_GROUPS else ""))
        out.update({p: modules[p] for p in present})
    if not out:
        raise InputError("--train-full names no module")
    return out


def make_trainable(modules: dict[str, nn.Module]) -> list[nn.Parameter]:
    """Every float weight of the modules, trainable and float32, as the adapters are; returned in
    a fixed (name) order. A bf16 base keeps bf16 weights here otherwise, and AdamW's steps of
    ~lr vanish in their rounding: a norm's weight near 1 moves in steps of 2^-7, so at lr 1e-3
    it never moves. The embedders cast their input to their own dtype and the merge casts their
    output to the decoder's (embed/), so a float32 module runs inside a bf16 model unchanged."""
    params = []
    for path, module in modules.items():
        for _, p in sorted(module.named_parameters()):
            if p.is_floating_point():
                p.data = p.data.float()  # in place: the Parameter (and any reference to it) stays
                p.requires_grad_(True)
                params.append(p)
    return params


def full_state_dict(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{path}.{k}": v.detach().contiguous().cpu() for path, m in modules.items()
            for k, v in m.state_dict().items()}


def save_full_weights(modules: dict[str, nn.Module], directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """FULL_FILE under `directory`: the modules' weights (floats cast to `dtype` if given)."""
    path = Path(directory) / FULL_FILE
    tensors = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
               for k, v in full_state_dict(modules).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def load_full_weights(model: nn.Module, source: str | Path | dict[str, torch.Tensor]) -> list[str]:
    """Copy saved full weights (a directory holding full_weights.safetensors, the file, or its
    tensors) into `model`; returns the names loaded. Everything is checked before anything is copied."""
    if isinstance(source, dict):
        tensors, where = source, "full weights"
    else:
        path = Path(source)
        path = path / FULL_FILE if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file (full weights are saved as {FULL_FILE})")
        tensors, where = load_file(str(path)), str(path)
    state = model.state_dict()
    for k, t in tensors.items():
        if k not in state:
            raise CheckpointError(f"{where}: {k} is not a tensor of this model")
        if tuple(t.shape) != tuple(state[k].shape):
            raise CheckpointError(f"{where}: {k} is {tuple(t.shape)}, the model's is {tuple(state[k].shape)}")
    with torch.no_grad():
        for k, t in tensors.items():
            state[k].copy_(t)
    return sorted(tensors)
