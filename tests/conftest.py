"""Fixtures shared by test modules (a fixture is never imported from another test module)."""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reference import Shape, write_checkpoint  # noqa: E402  (tests/ is on the path from here on)

REAL = Shape(vocab=262144, hidden=64, posemb=64, window=16, seed=3)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    """Checkpoints written by transformers, shared by the whole run (keyed by shape)."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def checkpoint(ckpt_root, tmp_path_factory):
    """A real-vocabulary random checkpoint with the tokenizer saved next to it, as released ones are."""
    from test_tokenizer import reference

    src = write_checkpoint(REAL, ckpt_root)
    path = tmp_path_factory.mktemp("with-tokenizer")
    for f in src.iterdir():
        shutil.copy(f, path / f.name)
    reference().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma(checkpoint):
    """The pipeline over `checkpoint`, in float32."""
    import unigemma

    return unigemma.load(checkpoint, dtype="float32")
