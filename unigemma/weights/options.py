"""Load options, parsed once: what the caller asked for, before any file is opened.

`LoadOptions.parse(dtype, device, quant, dequantize, pack)` is the one place a quantization
name ("int8", "int4-g32", ...) becomes a `QuantScheme` and the one place the deprecated
`quant="float"` becomes `dequantize=True`. `scheme_for(config)` then reconciles the asked scheme
with the one a checkpoint records (config.json's "quantization"). The placement these options
drive lives in weights/placer.py; which files hold the tensors, in weights/sources.py. This
module knows no file format and no model family.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..models.packed import device_can_pack
from ..quant.apply import QuantScheme
from ..quant.kernels import plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """'bfloat16' / torch.bfloat16 → torch.bfloat16; anything else is a ValueError."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")


@dataclass(frozen=True)
class LoadOptions:
    """How to place a checkpoint's tensors.

    dtype: the activations' dtype, float weights are cast to it. quant: quantize each decoder
    weight as it is read (None: as stored). dequantize: a file's natively quantized tensors
    (a GGUF's Q8_0 / Q4_0) become float matrices of `dtype`. pack: the CPU fast path, decoder
    Linears and the tied head packed for oneDNN as they are read (only where the device and
    dtype can: `device_can_pack`). exact: quantized layers keep their activations in `dtype`
    (weight-only kernels), where by default they may run int8-activation kernels (quant/kernels.py)."""

    dtype: torch.dtype = torch.bfloat16
    device: str | torch.device = "cpu"
    quant: QuantScheme | None = None
    dequantize: bool = False
    pack: bool = False
    block_mask: str = "sliding"
    progress: bool = False
    exact: bool = False
    upcast: bool = False  # bf16 decoder Linears run as models/upcast.py's UpcastLinear (set by parse)

    @classmethod
    def parse(cls, dtype="bfloat16", device="cpu", quant: str | QuantScheme | None = None,
              dequantize: bool = False, pack: bool = False, block_mask: str = "sliding",
              progress: bool = False, exact: bool = False) -> "LoadOptions":
        if quant == "float":  # the old spelling of dequantize, kept for scripts that use it
            warnings.warn("quant='float' is deprecated: pass dequantize=True (CLI: --dequantize)",
                          DeprecationWarning, stacklevel=3)
            quant, dequantize = None, True
        scheme = None if quant is None else QuantScheme.parse(quant)
        if scheme is not None and dequantize:
            raise ValueError(f"dequantize and quant={scheme.name!r} exclude each other: quant already "
                             "requantizes a file's quantized tensors")
        dtype = resolve_dtype(dtype)
        # pack where packing is this CPU's fastest float kernel (quant/kernels.py: bf16 with native
        # bf16 arithmetic); "upcast" (bf16 where it is emulated) is applied after loading (placer.py)
        on_cpu = torch.device(device).type == "cpu"
        upcast = bool(pack) and on_cpu and plan().float_linear(dtype) == "upcast"
        pack = pack and device_can_pack(device, dtype) and plan().float_linear(dtype) == "onednn-packed"
        return cls(dtype, device, scheme, dequantize, pack, block_mask, progress, bool(exact), upcast)

    def scheme_for(self, config, where: str) -> QuantScheme | None:
        """The scheme the model is built with: the one the checkpoint records (it loads as it
        was saved), else the one asked for. `where` names the config in messages."""
        stored = None
        if getattr(config, "quantization", None) is not None:
            try:
                stored = QuantScheme.from_config(config.quantization, where)
            except ValueError as e:
                raise CheckpointError(str(e)) from e
        if stored is not None and self.dequantize:
            raise CheckpointError(f"{where}: dequantize (quant='float') turns a GGUF file's quantized tensors "
                                  "into floats; this checkpoint was saved quantized (load it as it is)")
        if stored is not None and self.quant is not None and self.quant.name != stored.name:
            raise CheckpointError(f"{where}: the checkpoint is already quantized as {stored.name}; "
                                  f"requantizing it as {self.quant.name} is not supported (load it as it is)")
        return stored or self.quant
