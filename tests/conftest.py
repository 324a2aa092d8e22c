import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    """Checkpoints written by transformers, shared by the whole run (keyed by shape)."""
    return tmp_path_factory.mktemp("checkpoints")
