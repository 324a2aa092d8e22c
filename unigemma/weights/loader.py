"""Checkpoint loading: options parsed once, a tensor source, a meta-built model, one placer.

    load_model(path, dtype, device, quant=..., dequantize=..., pack=...)
      1. LoadOptions.parse: the quantization name and every other option, once (options.py);
      2. a source for the path: a checkpoint directory (config.json + safetensors shards,
         sources.py) or a GGUF file with an optional mmproj (gguf_source.py); it knows the config;
      3. build_model: the model on the meta device (no memory), its modules swapped for
         quantized ones where the scheme, or the file's own quantized layouts, say so;
      4. Placer.stream: every tensor read, converted and placed strictly (placer.py).
Peak memory stays near the model's own size. A missing, unexpected or wrongly shaped tensor, a
truncated or corrupt file, or an unknown model type is a `CheckpointError` / `ConfigError`
naming the file and the tensor. Pickle files are never opened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from ..models import model_class
from ..quant.apply import QuantScheme, is_embedding, is_quantizable, swap_modules
from ..quant.kernels import plan as kernel_plan
from .gguf_source import GGUFSource, is_gguf
from .hub import resolve
from .options import DTYPES, LoadOptions, resolve_dtype
from .placer import Placer
from .sources import SafetensorsSource, TensorSource

__all__ = ["DTYPES", "LoadOptions", "build_model", "load_model", "open_source", "quant_plan", "resolve_dtype"]


def quant_plan(model: nn.Module, scheme: QuantScheme | None,
               native: Callable[[str], tuple[int, int | None] | None] = lambda name: None,
               dequantize: bool = False,
               requantize: Callable[[str], tuple[int, int | None] | None] = lambda name: None,
               ) -> dict[str, tuple[int, int | None]]:
    """Module name → (bits, group) for every module this load quantizes.

    native(weight name): the layout a file stores that weight in (a GGUF's Q8_0 / Q4_0), kept
    as it is unless a scheme asks otherwise (the 8-bit token table of a group-32 scheme keeps
    its Q8_0 bits) or `dequantize` makes every weight float. requantize(weight name): with no
    scheme, the layout a weight stored in another quantized type loads into (a GGUF's K-quants:
    int8-g32, gguf_source.py), where it would otherwise become a float matrix."""
    if dequantize:
        return {}
    plan = {}
    for name, mod in model.named_modules():
        if not (is_quantizable(name, mod, model) or is_embedding(name, mod)):
            continue
        kept = native(name + ".weight")
        if scheme is None:
            kept = kept or requantize(name + ".weight")
            if kept is not None:
                plan[name] = kept
        elif is_embedding(name, mod):
            plan[name] = kept if kept == (8, 32) and scheme.embed_group_size == 32 else (8, scheme.embed_group_size)
        else:
            plan[name] = (scheme.bits, scheme.group_size)
    return plan


def build_model(config: ModelConfig, block_mask: str = "sliding", scheme: QuantScheme | None = None,
                dtype: torch.dtype = torch.bfloat16, native=None, dequantize: bool = False,
                requantize=None) -> nn.Module:
    """The model for `config` on the meta device, its modules swapped for quantized ones where
    `scheme` or the file's `native` layouts say so (`quant_plan`)."""
    with torch.device("meta"):
        model = model_class(config)(config, block_mask=block_mask)
    plan = quant_plan(model, scheme, native or (lambda name: None), dequantize, requantize or (lambda name: None))
    if plan:
        try:
            swap_modules(model, plan, dtype)
        except ValueError as e:
            raise CheckpointError(f"cannot quantize this model as {scheme.name if scheme else 'planned'}: {e}") from e
    model.quant_scheme = scheme
    return model


def open_source(path: str | os.PathLike, mmproj=None) -> TensorSource:
    """The tensor source for a checkpoint directory or a GGUF file (with its mmproj)."""
    root = Path(path)
    if is_gguf(root):
        return GGUFSource(root, mmproj)
    if mmproj is not None:
        raise CheckpointError("mmproj is a GGUF projector file: pass it with a .gguf model")
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory" + ("" if root.exists() else " (it does not exist)"))
    return SafetensorsSource(root)


def load_model(path: str | os.PathLike, dtype="bfloat16", device="cpu", block_mask: str = "sliding",
               progress: bool = False, quant: str | QuantScheme | None = None, mmproj=None,
               pack: bool = False, dequantize: bool = False, exact: bool = False) -> nn.Module:
    """Load a checkpoint directory (safetensors), a GGUF file, or a hub id (weights/hub.py).

    dtype: float32 or bfloat16 (or float16), the activations' dtype. quant: None (as stored),
    "int8" (per channel), "int8-g32", "int4-g32" or "int4-g128": each decoder weight is
    quantized as it is read. A quantized checkpoint loads as it was saved. dequantize: a GGUF's
    Q8_0 / Q4_0 tensors become float matrices of `dtype` (they otherwise stay quantized;
    quant="float" is its deprecated spelling). mmproj: a GGUF file's image/audio embedders
    (GGUF only). pack: the CPU fast path (models/packed.py): each float decoder Linear is packed
    as it is read, and the tied LM head is packed block by block from the file, while the
    embedding table stays as placed (mapped, for safetensors: lookups touch only their rows).
    exact: quantized layers keep float activations (no int8-activation kernels: quant/kernels.py)."""
    options = LoadOptions.parse(dtype, device, quant, dequantize, pack, block_mask, progress, exact)
    source = open_source(resolve(path), mmproj)  # a hub id ("ORG/NAME") through the hub cache: weights/hub.py
    try:
        scheme = options.scheme_for(source.config, source.describes)
        # other block types as int8-g32 only where int8-activation kernels run them fast (else floats)
        fast_int8 = kernel_plan().int8_act in ("avx2", "avx512-vnni") and not options.exact
        model = build_model(source.config, options.block_mask, scheme, options.dtype, source.native,
                            options.dequantize, source.requantize if fast_int8 else None)
        return Placer(model, options, source.describes).stream(source)
    finally:
        source.close()
