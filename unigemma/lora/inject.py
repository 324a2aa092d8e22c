"""Adapters into a model and out of it: `add_lora` wraps the target modules in place, `merge`
folds an adapter into the float weights, `selection` picks which adapter runs (per model or per
batch row).

Targets are chosen on transformers' module names (`hf_module_name`), the names PEFT matches its
target_modules against and writes into adapter files. Our module tree mirrors transformers' in
every family, with one exception: the text-only Gemma 4 class (`gemma4_unified_text`) keeps its
decoder under `model.` where ours is `model.language_model.` — the same rename its checkpoint
names take (the family's `to_disk`), so the decoder's on-disk names are the names used here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import family_of
from ..models.packed import PackedLinear
from ..quant.linear import QuantEmbedding, QuantLinear
from .config import LoraConfig
from .layer import LoraLinear, Selection


def is_linear_like(module: nn.Module) -> bool:
    """A module an adapter can wrap: a float, packed, quantized or upcast linear (not a table)."""
    if isinstance(module, QuantEmbedding) or isinstance(module, LoraLinear):
        return False
    if isinstance(module, (nn.Linear, PackedLinear, QuantLinear)):
        return True
    return type(module).__name__ == "UpcastLinear"


def hf_module_name(name: str, config) -> str:
    """Our module name → transformers' (and so PEFT's) module name for the same module."""
    if "language_model." in name or name.startswith("model.layers."):
        return family_of(config.model_type).to_disk(name + ".weight", config).removesuffix(".weight")
    return name  # the media embedders: our module names are transformers' (only their files are renamed)


def selection(model: nn.Module, create: bool = True) -> Selection | None:
    """The model's adapter selection, shared by all its LoraLinear modules (created once;
    create=False: None for a model that never had an adapter)."""
    sel = model.__dict__.get("_lora_selection")
    if sel is None and not create:
        return None
    if sel is None:
        sel = model.__dict__["_lora_selection"] = Selection()
    return sel


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Our module name → LoraLinear, for every wrapped module."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def candidates(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """transformers' module name → (our name, module) for every module an adapter could wrap
    (already wrapped ones give their LoraLinear)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLinear) or (is_linear_like(mod) and not name.endswith(".base_layer")):
            out[hf_module_name(name, model.config)] = (name, mod)
    return out


def wrap(model: nn.Module, name: str) -> LoraLinear:
    """Module `name` as a LoraLinear (wrapped now if it is not yet)."""
    mod = model.get_submodule(name)
    if isinstance(mod, LoraLinear):
        return mod
    wrapped = LoraLinear(mod, selection(model)).train(mod.training)  # an eval model stays in eval
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, wrapped)
    return wrapped


def add_lora(model: nn.Module, config: LoraConfig, name: str = "default",
             dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Add adapter `name` to every module `config` targets (wrapped in place), make it the active
    one, and return its new parameters (A kaiming-uniform, B zero: the model's outputs are
    unchanged). Freezing everything else is the caller's job. Raises if nothing matches."""
    sel = selection(model)
    if name in sel.names:
        raise ValueError(f"the model already has an adapter named {name!r}")
    targets = [(hf, ours) for hf, (ours, _) in candidates(model).items() if config.targets(hf)]
    if not targets:
        names = list(candidates(model))
        raise ValueError(f"target_modules {config.target_modules!r} match no module of this model; "
                         f"its linear modules are named like {names[:3]} … {names[-2:]}")
    params = []
    for hf, ours in targets:
        layer = wrap(model, ours)
        layer.add_adapter(name, config.rank_for(hf), config.scaling_for(hf), config.dropout, dtype)
        params += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    sel.added(name)
    sel.active = name
    return params


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Run adapter `name` on every row (None: the base model alone)."""
    sel = selection(model)
    if name is not None and name not in sel.names:
        raise KeyError(f"no adapter named {name!r} (loaded: {sorted(sel.names)})")
    sel.active, sel.rows = name, None


def remove_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter `name`; modules left with no adapter are unwrapped back to their base."""
    sel = selection(model)
    for mod_name, layer in lora_modules(model).items():
        layer.remove_adapter(name)
        if not layer.lora_A:
            parent, _, leaf = mod_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, layer.base_layer)
    sel.names.discard(name)
    sel.rows, sel._key = None, None
    if sel.active == name:
        sel.active = None


@torch.no_grad()
def merge(model: nn.Module, name: str = "default") -> nn.Module:
    """Fold adapter `name` into the base weights (W += scaling · B A, summed in float32) and unwrap
    every LoraLinear, in place: the model is then a plain model of its family again. The bases must
    hold a float weight (a packed or quantized one cannot take the update: load unpacked)."""
    for mod_name, layer in lora_modules(model).items():
        base = layer.base_layer
        if name in layer.lora_A:
            w = getattr(base, "weight", None)  # nn.Linear's, or an UpcastLinear's (the same parameter)
            if not (isinstance(w, torch.Tensor) and w.is_floating_point()) or isinstance(base, QuantLinear):
                raise ValueError(f"{mod_name}: cannot merge into a {type(base).__name__}; load the model "
                                 "unpacked and unquantized (fast=False) to merge")
            base.weight.copy_((base.weight.float() + layer.merged_weight(name).to(base.weight.device)
                               ).to(base.weight.dtype))
    for other in sorted(selection(model).names):
        remove_adapter(model, other)
    return model
