"""unigemma: a fast, faithful, hackable engine for Gemma 4 unified (encoder-free) models.

    gemma = unigemma.load("path/to/checkpoint", dtype="bfloat16")
    reply = gemma.chat([{"role": "user", "content": "Hello!"}])        # text, thoughts, tool calls
    logits = gemma.logits(input_ids, mm_token_type_ids=..., pixel_values=..., ...)
"""

import os

# Weights stream from memory once per decoded token; on 4 KiB pages the reads stall on page walks.
# torch backs its large CPU allocations with transparent huge pages when this is set (read once,
# at torch's first allocation: set it before importing torch to have it when torch is imported
# first). Gemma 3 270M's 168 MB int8 head: 9.7 → 6.9 ms a token (AVX-512 machine, THP "madvise").
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .config import ModelConfig  # noqa: E402
from .errors import CheckpointError, ConfigError, InputError, UnigemmaError  # noqa: E402
from .generate.greedy import greedy_generate  # noqa: E402
from .inputs import ModelInputs  # noqa: E402
from .models.gemma4 import Gemma4Unified  # noqa: E402
from .pipeline import ChatReply, Gemma, load, load_tokenizer  # noqa: E402
from .processing.chat import Processor  # noqa: E402
from .processing.tokenizer import StreamDecoder, Tokenizer  # noqa: E402
from .weights.loader import load_model  # noqa: E402

__all__ = ["load", "load_model", "load_tokenizer", "Gemma", "ChatReply", "Gemma4Unified", "ModelConfig",
           "Tokenizer", "StreamDecoder", "Processor", "ModelInputs", "greedy_generate",
           "UnigemmaError", "ConfigError", "CheckpointError", "InputError"]
__version__ = "0.1.0"
