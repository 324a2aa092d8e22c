"""The placer: puts a source's tensors into a meta-built model, strictly, one at a time.

Every expected tensor once, with its shape; anything else is a `CheckpointError` naming the
file and the tensor. Where each tensor goes is one decision per tensor (`place`), made from the
model's modules and the `LoadOptions`:
  * natively quantized bits in the layout of the quantized module they load into: kept as they
    are (a GGUF's Q8_0 / Q4_0 repacked into our int8 / int4 group-32 layout);
  * a float weight of a quantized module: quantized a block of rows at a time as it is read,
    so the float model never exists as a whole;
  * a float decoder Linear weight, when packing: packed for oneDNN straight from the file, the
    plain copy freed (models/packed.py); the tied head is packed block by block from the file
    and swapped in as the model's head module (`swap_head`), while the embedding table it
    shares stays as placed;
  * anything else: cast to the model dtype (a quantized checkpoint's scales stay float16,
    modules marked `keeps_float32` float32) and assigned.
The placer reads nothing on its own: sources (weights/sources.py) hand it readers. It knows no
file format and no model family.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.packed import PackedHead, PackedLinear, swap_head
from ..malloc import freed_memory_returned
from ..models.upcast import upcast_linears
from ..quant.apply import load_float, load_float_rows, prepare
from ..quant.linear import QuantLinear
from .options import LoadOptions
from .sources import Tensor, TensorSource


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Set parameter or buffer `name` of `model` to `tensor` (replacing its meta placeholder)."""
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


class Placer:
    """Places tensors into `model` (built on the meta device, its quantized modules swapped in)."""

    def __init__(self, model: nn.Module, options: LoadOptions, describes: str, packs=None):
        """describes: what the model is described by, for messages. packs: the Linear modules
        to pack as they load (default with options.pack: every nn.Linear of the decoder)."""
        self.model, self.options, self.describes = model, options, describes
        self.dtype, self.device = options.dtype, options.device
        self.expected = dict(model.state_dict(keep_vars=True))
        self.seen: dict[str, str] = {}
        if packs is None and options.pack:
            packs = [m for m in model.text.layers.modules() if type(m) is nn.Linear]
        self.packs = {id(m) for m in packs or ()}
        self.head = _head_name(model) if options.pack else None

    def stream(self, source: TensorSource) -> nn.Module:
        """Place every tensor of `source`, check that none is missing, return the model."""
        with _return_freed_memory() if self.packs or self.quantizes() else contextlib.nullcontext():
            bar = _progress(source.label, len(self.expected), self.options.progress)
            for t in source.tensors():
                self.check(t)
                try:
                    self.place(t)
                except source.read_errors as e:
                    raise CheckpointError(f"{t.file}: cannot read tensor {t.key!r} ({e})") from e
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            return self.finish()

    def quantizes(self) -> bool:
        return any(isinstance(m, QuantLinear) for m in self.model.modules())

    def owner(self, name: str) -> tuple[nn.Module, str]:
        prefix, _, leaf = name.rpartition(".")
        return (self.model.get_submodule(prefix) if prefix else self.model), leaf

    def quantized_owner(self, name: str) -> QuantLinear | None:
        m, leaf = self.owner(name)
        return m if isinstance(m, QuantLinear) and leaf == "weight" else None

    def packed_owner(self, name: str) -> nn.Linear | None:
        m, leaf = self.owner(name)
        return m if leaf == "weight" and id(m) in self.packs else None

    def check(self, t: Tensor) -> None:
        if t.name not in self.expected:
            kind = getattr(self.model.config, "model_type", type(self.model).__name__)
            raise CheckpointError(f"{t.file}: unexpected tensor {t.key!r}: the {kind} model "
                                  f"described by {self.describes} has no such weight")
        if t.name in self.seen:
            raise CheckpointError(f"{t.file}: tensor {t.key!r} also appears in {self.seen[t.name]}")
        q = self.quantized_owner(t.name)
        want = (q.out_features, q.in_features) if q is not None and t.is_float else tuple(self.expected[t.name].shape)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{t.file}: tensor {t.key!r} has shape {tuple(t.shape)}, the config implies {want}")

    def place(self, t: Tensor) -> None:
        file = Path(t.file).name
        q = self.quantized_owner(t.name)
        if q is not None and t.native is not None and t.native == (q.bits, q.group_size):
            codes, scales = t.read_native()  # already our layout: kept as stored
            q.set_weight(codes.to(self.device), scales.to(self.device))
            self.seen[t.name[:-len("weight")] + "scales"] = file
        elif q is not None and t.is_float:  # quantized a block of rows at a time
            if t.read_rows is not None:
                load_float_rows(q, lambda a, b: t.read_rows(a, b).to(self.device))
            else:
                load_float(q, t.read().to(self.device))
            self.seen[t.name[:-len("weight")] + "scales"] = file
        elif t.is_float and self.packed_owner(t.name) is not None:
            self.place_packed(t)
        else:
            self.place_plain(t)
            if t.is_float and t.name == self.head and t.read_rows is not None:
                rows, N = PackedHead.ROWS, t.shape[0]  # from the file: the placed table stays untouched
                swap_head(self.model, PackedHead(t.read_rows(a, min(a + rows, N)).to(self.dtype)
                                                 for a in range(0, N, rows)))
        self.seen[t.name] = file

    def place_packed(self, t: Tensor) -> None:
        """A decoder Linear weight: packed straight away, the plain copy freed."""
        prefix, _, child = t.name[:-len(".weight")].rpartition(".")
        parent = self.model.get_submodule(prefix)
        if getattr(parent, child).bias is not None:
            raise CheckpointError(f"{t.name}: packing Linear layers with a bias is not supported; load with fast=False")
        w = t.read_rows(0, t.shape[0]) if t.read_rows is not None else t.read()
        setattr(parent, child, PackedLinear(w.to(device=self.device, dtype=self.dtype)))

    def place_plain(self, t: Tensor) -> None:
        x = t.read()
        owner, leaf = self.owner(t.name)
        if x.is_floating_point():
            if isinstance(owner, QuantLinear) and leaf == "scales":
                x = x.to(torch.float16)  # a quantized checkpoint's scales, as stored
            elif getattr(owner, "keeps_float32", False):
                x = x.float()
            else:
                x = x.to(self.dtype)
        assign(self.model, t.name, x.to(self.device))

    def finish(self) -> nn.Module:
        missing = [n for n in self.expected if n not in self.seen]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.describes}: checkpoint is missing {len(missing)} tensors: {missing[:5]}{more}")
        prepare(self.model, self.dtype, self.options.exact)
        if self.options.upcast:
            upcast_linears(self.model)
        return self.model.eval()


def _head_name(model: nn.Module) -> str | None:
    """The state-dict name of the LM head's table: the tied embedding (an untied head is a
    Linear outside the decoder and stays plain)."""
    if not getattr(model.config.text, "tie_word_embeddings", True):
        return None
    for name, p in model.named_parameters():
        if p is model.text.embed_tokens.weight:
            return name
    return None


def _return_freed_memory():
    """While loading, buffers of 1 MiB and more go back to the system when freed (malloc.py):
    packing and quantizing read every weight into a buffer of its own and free it right after
    (without this: +150 MB peak, +190 MB after loading the 730M bench model)."""
    return freed_memory_returned(1 << 20)


def _progress(label: str, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="tensor")
