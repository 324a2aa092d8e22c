"""unigemma-mini as shipped: its trained embedders and decoder adapter are package data here,
put onto the Gemma 3 270M GGUF the project installs the first time the model is asked for.

    unigemma.load("mini"), --model mini (run, chat, serve), unigemma demo --multimodal

Files here, written by bench/mini_ship.py from a bench/mini_train.py checkpoint:
- full_weights.safetensors: the image and audio embedders, trained from scratch;
- adapter_model.safetensors, adapter_config.json: the decoder's LoRA adapter (PEFT's format; its
  lora_alpha is the trained one times the card's `adapter_scale`, the share of the update merged;
  joined from staged runs, the card's `stages`, by bench/mini_join.py: their parts stacked, each
  module at its own rank, r 96 on layers 5-17 and 32 on layers 0-4 named in `rank_pattern`);
- card.json: how many steps it trained and the held-out figures measured on these very weights
  (bench/mini_quality.py), which `unigemma demo --multimodal` prints;
- heldout/: ten held-out items (pictures and clips the training never saw, their question and
  answer): what the demo asks, and what the tests ask through the Python API and the server.

The checkpoint is assembled once per shipped version (weights/mini.py `trained_checkpoint`: the
GGUF's decoder dequantized to float32 with the adapter merged in, ~30 s, 1.1 GB) in the user's
cache (UNIGEMMA_CACHE, default ~/.cache/unigemma), under a name carrying the digest of the
shipped files, so an upgraded package never reads an older assembly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

NAME = "mini"
HERE = Path(__file__).resolve().parent
WEIGHT_FILES = ("full_weights.safetensors", "adapter_model.safetensors", "adapter_config.json")


def digest() -> str:
    from ..errors import CheckpointError

    missing = [name for name in WEIGHT_FILES if not (HERE / name).is_file()]
    if missing:
        raise CheckpointError(f"unigemma-mini: {', '.join(missing)} missing from {HERE} (reinstall unigemma)")
    h = hashlib.sha256()
    for name in WEIGHT_FILES:
        h.update(name.encode() + (HERE / name).read_bytes())
    return h.hexdigest()[:12]


def shipped_checkpoint(cache: str | os.PathLike | None = None) -> Path:
    """The shipped model's checkpoint directory, assembled into `cache` (default the user's) if it is not there yet."""
    from ..errors import CheckpointError
    from ..vocab import cache_dir
    from ..weights.mini import trained_checkpoint

    out = Path(cache or cache_dir()) / f"unigemma-mini-{digest()}"
    if (out / "config.json").is_file():
        return out
    print(f"assembling unigemma-mini (Gemma 3 270M + the shipped embedders and adapter) into {out}", file=sys.stderr)
    try:
        return trained_checkpoint(HERE, out)
    except (CheckpointError, OSError):
        if (out / "config.json").is_file():  # another process assembled it first
            return out
        raise


def resolve(model: str | os.PathLike) -> str | os.PathLike:
    """`mini` → the shipped checkpoint, unless a file or directory of that name is where the user is."""
    return shipped_checkpoint() if str(model) == NAME and not Path(model).exists() else model


def card() -> dict:
    return json.loads((HERE / "card.json").read_text(encoding="utf-8"))


def heldout_items() -> list[dict]:
    """The shipped held-out items: {id, kind, answer, messages} with the media paths made absolute."""
    out = []
    for line in (HERE / "heldout" / "items.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        for part in r["messages"][0]["content"]:
            if part["type"] in ("image", "audio"):
                part[part["type"]] = str(HERE / "heldout" / part[part["type"]])
        out.append(r)
    return out


__all__ = ["NAME", "card", "heldout_items", "resolve", "shipped_checkpoint"]
