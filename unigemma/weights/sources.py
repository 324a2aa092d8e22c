"""Tensor sources: where a checkpoint's tensors are, named as our module tree names them.

A source knows its model's config and yields one `Tensor` record per stored tensor: our name,
the shape it has once placed, whether it reads as float values, and readers — the whole
tensor, rows a..b into memory of their own (for quantizing or packing without a second copy),
and, for a tensor stored in one of our quantized layouts, its codes and scales. Nothing is
read until the placer calls a reader. This file holds the protocol and the safetensors source
(a checkpoint directory, one file or shards); the GGUF and mmproj sources are in
weights/gguf_source.py. Sources know no placement policy: weights/placer.py decides what to
read and how to store it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from ..errors import CheckpointError
from ..models import renames

Rows = Callable[[int, int], torch.Tensor]


@dataclass
class Tensor:
    """One stored tensor, not yet read."""
    name: str  # our module tree's name
    key: str  # its name in the file, for messages
    shape: tuple[int, ...]  # as placed; a natively quantized tensor's float shape
    is_float: bool  # reads as float values (a quantized one, dequantized)
    read: Callable[[], torch.Tensor]  # the whole tensor, transformed to our convention
    read_rows: Rows | None = None  # rows a..b of a float matrix as stored, in memory of their own
    native: tuple[int, int | None] | None = None  # (bits, group) of our layout it is stored in
    read_native: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None  # (codes, scales)
    file: str = ""  # the file it is in, for messages


class TensorSource(Protocol):
    config: Any  # ModelConfig (a drafter's: DrafterConfig)
    describes: str  # what describes the model, in messages (".../config.json", "x.gguf's metadata")
    label: str  # the progress bar's text
    read_errors: tuple[type[BaseException], ...]  # read failures reported as "cannot read tensor"

    def native(self, name: str) -> tuple[int, int | None] | None:
        """(bits, group) when the weight `name` is stored in one of our quantized layouts."""

    def requantize(self, name: str) -> tuple[int, int | None] | None:
        """(bits, group) a weight stored quantized in a layout we do not run loads into by default."""

    def tensors(self) -> Iterator[Tensor]: ...

    def close(self) -> None: ...


def shards(root: Path) -> list[Path]:
    """The safetensors files of checkpoint directory `root` (one file or an index's shards)."""
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


FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# Weights about to be quantized or packed are read with pread into memory of their own, not
# through the mapping safe_open uses: every mapped page read stays in the process's RSS until
# the file is closed, so a mapped 24 GB bf16 checkpoint would count whole in the RSS of an 8 GB
# int4 load.
def data_offsets(raw) -> dict[str, tuple[int, int]]:
    """Tensor name → (start, end) byte offsets in the file, from the safetensors header."""
    raw.seek(0)
    (n,) = struct.unpack("<Q", raw.read(8))
    header = json.loads(raw.read(n))
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def pread_rows(raw, span: tuple[int, int], dtype: str, shape, a: int, b: int) -> torch.Tensor:
    """Rows a..b of a 2-D tensor stored at `span` (row-major), read into memory of their own."""
    row = (span[1] - span[0]) // shape[0]
    buf = torch.empty((b - a) * row, dtype=torch.uint8)
    if os.preadv(raw.fileno(), [buf.numpy()], span[0] + a * row) != len(buf):
        raise ValueError("the file ends inside the tensor (truncated?)")
    return buf.view(FLOAT_DTYPES[dtype]).reshape(b - a, *shape[1:])


class SafetensorsSource:
    """A checkpoint directory: config.json and safetensors shards, memory-mapped. Plain reads
    are views of the mapping (lookups of a mapped table touch only their rows); row reads go
    through pread. Pickle files are never opened."""

    read_errors = (SafetensorError, OSError, RuntimeError, ValueError, KeyError)

    def __init__(self, root: str | os.PathLike, config=None, rename=None, transform=None):
        """config, rename(key, config) → our name or None, transform(name, tensor): the model's
        (models.renames) unless given (a drafter's names are its module names)."""
        self.root = Path(root)
        self.config = ModelConfig.from_file(self.root / "config.json") if config is None else config
        if rename is None:
            rename, transform = renames(self.config)
        self.rename, self.transform = rename, transform or (lambda name, t: t)
        self.describes = str(self.root / "config.json")
        self.shards = shards(self.root)
        self.label = f"loading {len(self.shards)} shard(s)"

    def native(self, name: str) -> None:
        return None  # a quantized safetensors checkpoint records its scheme in config.json

    def requantize(self, name: str) -> None:
        return None

    def tensors(self) -> Iterator[Tensor]:
        for shard in self.shards:
            try:
                f = safe_open(str(shard), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{shard}: not a readable safetensors file ({e})") from e
            with f, open(shard, "rb") as raw:
                offsets = data_offsets(raw)
                for key in f.keys():
                    name = self.rename(key, self.config)
                    if name is None:
                        continue
                    sl = f.get_slice(key)
                    dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
                    is_float = dtype in FLOAT_DTYPES

                    def read(f=f, key=key, name=name):
                        return self.transform(name, f.get_tensor(key))

                    def read_rows(a, b, span=offsets[key], dtype=dtype, shape=shape, raw=raw):
                        return pread_rows(raw, span, dtype, shape, a, b)

                    yield Tensor(name, key, shape, is_float, read, read_rows if is_float else None, file=str(shard))

    def close(self) -> None:
        pass
