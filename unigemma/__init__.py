"""unigemma: a fast, faithful, hackable engine for Gemma 4 unified (encoder-free) models.

    gemma = unigemma.load("path/to/checkpoint", dtype="bfloat16")
    reply = gemma.chat([{"role": "user", "content": "Hello!"}])        # text, thoughts, tool calls
    logits = gemma.logits(input_ids, mm_token_type_ids=..., pixel_values=..., ...)
"""

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, InputError, UnigemmaError
from .generate.greedy import greedy_generate
from .inputs import ModelInputs
from .models.gemma4 import Gemma4Unified
from .pipeline import ChatReply, Gemma, load, load_tokenizer
from .processing.chat import Processor
from .processing.tokenizer import StreamDecoder, Tokenizer
from .weights.loader import load_model

__all__ = ["load", "load_model", "load_tokenizer", "Gemma", "ChatReply", "Gemma4Unified", "ModelConfig",
           "Tokenizer", "StreamDecoder", "Processor", "ModelInputs", "greedy_generate",
           "UnigemmaError", "ConfigError", "CheckpointError", "InputError"]
__version__ = "0.1.0"
