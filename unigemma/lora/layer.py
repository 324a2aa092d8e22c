"""`LoraLinear`: a frozen base linear plus low-rank adapters, applied unmerged.

    y = base(x) + Σ_adapters  B(A(dropout(x))) · scaling          A [r, in], B [out, r]

The base is any linear-like module with in_features / out_features: nn.Linear, a packed
inference linear (models/packed.py), a quantized one (quant/linear.py: QLoRA, gradients reach the
input through its dequantized weight) or models/upcast.py's. It runs exactly as it did; the
adapter term is computed in the adapters' dtype (float32 by default, as PEFT's
autocast_adapter_dtype does) and added in the base output's dtype. The submodule names are
PEFT's (`base_layer`, `lora_A.<adapter>`, `lora_B.<adapter>`), so named_parameters read like a
PeftModel's.

Which adapter each row gets is a `Selection` shared by every LoraLinear of a model:
  * `active`: one adapter name (or None: base only) for all rows, the training and chat case;
  * `rows`: per batch row, an adapter name or None (a mixed decode batch of the server). Rows are
    grouped by adapter: rows of adapter a get x[rows] A_aᵀ B_aᵀ, so each row's result is what it
    gets run alone, up to the rounding of a smaller matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Selection:
    active: str | None = None
    rows: list[tuple[str, torch.Tensor]] | None = None  # (adapter, row indices) groups; None: `active` for all
    names: set[str] = field(default_factory=set)  # adapters loaded somewhere in the model
    # a number per load: K/V computed under an adapter are keyed by it (a reloaded name differs)
    loads: dict[str, int] = field(default_factory=dict)
    _key: tuple | None = None  # the per_row list `rows` was built from (rebuilt only when it changes)

    def added(self, name: str) -> None:
        self.names.add(name)
        self.loads[name] = max(self.loads.values(), default=0) + 1

    def tag(self, name: str | None) -> tuple | None:
        """What K/V computed under adapter `name` are keyed by (None: the base model)."""
        return None if name is None else ("lora", name, self.loads[name])

    def set_rows(self, per_row: list[str | None] | None) -> None:
        """Per batch row its adapter name (None: the base); None clears back to `active`."""
        key = None if per_row is None else tuple(per_row)
        if key == self._key and (key is None) == (self.rows is None):
            return
        self._key = key
        if per_row is None:
            self.rows = None
            return
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(per_row):
            if name is not None:
                groups.setdefault(name, []).append(i)
        if len(groups) == 1 and len(next(iter(groups.values()))) == len(per_row):
            self.rows = [(next(iter(groups)), None)]  # one adapter on every row: no gather
        else:
            self.rows = [(name, torch.tensor(idx)) for name, idx in groups.items()]


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, selection: Selection):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.selection = selection

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight (callers that read a linear's weight or its dtype keep working)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0,
                    dtype: torch.dtype = torch.float32) -> None:
        """A new adapter: A kaiming-uniform (a=√5), B zero, created in PEFT's order (Linear A,
        Linear B, then A re-initialised) so a seeded run draws PEFT's initial weights."""
        device = _device_of(self.base_layer)
        a = nn.Linear(self.in_features, r, bias=False, device=device)
        b = nn.Linear(r, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a.to(dtype), b.to(dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling
        self.train(self.training)  # new modules start in training mode: follow this layer's (dropout)

    def remove_adapter(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term B(A(dropout(x))) · scaling, in the adapter's dtype."""
        A, B = self.lora_A[name], self.lora_B[name]
        return B(A(self.lora_dropout[name](x.to(A.weight.dtype)))) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        sel = self.selection
        groups = ([(sel.active, None)] if sel.active is not None else []) if sel.rows is None else sel.rows
        for name, idx in groups:
            if name not in self.lora_A:
                continue
            if idx is None:
                y = self._add(y, name, x)
            else:  # rows are the batch dimension: x [B, S, in]
                idx = idx.to(x.device)
                y = y.index_add(0, idx, self.delta(name, x.index_select(0, idx)).to(y.dtype))
        return y

    def _add(self, y: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        """y + delta. Inference adds in place, scaling folded in: a decode step is op-bound, and
        this saves three passes over y per layer (its output is not kept for a backward)."""
        if torch.is_grad_enabled():
            return y + self.delta(name, x).to(y.dtype)
        A, B = self.lora_A[name], self.lora_B[name]
        return y.add_(B(A(self.lora_dropout[name](x.to(A.weight.dtype)))), alpha=self.scaling[name])

    def merged_weight(self, name: str) -> torch.Tensor:
        """scaling · B A, the float32 [out, in] matrix merging adapter `name` adds to the weight."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def extra_repr(self) -> str:
        return f"adapters={ {n: self.lora_A[n].out_features for n in self.lora_A} }"


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")  # a packed linear holds opaque CPU tensors only
