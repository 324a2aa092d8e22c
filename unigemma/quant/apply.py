"""Which modules get quantized, how, and the config entry that records it.

`QuantScheme.parse("int8" | "int8-g32" | "int4-g32" | "int4-g128")` names a scheme;
`quantize_modules(model, scheme)` swaps the decoder's Linear layers for `QuantLinear` and its
token embedding for an 8-bit `QuantEmbedding`, on the meta device, before any weight is read:
the loader then quantizes each float tensor as it streams in (`QuantLinear.set_weight`), or
takes already-quantized ones as they are. The media embedders (a few MB) stay in float.
A quantized checkpoint records the scheme in config.json under "quantization" (`to_config`);
loading reads it back (`from_config`) and never guesses from tensor dtypes or names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..hugepages import advise
from . import qdot
from .linear import QuantEmbedding, QuantLinear
from .pack import quantize_int4, quantize_int8

_NAME = re.compile(r"^int(8|4)(?:-g(\d+))?$")
METHOD = "unigemma-weight-only"
NAMES = ("int8", "int8-g32", "int4-g32", "int4-g128")  # the schemes offered by name (CLI, docs); parse takes any group


@dataclass(frozen=True)
class QuantScheme:
    bits: int  # 8 or 4, for the decoder's Linear layers
    group_size: int | None  # None: one scale per output channel (int8 only)
    embed_group_size: int | None = None  # the token embedding is always 8-bit

    @classmethod
    def parse(cls, name: "str | QuantScheme") -> "QuantScheme":
        if isinstance(name, QuantScheme):
            return name
        m = _NAME.match(str(name))
        if not m or (m.group(1) == "4" and not m.group(2)):
            raise ValueError(f"unknown quantization {name!r}: expected int8, int8-g<N>, int4-g<N> (e.g. int4-g32)")
        bits, group = int(m.group(1)), int(m.group(2)) if m.group(2) else None
        if group is not None and (group <= 0 or group % 2):
            raise ValueError(f"quantization {name!r}: the group size must be a positive even number")
        # int8 schemes quantize the token table like every other matrix (int8-g32 is all-Q8_0);
        # int4 schemes keep it at 8 bits per channel, where the int8 kernel serves the tied head
        return cls(bits, group, group if bits == 8 else None)

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "")

    def to_config(self) -> dict:
        return {"quant_method": METHOD, "bits": self.bits, "group_size": self.group_size,
                "embedding": {"bits": 8, "group_size": self.embed_group_size}}

    @classmethod
    def from_config(cls, d: dict, where: str) -> "QuantScheme":
        if not isinstance(d, dict) or d.get("quant_method") != METHOD:
            raise ValueError(f"{where}: quantization entry {d!r} is not one unigemma wrote "
                             f"(quant_method {METHOD!r})")
        emb = d.get("embedding") or {}
        try:
            scheme = cls(int(d["bits"]), d.get("group_size"), emb.get("group_size"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed quantization entry {d!r} ({e})") from e
        if scheme.bits not in (4, 8) or (scheme.bits == 4 and not scheme.group_size):
            raise ValueError(f"{where}: unsupported quantization {d!r}")
        return scheme


def quantize(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Our layout for w [N, K] (see quantize_rows)."""
    return quantize_rows(lambda a, b: w[a:b], w.shape[0], w.shape[1], bits, group_size)


def quantize_rows(read_rows, N: int, K: int, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an [N, K] float matrix a block of rows at a time: read_rows(a, b) → rows a..b
    (pack.py's rounding; in C where qdot.c is built, ~50x faster than its torch ops).
    Only one block of float rows and its float32 temporaries exist at once (a whole 262k-row
    embedding would be GBs of them); the outputs are written in place. Blocks of ~1 MB keep
    glibc from raising its mmap threshold above them, which would put the temporaries in the
    heap between the long-lived outputs and fragment it (+50% RSS on a 730M model)."""
    g = group_size or K
    fast = qdot.available()
    rows = max(1, (1 << (22 if fast else 18)) // K)  # C makes no float32 temporaries: larger blocks
    q = advise(torch.empty(N, K if bits == 8 else K // 2, dtype=torch.int8 if bits == 8 else torch.uint8))
    s = advise(torch.empty(N, K // g, dtype=torch.float16))  # scales stream beside the codes
    for a in range(0, N, rows):
        b = min(N, a + rows)
        w = read_rows(a, b)
        if fast and w.device.type == "cpu" and w.dtype in qdot.WEIGHT_DTYPES:  # the same bits, in C
            q[a:b], s[a:b] = qdot.quantize_weights(w, bits, g)
        else:
            q[a:b], s[a:b] = quantize_int8(w, g) if bits == 8 else quantize_int4(w, g)
    return q, s


def is_quantizable(name: str, module: nn.Module, model: nn.Module | None = None) -> bool:
    """Whether `model`'s family quantizes this module (models/<family>.py `is_quantizable`: the
    text decoder's projections and a separate LM head, not the media embedders). Without a
    model: whether any registered family would."""
    from ..models import FAMILIES, family_of  # the families know their module trees; read at call time

    config = getattr(model, "config", None)
    if config is not None:
        return family_of(config.model_type).is_quantizable(name, module)
    return any(f.is_quantizable(name, module) for f in FAMILIES)


def plan_for(model: nn.Module, scheme: QuantScheme) -> dict[str, tuple[int, int | None]]:
    """Module name → (bits, group) for every module `scheme` quantizes."""
    plan = {}
    for name, mod in model.named_modules():
        if is_quantizable(name, mod, model):
            plan[name] = (scheme.bits, scheme.group_size)
        elif is_embedding(name, mod):
            plan[name] = (8, scheme.embed_group_size)
    return plan


def is_embedding(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) and name.endswith("embed_tokens")


def swap_modules(model: nn.Module, plan: dict[str, tuple[int, int | None]], dtype: torch.dtype) -> nn.Module:
    """Replace each planned Linear / token Embedding by its quantized twin, in place (meta device)."""
    for name, (bits, group) in plan.items():
        mod = model.get_submodule(name)
        try:
            if isinstance(mod, nn.Embedding):
                new = QuantEmbedding(mod.num_embeddings, mod.embedding_dim, bits, group, dtype, device=mod.weight.device)
            else:
                new = QuantLinear(mod.in_features, mod.out_features, bits, group, bias=mod.bias is not None,
                                  device=mod.weight.device)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def quantize_modules(model: nn.Module, scheme: QuantScheme, dtype: torch.dtype) -> nn.Module:
    return swap_modules(model, plan_for(model, scheme), dtype)


def load_float(module: QuantLinear, w: torch.Tensor) -> None:
    """Quantize one float weight [N, K] into `module` (the streaming step of the loader)."""
    load_float_rows(module, lambda a, b: w[a:b])


def load_float_rows(module: QuantLinear, read_rows) -> None:
    """Quantize a float weight read a block of rows at a time (read_rows(a, b) → rows a..b)."""
    module.set_weight(*quantize_rows(read_rows, module.out_features, module.in_features, module.bits,
                                     module.group_size))  # int8 with group = K: per channel


def prepare(model: nn.Module, dtype: torch.dtype, exact: bool = False) -> nn.Module:
    """After loading: choose each quantized module's kernel for this CPU (quant/kernels.py;
    exact: activations stay in the model dtype) and move the weights of those that run torch's
    int4 kernel into its nibble order once (not at the first forward, which would hold both
    copies of a layer at once)."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.choose_path(dtype, exact) == "int4pack":
            m.to_kernel_layout()
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer: what the weights occupy in memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
