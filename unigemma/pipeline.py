"""`unigemma.load(path)`: a checkpoint's model, tokenizer and processor behind one chat call.

    gemma = unigemma.load("path/to/gemma-4-12B")
    reply = gemma.chat([{"role": "user", "content": [
        {"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "What is this?"}]}])
    reply.content, reply.reasoning, reply.tool_calls

Messages are OpenAI-style (text, image, audio, video parts; tools and tool results). Decoding
is the slow greedy oracle (`generate/greedy.py`) until the engine lands. `gemma.logits(...)`
is the model's reference forward, unchanged, and `gemma.model` the bare `Gemma4Unified`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, InputError
from .generate.greedy import greedy_generate
from .models.gemma4 import Gemma4Unified
from .processing.chat import Processor
from .processing.parse import ToolCallError, parse_output
from .processing.tokenizer import Tokenizer
from .weights.loader import load_model


@dataclass
class ChatReply:
    """One assistant turn, split the way the OpenAI chat API reports it."""
    content: str
    reasoning: str
    tool_calls: list[dict]
    finish_reason: str  # "stop", "length" or "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(repr=False)
    errors: list[ToolCallError] = field(default_factory=list)  # tool calls that did not parse


def load_tokenizer(source: str | os.PathLike | Tokenizer) -> Tokenizer:
    """A Tokenizer from a checkpoint directory (tokenizer.json) or a GGUF file's vocabulary."""
    if isinstance(source, Tokenizer):
        return source
    path = Path(source)
    return Tokenizer.from_gguf(path) if path.suffix == ".gguf" else Tokenizer.from_dir(path)


def load(path: str | os.PathLike, dtype="bfloat16", device="cpu", block_mask: str = "sliding",
         tokenizer: str | os.PathLike | Tokenizer | None = None, progress: bool = False) -> "Gemma":
    """Load a checkpoint directory for chat and for the reference forward.

    The tokenizer and chat template come from the checkpoint (`tokenizer.json`,
    `chat_template.jinja`) unless `tokenizer` names another directory, a GGUF file or a
    Tokenizer. A checkpoint without one still loads: `logits` works and `chat` says what is missing.
    """
    model = load_model(path, dtype=dtype, device=device, block_mask=block_mask, progress=progress)
    if tokenizer is None and (Path(path) / "tokenizer.json").is_file():
        tokenizer = path
    return Gemma(model, load_tokenizer(tokenizer) if tokenizer is not None else None)


class Gemma:
    """A loaded model with its tokenizer: messages in, text out."""

    def __init__(self, model: Gemma4Unified, tokenizer: Tokenizer | None = None):
        self.model, self.tokenizer = model, tokenizer
        if tokenizer is not None and tokenizer.vocab_size > model.config.text.vocab_size:
            raise CheckpointError(f"the tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens but the "
                                  f"model's vocabulary has {model.config.text.vocab_size}")

    @property
    def config(self):
        return self.model.config

    def logits(self, *args, **kwargs) -> torch.Tensor:
        """The reference forward; see `Gemma4Unified.logits`."""
        return self.model.logits(*args, **kwargs)

    def processor(self, image_budget: int = 280) -> Processor:
        if self.tokenizer is None:
            raise InputError("this checkpoint has no tokenizer.json: pass tokenizer='path/to/tokenizer-dir' "
                             "or a .gguf file to unigemma.load")
        return Processor(self.tokenizer, image_budget=image_budget)

    def inputs(self, messages: Any, *, tools: list[dict] | None = None, enable_thinking: bool = False,
               image_budget: int = 280) -> dict[str, torch.Tensor]:
        """The model inputs for a conversation: what the reference processor returns."""
        return self.processor(image_budget)(messages, tools=tools, enable_thinking=enable_thinking)

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, enable_thinking: bool = False,
             max_new_tokens: int = 256, image_budget: int = 280) -> ChatReply:
        """Greedy reply to one conversation."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if messages and isinstance(messages, (list, tuple)) and isinstance(messages[0], (list, tuple)):
            raise InputError("chat takes one conversation (a list of messages), not a batch of them")
        inputs = self.inputs(messages, tools=tools, enable_thinking=enable_thinking, image_budget=image_budget)
        n_prompt = inputs["input_ids"].shape[1]
        context = self.config.text.max_position_embeddings
        if n_prompt >= context:
            raise InputError(f"the prompt is {n_prompt} tokens; the model's context is {context} tokens")
        max_new_tokens = min(max_new_tokens, context - n_prompt)
        inputs.pop("num_frames_per_video", None)  # frames are embedded one by one: the flat list is enough
        stop = set(self.tokenizer.eos_ids) | set(self.config.stop_token_ids)
        ids = greedy_generate(self.model, inputs.pop("input_ids"), max_new_tokens=max_new_tokens,
                              stop_ids=sorted(stop), **inputs)[0].tolist()
        stopped = bool(ids) and ids[-1] in stop
        text = self.tokenizer.decode(ids[:-1] if stopped else ids)
        parsed = parse_output(text)
        finish = "tool_calls" if parsed.tool_calls else ("stop" if stopped else "length")
        return ChatReply(content=parsed.content, reasoning=parsed.reasoning, tool_calls=parsed.tool_calls,
                         finish_reason=finish, prompt_tokens=n_prompt, completion_tokens=len(ids), token_ids=ids,
                         errors=parsed.errors)
