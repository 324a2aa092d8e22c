"""The generation engine: chunked prefill, prefix reuse across chat turns, one-call generation.

    engine = Engine(model, tokenizer)
    session = engine.session()                       # one chat: its KV cache outlives a turn
    for delta in engine.stream(inputs, SamplingParams(temperature=0.7), session):
        print(delta.content, end="")

`inputs` are the processor's tensors (`Processor(...)(messages)`). Prefill runs in chunks of at
most `prefill_chunk` tokens that never cut an image (or video frame): its bidirectional block
must see itself whole within one forward. A session remembers the tokens (and media) in its
cache; the next turn prefills only what differs from them. Without a session, a prefix cache
(cache/prefix.py) does the same across requests: the prompt's longest cached prefix is
restored, and the prompt is kept (restore points at its chunk bounds and its end).

Decoding is not here: `stream`, `generate` and `generate_batch` submit their conversations to a
Scheduler of their own (generate/scheduler.py, the only decode loop) and step it on the
caller's thread. Several conversations of one call are rows of its batch, each decoding as it
would alone; a session's row is saved back into the session when its reply is done. The
Engine owns what a request needs before it decodes (prefill, stop ids, the drafter, the
decode step of generate/runner.py) and knows nothing of rows, timings or text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..cache.kv import KEY_BLOCK, KVCache, layer_dtypes
from ..cache.prefix import PrefixCache
from ..errors import InputError
from ..inputs import VISION_TYPES, ModelInputs, chunk_bounds
from ..models.drafter import Drafter
from ..models.base import CausalLM
from ..processing.tokenizer import Tokenizer
from .runner import make_step
from .sampling import SamplingParams
from .speculative import DraftLength, MTPProposer
from .stream import Completion, Delta, collect

# Spare ring slots of a chat's cache: a new turn that rewrites the end of the last one (e.g.
# dropping its thoughts) reuses the rest, and rejected speculative drafts roll back. More than
# a decode batch's default (cache/kv.py RESERVE); the same meaning.
CHAT_RESERVE = 64

# A prefill chunk of Q tokens over K keys builds [Q, K] boolean masks (models/masks.py) that
# SDPA turns into a float one: memory that grows with the context, not with the chunk. Past
# this many query-key pairs a chunk shrinks (to no fewer than KEY_BLOCK tokens) so the prefill's
# working memory stays flat however long the prompt: 512 tokens a chunk up to ~16K tokens of
# context, 64 at 128K (more forwards, each as cheap: a chunk's cost is its tokens' weights and
# attention either way).
PREFILL_SCORES = 512 * 16384


@dataclass
class Session:
    """A chat's saved row: its one-sequence cache and the token keys it holds (ids, media
    placeholders keyed by content)."""
    cache: KVCache | None = None
    keys: list = field(default_factory=list)


def prompt_keys(inputs: ModelInputs, media_ids: dict, adapter: tuple | None = None) -> list:
    """The prompt's token keys (inputs.py `token_keys`) as cached K/V are keyed: under a LoRA
    adapter the first key also names it, so K/V computed with one adapter (or none) never
    match a prompt run with another (an adapter changes every layer's K/V from token 0)."""
    keys = inputs.token_keys(media_ids)
    if adapter is not None and keys:
        keys[0] = (adapter, keys[0])
    return keys


# --- the engine -----------------------------------------------------------------------
class Engine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, *, prefill_chunk: int = 512,
                 reserve: int = CHAT_RESERVE, drafter: Drafter | None = None, draft: DraftLength | None = None,
                 compile_step: bool = False, prefill_scores: int = PREFILL_SCORES, prefix_cache_mb: float = 0,
                 kv_cache_dtype: str = "auto", kv_quant_layers: str | None = None):
        """reserve: spare ring slots of the caches this engine decodes in (CHAT_RESERVE).
        prefill_scores: the query-key pairs one prefill chunk may attend (PREFILL_SCORES).
        prefix_cache_mb: a prefix cache (cache/prefix.py) of this many MiB shared by this
        engine's calls (0: none; a Scheduler may have its own).
        drafter: an MTP drafter; a conversation decoding alone then decodes speculatively
        (`draft`: the draft length, fixed or adaptive). compile_step: run the decode step
        under torch.compile (generate/runner.py; eager by default). kv_cache_dtype /
        kv_quant_layers: how every cache of this engine (and of its schedulers) stores K/V
        ("auto" | "bf16" | "fp16" | "fp32" | "int8", on "all" | "full" | "sliding" layers, None: full
        for int8, all for a float dtype; cache/kv.py `layer_dtypes`)."""
        self.model, self.tokenizer = model, tokenizer
        self.set_kv_cache(kv_cache_dtype, kv_quant_layers)
        self.prefill_chunk, self.reserve, self.prefill_scores = prefill_chunk, reserve, prefill_scores
        self.proposer = MTPProposer(model, drafter) if drafter is not None else None
        self.draft = draft or DraftLength()
        self.decode_step = make_step(compile_step)
        c = model.config
        self.context = c.text.max_position_embeddings
        self.media_ids = {"image": c.image_token_id, "video": c.video_token_id, "audio": c.audio_token_id}
        self.base_stop_ids = set(tokenizer.eos_ids) | set(c.stop_token_ids)
        self.prefix_cache = self.make_prefix_cache(prefix_cache_mb)

    def make_prefix_cache(self, mb: float) -> PrefixCache | None:
        """A prefix cache of `mb` MiB for this model (None for 0)."""
        if mb < 0:
            raise InputError(f"the prefix cache size is a number of MiB >= 0, got {mb}")
        if mb and getattr(self.model, "tp_group", None) is not None:  # its K/V copies would live on rank 0 only
            raise InputError("the prefix cache is not supported with tensor parallelism (use 0 MiB)")
        return PrefixCache(self.model.config.text, int(mb * 2**20)) if mb else None

    def session(self) -> Session:
        return Session()

    def set_kv_cache(self, kv_cache_dtype: str = "auto", kv_quant_layers: str | None = None) -> None:
        """Store K/V of caches made from now on this way (ValueError for a bad name). A session
        cached in another format is prefilled afresh on its next turn; the engine's prefix
        cache, whose entries hold K/V in the old format, is emptied."""
        dtypes = layer_dtypes(self.model.dtype, kv_cache_dtype, kv_quant_layers)
        if getattr(self, "prefix_cache", None) is not None and dtypes != self.layer_dtypes:
            self.prefix_cache.clear()
        self.layer_dtypes = dtypes
        self.kv_cache_dtype, self.kv_quant_layers = kv_cache_dtype, kv_quant_layers

    def make_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache for `batch` prompts of up to `max_len` tokens, in this engine's KV format."""
        return self.model.make_cache(batch, max_len, reserve=self.reserve, kv_dtype=self.kv_cache_dtype,
                                     quant_layers=self.kv_quant_layers)

    def stop_ids(self, p: SamplingParams) -> set[int]:
        """The token ids that end a reply under these parameters."""
        return set(p.stop_token_ids) | (set() if p.ignore_eos else self.base_stop_ids)

    # -- prefill -------------------------------------------------------------------------
    def chunk_size(self, start: int) -> int:
        """Tokens in the prefill chunk that starts at sequence index `start` (see PREFILL_SCORES)."""
        fit = self.prefill_scores // (start + self.prefill_chunk)  # keys: what is cached + the chunk
        if fit >= self.prefill_chunk:
            return self.prefill_chunk
        # A power of two: every new matmul shape costs kernel caches (oneDNN's and others',
        # ~1-3 MB each, measured), so a long prompt runs a few chunk sizes, not hundreds.
        return max(KEY_BLOCK, 1 << (fit.bit_length() - 1)) if fit > 0 else KEY_BLOCK

    def _check_length(self, n_prompt: int, params: list[SamplingParams]) -> int:
        if n_prompt >= self.context:
            raise InputError(f"the prompt is {n_prompt} tokens; the model's context is {self.context} tokens")
        return min(self.context, n_prompt + max(p.max_tokens for p in params))

    @torch.inference_mode()
    def prefill(self, inputs: dict, params: list[SamplingParams], session: Session | None = None,
                prefix: PrefixCache | None = None):
        """Run the prompt (minus what the session or prefix cache holds) -> (cache, last hidden
        [B, hidden], cached)."""
        steps = self.prefill_steps(inputs, params, session, prefix=prefix)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def prefill_steps(self, inputs: dict, params: list[SamplingParams], session: Session | None = None,
                      max_len: int | None = None, embeds: torch.Tensor | None = None,
                      prefix: PrefixCache | None = None, adapter: tuple | None = None):
        """`prefill` one chunk per `next()` (the scheduler interleaves chunks with decode steps);
        returns what `prefill` returns. max_len: the cache's size (default: prompt + max_tokens).
        embeds [B, S, hidden]: the prompt's input embeddings when the caller has them already.
        prefix: a prefix cache to restore the longest cached prefix from and to keep this prompt
        in (one conversation without a session; a session reuses its own cache). adapter: the
        LoRA adapter's tag the prompt runs under (lora/layer.py `Selection.tag`; the caller
        selects it): the cached K/V it reuses and leaves are keyed by it (`prompt_keys`)."""
        m = self.model
        inputs = ModelInputs.coerce(inputs)
        ids = inputs["input_ids"].to(m.device)
        B, S = ids.shape
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(m.device)
        types = inputs.get("mm_token_type_ids")
        max_len = max_len or self._check_length(S, params)
        cached = 0
        if session is not None:
            if B != 1:
                raise InputError("a chat session holds one conversation")
            keys = prompt_keys(inputs, self.media_ids, adapter)
            if (session.cache is not None and not session.cache.broken
                    and session.cache.layer_dtypes == self.layer_dtypes):
                common = 0
                for a, b in zip(session.keys, keys):
                    if a != b:
                        break
                    common += 1
                common = min(common, S - 1)  # the last prompt token is always run: its logits start the reply
                back = session.cache.length - common
                if session.cache.can_trim(back):
                    session.cache.trim(back)
                    session.cache.grow(max_len)
                    cached = common
            if cached == 0:
                session.cache = self.make_cache(1, max_len)
            cache = session.cache
            session.keys = keys[:cached]  # extended below once the prefill succeeded
        else:
            cache = self.make_cache(B, max_len)
        record, split = None, 0
        # (precomputed embeds come without their media: placeholder keys would lack the digests)
        if prefix is not None and session is None and embeds is None and B == 1 and bool(mask.all()):
            keys = prompt_keys(inputs, self.media_ids, adapter)
            vision = None if types is None else torch.isin(types[0], torch.tensor(VISION_TYPES, device=types.device)).tolist()
            hit = prefix.lookup(keys, vision, S - 1)  # the last prompt token is always run
            if hit.length:
                prefix.restore(hit, cache)
                cached = hit.length
            record = prefix.recorder(hit)
            split = hit.shared  # a snapshot where this prompt parts from the cached ones
        media = inputs.media()
        placeholders = torch.tensor([t for t in self.media_ids.values() if t is not None], dtype=torch.long,
                                    device=ids.device)
        if embeds is None and (media or bool(torch.isin(ids, placeholders).any())):
            # Media encoders see each image, frame or clip whole: embedded once for the whole
            # prompt, chunks take slices ([S, hidden]: this part grows with the prompt).
            with torch.inference_mode():
                embeds = m.embed(ids, **media)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        h = None
        bounds = inputs.chunks(cached, self.chunk_size)
        if split > cached:
            bounds = chunk_bounds(types, cached, split, self.chunk_size) + inputs.chunks(split, self.chunk_size)
        for a, b in bounds:
            with torch.inference_mode():
                # Text alone is embedded chunk by chunk: a token's row of the table is all it
                # needs, and a whole prompt's embeddings would grow with it (0.9 GiB for 128K
                # tokens of the 12B).
                e = m.embed(ids[:, a:b]) if embeds is None else embeds[:, a:b]
                h = m(ids[:, a:b], positions[:, a:b], attention_mask=mask[:, a:b], embeds=e,
                      mm_token_type_ids=None if types is None else types[:, a:b].to(m.device), cache=cache)
            if record is not None:  # a restore point at each chunk bound
                record.snapshot(cache, b)
            if b < S:
                yield
        if session is not None:
            session.keys = keys
        if record is not None:
            prefix.insert(keys, cache, record)
        return cache, h[:, -1], cached

    @torch.inference_mode()
    def split_rows(self, inputs: dict) -> list[tuple[dict, torch.Tensor]]:
        """A left-padded batch of conversations -> per conversation its unpadded inputs and
        input embeddings [1, S_r, hidden] (the batch's media are embedded once, together)."""
        m = self.model
        inputs = ModelInputs.coerce(inputs)
        ids = inputs["input_ids"].to(m.device)
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(m.device)
        types = inputs.get("mm_token_type_ids")
        embeds = m.embed(ids, **inputs.media())
        rows = []
        for r in range(ids.shape[0]):
            real = mask[r].bool()
            row = {"input_ids": ids[r][real][None]}
            if types is not None:
                row["mm_token_type_ids"] = types[r].to(m.device)[real][None]
            rows.append((row, embeds[r][real][None]))
        return rows

    # -- generation: submit to a scheduler of this call's own, step it here -------------------
    def scheduler(self, rows: int, max_len: int):
        """A decode batch for one call: `rows` conversations of up to `max_len` tokens each."""
        from .scheduler import Scheduler  # the scheduler builds on the engine: imported late

        return Scheduler(self, max_seqs=rows, max_len=max_len, max_queue=rows, reserve=self.reserve)

    def stream(self, inputs: dict, params: SamplingParams | None = None,
               session: Session | None = None) -> Iterator[Delta]:
        """Deltas of one conversation's reply as they are sampled; the last has finish_reason and timings."""
        if inputs["input_ids"].shape[0] != 1:
            raise InputError("stream() takes one conversation; use generate_batch for several")
        p = params or SamplingParams()
        s = self.scheduler(1, self._check_length(inputs["input_ids"].shape[1], [p]))
        yield from s.drive(s.submit(inputs, p, session=session))

    def generate(self, inputs: dict, params: SamplingParams | None = None, session: Session | None = None) -> Completion:
        return collect(self.stream(inputs, params, session))

    def generate_batch(self, inputs: dict, params: SamplingParams | list[SamplingParams] | None = None
                       ) -> list[Completion]:
        """Several (left-padded) conversations decoded together, each with its own parameters;
        each reply is the one the conversation gets alone."""
        B = inputs["input_ids"].shape[0]
        params = params if isinstance(params, list) else [params or SamplingParams()] * B
        if len(params) != B:
            raise InputError(f"{len(params)} sampling parameter sets for {B} conversations")
        rows = self.split_rows(inputs)
        max_len = max(self._check_length(row["input_ids"].shape[1], [p]) for (row, _), p in zip(rows, params))
        s = self.scheduler(B, max_len)
        requests = [s.submit(row, p, embeds=e) for (row, e), p in zip(rows, params)]
        s.run_until_done()
        return [r.result() for r in requests]
