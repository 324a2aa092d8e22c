"""CPU fast path: linear weights prepacked once into oneDNN's blocked layout.

Decoding one token is nearly all weight reads (matrix × vector). PyTorch's plain CPU `F.linear`
reads a bf16 weight at ~30 GB/s there; the same oneDNN primitive given a weight reordered once,
at load, into the blocked layout its kernels want reads it at 47-68 GB/s on this machine
(2 cores, AVX512-BF16) and returns bit-identical bf16 results (fp32: equal to rounding). Prefill
(many tokens) is no slower. So after loading, `pack_linears(model)` swaps every `nn.Linear` of
the decoder for a `PackedLinear` holding the packed weight (the plain weight is dropped); with
`head=True` the LM head is swapped too (`swap_head`): a `PackedHead` becomes the model's
`lm_head`, the one module `CausalLM.head` calls. An untied head's plain Linear goes with the
swap. A tied model keeps its embedding (the lookup still needs the plain rows), so its packed
head is a copy: vocab × hidden more memory, and a third of the decode time saved. Packed
weights are opaque attributes, not parameters or buffers: a swapped-in module adds nothing to
the state dict, and a tied table is still saved once, as the embedding.

The plain modules stay the oracle the tests compare to; packing is for inference only (no
autograd through the packed weights) and only where oneDNN is present and supports the dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def device_can_pack(device, dtype: torch.dtype) -> bool:
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def can_pack(model: nn.Module) -> bool:
    return device_can_pack(model.device, model.dtype)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # One of the mechanisms of the invariant stated in models/attention.py `attend`: a lone bf16
    # row takes oneDNN's matrix x vector kernel, whose sums run in another order than the kernel
    # that batches of 2-8 rows share, so it runs as two rows. In bf16 the second row is free
    # (same weight reads); in fp32 it would double the time, so fp32 keeps the one-row kernel
    # and its rounding-level differences.
    if x.dtype == torch.bfloat16 and x.numel() == x.shape[-1]:
        two = x.reshape(1, -1).expand(2, -1).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(two, packed, bias, "none", [], "")[:1]
        return out.view(*x.shape[:-1], -1)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # batch-size hint 1: the layout for matrix × vector; larger batches run on it just as fast
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


class PackedLinear(nn.Module):
    """`nn.Linear` for inference over a oneDNN-packed weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = _pack(weight)  # an opaque mkldnn tensor: not a parameter, never saved
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # oneDNN's packed op has no backward
            raise RuntimeError("a packed linear (the CPU inference fast path) cannot pass gradients: load the "
                               "model unpacked to train (load_model(pack=False), unigemma.load(fast=False))")
        return _linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedHead(nn.Module):
    """The LM head packed in blocks of rows. Each block can be packed from a slice read on its
    own (weights/loader.py does), so packing never holds a second whole copy of the
    vocab × hidden table; the blocks cost ~2% of the head's time (16384-row blocks)."""

    ROWS = 16384

    def __init__(self, blocks):
        super().__init__()
        self.parts = [_pack(b) for b in blocks]  # opaque mkldnn tensors
        self.out_features = sum(p.shape[0] for p in self.parts)

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "PackedHead":
        return cls(weight[i:i + cls.ROWS] for i in range(0, weight.shape[0], cls.ROWS))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([_linear(h, p, None) for p in self.parts], -1)


def swap_head(model: nn.Module, head: nn.Module) -> nn.Module:
    """Make `head` (hidden → raw logits) the model's LM head module, `lm_head`, in place: an
    untied head's Linear is replaced (its weight freed unless held elsewhere); a tied model
    gains an `lm_head` the head calls instead of the embedding's `linear`. Either way the head
    must hold no state: the checkpoint's names stay what they were."""
    if head.state_dict():
        raise ValueError(f"{type(head).__name__} holds tensors of its own; the swapped-in head must not, "
                         "or the state dict would gain names the checkpoint does not have")
    model.lm_head = head
    return model


def pack_every_linear(module: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every float nn.Linear inside `module` for a PackedLinear, in place (an MTP drafter:
    all of it runs once per draft step), but those named in `skip` (whose weight is read)."""
    if not any(type(m) is nn.Linear for m in module.modules()):
        return module
    w = next(m.weight for m in module.modules() if type(m) is nn.Linear)
    if not device_can_pack(w.device, w.dtype):
        return module
    with torch.no_grad():
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if (type(child) is nn.Linear and name not in skip
                        and child.weight.dtype in (torch.bfloat16, torch.float32)):
                    setattr(parent, name, PackedLinear(child.weight, child.bias))
    return module


def pack_linears(model: nn.Module, head: bool = True) -> nn.Module:
    """Swap the decoder's nn.Linear modules for PackedLinear in place (and, with `head`, the
    LM head for a PackedHead of its float weight: `swap_head`)."""
    if not can_pack(model):
        return model
    with torch.no_grad():
        # Only the decoder: the media embedders read their weights directly (and run once per item).
        for module in list(model.text.layers.modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear and child.weight.dtype in (torch.bfloat16, torch.float32):
                    setattr(module, child_name, PackedLinear(child.weight, child.bias))
        if head and model.head_weight() is not None:
            swap_head(model, PackedHead.from_weight(model.head_weight()))
    return model
