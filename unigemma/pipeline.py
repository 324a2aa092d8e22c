"""`unigemma.load(path)`: a checkpoint's model, tokenizer and processor behind one chat call.

    gemma = unigemma.load("path/to/gemma-4-12B")
    reply = gemma.chat([{"role": "user", "content": [
        {"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "What is this?"}]}])
    reply.content, reply.reasoning, reply.tool_calls

Messages are OpenAI-style (text, image, audio, video parts; tools and tool results). Generation
runs on `generate/engine.py` (`stream` for deltas; a `session()` keeps a chat's KV cache between
turns). `gemma.logits(...)` is the model's reference forward, unchanged, and `gemma.model` the
bare model (models/base.py `CausalLM`; `Gemma4Unified` for Gemma 4).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import CheckpointError, InputError
from .generate.engine import Engine, Session
from .generate.sampling import SamplingParams
from .generate.speculative import DraftLength
from .generate.stream import Delta, Timings
from .inputs import ModelInputs
from .mini import resolve as shipped
from .models import family_of
from .models.base import CausalLM
from .processing.chat import Processor
from .processing.cost import Limits as ProcessingLimits
from .processing.parse import ToolCallError
from .processing.tokenizer import Tokenizer
from .templates import ChatTemplate, choose, from_file
from .weights.hub import resolve
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
    timings: Timings | None = field(default=None, repr=False)


def load_tokenizer(source: str | os.PathLike | Tokenizer) -> Tokenizer:
    """A Tokenizer from a checkpoint directory (tokenizer.json) or a GGUF file's vocabulary."""
    if isinstance(source, Tokenizer):
        return source
    path = Path(source)
    return Tokenizer.from_gguf(path) if path.suffix == ".gguf" else Tokenizer.from_dir(path)


def load(path: str | os.PathLike, dtype="bfloat16", device="cpu", block_mask: str = "sliding",
         tokenizer: str | os.PathLike | Tokenizer | None = None, progress: bool = False,
         fast: bool = True, quant: str | None = None, mmproj: str | os.PathLike | None = None,
         draft: str | os.PathLike | None = None, draft_tokens: int | None = None,
         dequantize: bool = False, exact: bool = False,
         chat_template: str | os.PathLike | ChatTemplate | None = None,
         kv_cache_dtype: str = "auto", kv_quant_layers: str | None = None,
         lora: str | os.PathLike | None = None, tp=None) -> "Gemma":
    """Load a checkpoint directory, a GGUF file or a hub model id for chat and for the reference forward.

    path: a local directory or .gguf, "mini" (unigemma-mini, shipped: unigemma/mini), or
    "ORG/NAME" (optionally ":FILE.gguf" or ":QUANT", and
    "@REVISION"), fetched into the hub cache first (weights/hub.py; offline with HF_HUB_OFFLINE=1).
    The tokenizer and chat template come from the checkpoint (`tokenizer.json`,
    `chat_template.jinja`, or a GGUF file's own vocabulary) unless `tokenizer` names another
    directory, a GGUF file or a Tokenizer; chat_template: a Jinja file to chat with instead. A
    checkpoint with no template chats with its family's published one (unigemma/templates); a
    checkpoint without a tokenizer still loads: `logits` works and `chat` says what is missing.
    quant: "int8", "int8-g32", "int4-g32" or "int4-g128", each weight quantized as it loads (`load_model`); dequantize: a GGUF's quantized tensors as floats.
    mmproj: a GGUF model's image/audio embedders. draft: an MTP drafter's directory, or the name
    of one shipped with unigemma (unigemma/drafters: "gemma-3-270m"); draft_tokens: a fixed
    draft length (default adaptive). exact: quantized layers keep float activations, never the
    int8-activation kernels (the fastest quantized path on CPUs, quant/kernels.py).
    kv_cache_dtype: how the KV cache stores K/V: "auto" (the model's dtype), "bf16", "fp16",
    "fp32" or "int8" (fp16 scales per token, head and 32 channels: 53% of bf16); kv_quant_layers:
    on which layers ("all", "full": the global ones, "sliding"; default "full" for int8, "all"
    for a float dtype), the others in the model's dtype (cache/kv.py).
    lora: a LoRA adapter directory in PEFT's format (PEFT's, Unsloth's or `unigemma finetune`'s),
    applied unmerged as adapter "default" to every conversation (`Gemma.load_adapter` for more).
    tp: a tensor-parallel group (unigemma/tp/group.py `init_group`) this process is rank 0 of:
    it loads its shard and drives the other ranks, which run `tp.load.run_rank` (float weights;
    no LoRA, no quant).
    """
    from .cache.kv import layer_dtypes

    layer_dtypes(torch.float32, kv_cache_dtype, kv_quant_layers)  # a bad name fails before the weights load
    if chat_template is not None and not isinstance(chat_template, ChatTemplate):
        chat_template = from_file(chat_template, "chat_template=")  # before the weights: fail fast
    path = resolve(shipped(path))  # "mini": the shipped unigemma-mini (unigemma/mini)
    # fast: the CPU fast path, prepacked oneDNN weights (~2x faster decoding, models/packed.py),
    # packed as they load; fast=False keeps the plain modules (the tests' oracle)
    if tp is not None:
        from .tp.load import lead, load_shard

        if lora is not None:
            raise InputError("LoRA adapters are not supported with tensor parallelism")
        model = load_shard(path, tp, dtype=dtype, block_mask=block_mask, progress=progress, pack=fast, mmproj=mmproj,
                           dequantize=dequantize, quant=quant)
        lead(model, tp)
        device = tp.device  # (the drafter, on rank 0 only, goes where the shard is)
    else:
        model = load_model(path, dtype=dtype, device=device, block_mask=block_mask, progress=progress, quant=quant,
                           dequantize=dequantize, mmproj=mmproj, pack=fast, exact=exact)
    is_gguf = Path(path).is_file()
    if tokenizer is None and (is_gguf or (Path(path) / "tokenizer.json").is_file()):
        tokenizer = path
    gen = Path(path) / "generation_config.json"
    defaults = None
    if not is_gguf and gen.is_file():
        try:
            defaults = SamplingParams.from_generation_config(json.loads(gen.read_text()))
        except ValueError as e:  # json errors; InputError is a ValueError too
            raise CheckpointError(f"{gen}: {e}") from e
    drafter = None
    if draft is not None:  # an MTP drafter: one conversation at a time decodes speculatively
        from .drafters import drafter_path
        from .weights.drafter import load_drafter

        drafter = load_drafter(drafter_path(draft), dtype=dtype, device=device)
    gemma = Gemma(model, load_tokenizer(tokenizer) if tokenizer is not None else None, defaults,
                  drafter=drafter, draft_tokens=draft_tokens, chat_template=chat_template,
                  kv_cache_dtype=kv_cache_dtype, kv_quant_layers=kv_quant_layers)
    if lora is not None:
        gemma.load_adapter(lora)
    return gemma


class Gemma:
    """A loaded model with its tokenizer: messages in, text out."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None = None,
                 default_params: SamplingParams | None = None, drafter=None, draft_tokens: int | None = None,
                 chat_template: str | ChatTemplate | None = None, kv_cache_dtype: str = "auto",
                 kv_quant_layers: str | None = None):
        """drafter: an MTP drafter (models/drafter.py); draft_tokens: a fixed draft length
        (default: adaptive, generate/speculative.py). chat_template: Jinja text (or a
        `templates.ChatTemplate`) to chat with instead of the tokenizer's; without either, the
        family's published template. `self.template.origin` says which one is in use.
        kv_cache_dtype / kv_quant_layers: the engine's KV storage (`load`)."""
        self.drafter = drafter
        self.kv_cache = (kv_cache_dtype, kv_quant_layers)
        self.draft = DraftLength(k=draft_tokens, adaptive=False) if draft_tokens else DraftLength()
        if drafter is not None:  # (a tensor-parallel shard's own config has 1/N of the heads)
            drafter.config.check_target(getattr(model, "full_config", model.config).text)
        self.model, self.tokenizer = model, tokenizer
        if isinstance(chat_template, str):
            chat_template = ChatTemplate(chat_template, "given to Gemma (chat_template=)")
        self.template = choose(chat_template, tokenizer.chat_template if tokenizer is not None else None,
                               family_of(model.config.model_type).chat_template)
        self.default_params = default_params or SamplingParams(temperature=0.0)
        self._engine: Engine | None = None
        if tokenizer is not None and tokenizer.vocab_size > model.config.text.vocab_size:
            raise CheckpointError(f"the tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens but the "
                                  f"model's vocabulary has {model.config.text.vocab_size}")

    @property
    def config(self):
        return self.model.config

    @property
    def image_budget(self) -> int:
        """Soft tokens per image when a call names none: the checkpoint's vision_config
        num_soft_tokens (the 12B's 280; unigemma-mini was trained at 70)."""
        vision = self.model.config.vision
        return vision.num_soft_tokens if vision is not None else 280

    def logits(self, *args, **kwargs) -> torch.Tensor:
        """The reference forward; see `CausalLM.logits` (models/base.py)."""
        return self.model.logits(*args, **kwargs)

    def load_adapter(self, path: str | os.PathLike, name: str = "default", activate: bool = True):
        """Load a PEFT-format LoRA adapter directory as adapter `name`, unmerged (the packed or
        quantized weights stay the base; lora/peft.py). activate: every conversation runs it
        (else only those that ask: a server's per-request `model`). Returns its LoraConfig."""
        from .lora import load_adapter

        if getattr(self.model, "tp_group", None) is not None:  # it would wrap rank 0's modules only
            raise InputError("LoRA adapters are not supported with tensor parallelism")
        return load_adapter(self.model, path, name, activate=activate)

    def set_adapter(self, name: str | None) -> None:
        """The adapter every conversation runs from now on (None: the base model)."""
        from .lora import set_adapter

        set_adapter(self.model, name)

    def processor(self, image_budget: int | None = None, max_len: int | None = None,
                  limits: ProcessingLimits | None = None) -> Processor:
        """A Processor for this checkpoint. max_len: the context prompts must fit, with room for a
        reply (default the model's); a prompt sure to exceed it is refused before media are
        decoded or text tokenized. limits: per-request media and tool limits (cost.Limits)."""
        if self.tokenizer is None:
            raise InputError("this checkpoint has no tokenizer.json: pass tokenizer='path/to/tokenizer-dir' "
                             "or a .gguf file to unigemma.load")
        context = self.model.config.text.max_position_embeddings
        return Processor(self.tokenizer, self.template.source, image_budget=image_budget or self.image_budget,
                         max_len=min(max_len or context, context),
                         limits=limits)

    def inputs(self, messages: Any, *, tools: list[dict] | None = None, enable_thinking: bool = False,
               image_budget: int | None = None) -> ModelInputs:
        """The model inputs for a conversation: what the reference processor returns."""
        return self.processor(image_budget)(messages, tools=tools, enable_thinking=enable_thinking)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            if self.tokenizer is None:
                self.processor()  # raises the "no tokenizer" error
            self._engine = Engine(self.model, self.tokenizer, drafter=self.drafter, draft=self.draft,
                                  kv_cache_dtype=self.kv_cache[0], kv_quant_layers=self.kv_cache[1])
        return self._engine

    def session(self) -> Session:
        """A chat whose KV cache carries over between turns: pass it to each `chat`/`stream` call."""
        return self.engine.session()

    def _prepare(self, messages, tools, enable_thinking, image_budget) -> ModelInputs:
        if messages and isinstance(messages, (list, tuple)) and isinstance(messages[0], (list, tuple)):
            raise InputError("chat takes one conversation (a list of messages), not a batch of them")
        return self.inputs(messages, tools=tools, enable_thinking=enable_thinking, image_budget=image_budget)

    def stream(self, messages: list[dict], *, tools: list[dict] | None = None, enable_thinking: bool = False,
               image_budget: int | None = None, params: SamplingParams | None = None,
               session: Session | None = None) -> Iterator[Delta]:
        """Reply deltas (content, reasoning, tool calls); the last carries finish_reason and timings."""
        inputs = self._prepare(messages, tools, enable_thinking, image_budget)
        return self.engine.stream(inputs, params or self.default_params, session)

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, enable_thinking: bool = False,
             max_new_tokens: int | None = None, image_budget: int | None = None, params: SamplingParams | None = None,
             session: Session | None = None) -> ChatReply:
        """The whole reply to one conversation. Sampling follows the checkpoint's
        generation_config.json unless `params` says otherwise (greedy when it has none)."""
        params = params or self.default_params
        if max_new_tokens is not None:
            params = replace(params, max_tokens=max_new_tokens)
        inputs = self._prepare(messages, tools, enable_thinking, image_budget)
        done = self.engine.generate(inputs, params, session)
        return ChatReply(content=done.content, reasoning=done.reasoning, tool_calls=done.tool_calls,
                         finish_reason=done.finish_reason, prompt_tokens=done.timings.prompt_tokens,
                         completion_tokens=len(done.token_ids), token_ids=done.token_ids, errors=done.errors,
                         timings=done.timings)
