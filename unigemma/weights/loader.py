"""Checkpoint loading: build on the meta device, stream tensors in from safetensors (or GGUF).

A checkpoint is a directory with `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json`. The model is built without memory (meta device); each tensor
is read from the memory-mapped file, cast to the requested dtype and assigned, so peak memory
stays near the model's own size. Loading is strict: a missing, unexpected or wrongly shaped
tensor, a truncated or corrupt file, or an unknown model type is a `CheckpointError` /
`ConfigError` naming the file and the tensor. Pickle files are never opened. With `quant`
the decoder's Linear layers are swapped for quantized ones before loading and each float
weight is quantized as it is read (quant/apply.py); `Placer` is shared with the GGUF loader.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from ..models import model_class, renames
from ..quant.apply import QuantScheme, load_float, load_float_rows, plan_for, prepare, swap_modules
from ..models.packed import PackedHead, PackedLinear, device_can_pack, pack_linears
from ..quant.linear import QuantLinear

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


def build_model(config: ModelConfig, block_mask: str = "sliding", scheme: QuantScheme | None = None,
                dtype: torch.dtype = torch.bfloat16, plan: dict | None = None) -> nn.Module:
    """The model for `config` on the meta device, its modules swapped for quantized ones if asked
    (by a scheme, or by an explicit plan: module name → (bits, group))."""
    with torch.device("meta"):
        model = model_class(config)(config, block_mask=block_mask)
    if scheme is not None or plan:
        try:
            swap_modules(model, plan if plan is not None else plan_for(model, scheme), dtype)
        except ValueError as e:
            raise CheckpointError(f"cannot quantize this model as {scheme.name if scheme else 'planned'}: {e}") from e
    model.quant_scheme = scheme
    return model


class Placer:
    """Puts checkpoint tensors into a meta-built model one at a time, strictly: every expected
    tensor once, with its shape. A float weight arriving for a quantized module is quantized
    right there, so the float model never exists as a whole."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device, where: str):
        self.model, self.dtype, self.device, self.where = model, dtype, device, where
        self.expected = dict(model.state_dict(keep_vars=True))
        self.seen: dict[str, str] = {}
        self.pack: set[int] = set()  # ids of the decoder Linear modules to pack as they load

    def quantized_owner(self, name: str) -> QuantLinear | None:
        prefix, _, leaf = name.rpartition(".")
        m = self.model.get_submodule(prefix) if prefix else self.model
        return m if isinstance(m, QuantLinear) and leaf == "weight" else None

    def check(self, name: str, key: str, shape: tuple, is_float: bool, source: str) -> None:
        if name not in self.expected:
            raise CheckpointError(f"{source}: unexpected tensor {key!r}: the {self.model.config.model_type} model "
                                  f"described by {self.where} has no such weight")
        if name in self.seen:
            raise CheckpointError(f"{source}: tensor {key!r} also appears in {self.seen[name]}")
        q = self.quantized_owner(name)
        want = (q.out_features, q.in_features) if q is not None and is_float else tuple(self.expected[name].shape)
        if tuple(shape) != want:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(shape)}, the config implies {want}")

    def place(self, name: str, t: torch.Tensor, source: str) -> None:
        q = self.quantized_owner(name)
        if q is not None and t.is_floating_point():
            load_float(q, t.to(self.device))
            self.seen[name[:-len("weight")] + "scales"] = source
        else:
            prefix, _, leaf = name.rpartition(".")
            owner = self.model.get_submodule(prefix) if prefix else self.model
            if t.is_floating_point():
                if isinstance(owner, QuantLinear) and leaf == "scales":
                    t = t.to(torch.float16)  # a quantized checkpoint's scales, as stored
                elif getattr(owner, "keeps_float32", False):
                    t = t.float()
                else:
                    t = t.to(self.dtype)
            _assign(self.model, name, t.to(self.device))
        self.seen[name] = source

    def place_rows(self, name: str, read_rows, source: str) -> None:
        """A float weight for a quantized module, quantized a block of rows at a time."""
        q = self.quantized_owner(name)
        load_float_rows(q, lambda a, b: read_rows(a, b).to(self.device))
        self.seen[name] = self.seen[name[:-len("weight")] + "scales"] = source

    def packed_owner(self, name: str) -> nn.Linear | None:
        """The decoder Linear this weight belongs to, when the loader packs them (models/packed.py)."""
        prefix, _, leaf = name.rpartition(".")
        if not self.pack or leaf != "weight":
            return None
        m = self.model.get_submodule(prefix) if prefix else self.model
        return m if id(m) in self.pack else None

    def place_packed(self, name: str, t: torch.Tensor, source: str) -> None:
        """A decoder Linear weight: packed straight away, the plain copy freed."""
        prefix, _, child = name[:-len(".weight")].rpartition(".")
        parent = self.model.get_submodule(prefix)
        linear = getattr(parent, child)
        if linear.bias is not None:
            raise CheckpointError(f"{name}: packing Linear layers with a bias is not supported; load with fast=False")
        setattr(parent, child, PackedLinear(t.to(device=self.device, dtype=self.dtype)))
        self.seen[name] = source

    def place_quantized(self, name: str, q: torch.Tensor, scales: torch.Tensor, source: str) -> None:
        """Already-quantized bits in our layout (a GGUF Q8_0 / Q4_0 repack)."""
        self.quantized_owner(name).set_weight(q.to(self.device), scales.to(self.device))
        self.seen[name] = self.seen[name[:-len("weight")] + "scales"] = source

    def finish(self) -> nn.Module:
        missing = [n for n in self.expected if n not in self.seen]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.where}: checkpoint is missing {len(missing)} tensors: {missing[:5]}{more}")
        prepare(self.model, self.dtype)
        return self.model.eval()


def _scheme(config: ModelConfig, quant, where: str) -> QuantScheme | None:
    stored = None
    if config.quantization is not None:
        try:
            stored = QuantScheme.from_config(config.quantization, where)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
    asked = None if quant is None else QuantScheme.parse(quant)
    if stored is not None and asked is not None and asked.name != stored.name:
        raise CheckpointError(f"{where}: the checkpoint is already quantized as {stored.name}; "
                              f"requantizing it as {asked.name} is not supported (load it as it is)")
    return stored or asked


def load_model(path: str | os.PathLike, dtype="bfloat16", device="cpu", block_mask: str = "sliding",
               progress: bool = False, quant: str | QuantScheme | None = None, mmproj=None,
               pack: bool = False) -> nn.Module:
    """Load a checkpoint directory (safetensors) or a GGUF file.

    dtype: float32 or bfloat16 (or float16), the activations' dtype. quant: None (as stored),
    "int8" (per channel), "int8-g32", "int4-g32" or "int4-g128": each decoder weight is
    quantized as it is read; "float": a GGUF's Q8_0 / Q4_0 tensors dequantized to `dtype` (they
    otherwise stay quantized). A quantized checkpoint loads as it was saved. mmproj: a GGUF
    file's image/audio embedders (GGUF only). pack: the CPU fast path (models/packed.py): each
    float decoder Linear is packed as it is read, and the tied LM head is packed block by block
    from the file, while the embedding table stays mapped (lookups touch only their rows)."""
    root = Path(path)
    dtype = _resolve_dtype(dtype)
    if root.suffix == ".gguf" or (root.is_file() and _is_gguf(root)):
        from ..gguf.load import load_gguf

        model = load_gguf(root, dtype=dtype, device=device, quant=quant, mmproj=mmproj, block_mask=block_mask)
        return pack_linears(model) if pack else model
    if mmproj is not None:
        raise CheckpointError("mmproj is a GGUF projector file: pass it with a .gguf model")
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory" + ("" if root.exists() else " (it does not exist)"))
    config = ModelConfig.from_file(root / "config.json")
    if quant == "float":
        if config.quantization is not None:
            raise CheckpointError(f"{root}: quant='float' dequantizes a GGUF file's tensors; this checkpoint was "
                                  "saved quantized (load it as it is)")
        quant = None
    scheme = _scheme(config, quant, str(root / "config.json"))
    shards = _shards(root)
    model = build_model(config, block_mask, scheme, dtype)
    rename, transform = renames(config)
    placer = Placer(model, dtype, device, "config.json")
    pack = pack and device_can_pack(device, dtype)
    if pack:
        placer.pack = {id(m) for m in model.text.layers.modules() if type(m) is nn.Linear}
    head_name = _head_name(model) if pack else None
    head_source = None  # where the tied head's table is in the file: packed from there at the end
    with _return_freed_memory() if pack or scheme is not None else contextlib.nullcontext():
        bar = _progress(shards, placer.expected, progress)
        for shard in shards:
            try:
                f = safe_open(str(shard), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{shard}: not a readable safetensors file ({e})") from e
            with f, open(shard, "rb") as raw:
                offsets = _data_offsets(raw, shard) if scheme is not None or pack else {}
                for key in f.keys():
                    name = rename(key, config)
                    if name is None:
                        continue
                    sl = f.get_slice(key)
                    is_float = sl.get_dtype() in _FLOAT_DTYPES
                    placer.check(name, key, tuple(sl.get_shape()), is_float, str(shard))
                    try:
                        if is_float and placer.quantized_owner(name) is not None:
                            span, dt, shape = offsets[key], sl.get_dtype(), sl.get_shape()
                            placer.place_rows(name, lambda a, b: _pread_rows(raw, span, dt, shape, a, b), shard.name)
                        elif is_float and placer.packed_owner(name) is not None:
                            span, dt, shape = offsets[key], sl.get_dtype(), sl.get_shape()
                            placer.place_packed(name, _pread_rows(raw, span, dt, shape, 0, shape[0]), shard.name)
                        else:
                            placer.place(name, transform(name, f.get_tensor(key)), shard.name)
                            if is_float and name == head_name:
                                head_source = (shard, key, offsets[key], sl.get_dtype(), sl.get_shape())
                    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
                        raise CheckpointError(f"{shard}: cannot read tensor {key!r} ({e})") from e
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        try:
            model = placer.finish()
        except CheckpointError as e:
            raise CheckpointError(f"{root}: {e}") from None
        if head_source is not None:
            shard, key, span, dt, shape = head_source
            rows = PackedHead.ROWS
            with open(shard, "rb") as raw:  # read apart from the table's mapping, which stays untouched
                model.packed_head = PackedHead(_pread_rows(raw, span, dt, shape, a, min(a + rows, shape[0])).to(dtype)
                                               for a in range(0, shape[0], rows))
    return model


def _head_name(model: nn.Module) -> str | None:
    """The state-dict name of the LM head's table: the tied embedding (an untied head is a
    Linear outside the decoder and stays plain)."""
    if not getattr(model.config.text, "tie_word_embeddings", True):
        return None
    for name, p in model.named_parameters():
        if p is model.text.embed_tokens.weight:
            return name
    return None


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# Weights about to be quantized are read with pread into memory of their own, not through the
# mapping safe_open uses: every mapped page read stays in the process's RSS until the file is
# closed, so a mapped 24 GB bf16 checkpoint would count whole in the RSS of an 8 GB int4 load.
def _data_offsets(raw, shard: Path) -> dict[str, tuple[int, int]]:
    """Tensor name → (start, end) byte offsets in the file, from the safetensors header."""
    (n,) = struct.unpack("<Q", raw.read(8))
    header = json.loads(raw.read(n))
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _pread_rows(raw, span: tuple[int, int], dtype: str, shape, a: int, b: int) -> torch.Tensor:
    """Rows a..b of a 2-D tensor stored at `span` (row-major), read into memory of their own."""
    row = (span[1] - span[0]) // shape[0]
    buf = torch.empty((b - a) * row, dtype=torch.uint8)
    if os.preadv(raw.fileno(), [buf.numpy()], span[0] + a * row) != len(buf):
        raise ValueError("the file ends inside the tensor (truncated?)")
    return buf.view(_TORCH_DTYPES[dtype]).reshape(b - a, *shape[1:])


@contextlib.contextmanager
def _return_freed_memory():
    """While loading, make glibc give big freed buffers back to the system at once.

    Packing and quantizing read every weight into a buffer of its own and free it right after.
    glibc serves allocations below its *dynamic* mmap threshold (which climbs to 32 MiB after
    the first big free) from the heap and keeps them when freed, so the process would hold
    hundreds of MB of dead weight buffers (measured: +150 MB peak, +190 MB after loading the
    730M bench model). A fixed 1 MiB threshold maps such buffers and unmaps them on free. It
    must not stay: every activation buffer would then be a fresh mapping, page-faulted anew
    (prefill measured 40% slower). Afterwards the thresholds go to where the dynamic scheme
    settles (32 MiB, trim at 64 MiB) and the heap is trimmed. A no-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-3, 32 << 20)
            libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
            libc.malloc_trim(0)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _progress(shards, expected, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=len(expected), desc=f"loading {len(shards)} shard(s)", unit="tensor")
