"""MTP drafters shipped with unigemma, by name (`--draft NAME`, `load(..., draft=NAME)`).

`gemma-3-270m`: trained by self-distillation for the demo's Gemma 3 270M (bench/train_drafter.py,
which prints its acceptance and speed-up on held-out prompts). Its head rows are zero outside
the ~24k tokens its training text used, so the file is large on disk and small in git.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED = {"gemma-3-270m": Path(__file__).resolve().parent / "gemma-3-270m"}


def drafter_path(draft: str | os.PathLike) -> Path:
    """A bundled drafter's directory by name, or the path given."""
    return BUNDLED.get(str(draft), Path(draft))


__all__ = ["BUNDLED", "drafter_path"]
