"""POST /v1/completions: plain prompts (text or token ids), `echo`, `suffix`, logprobs.

`prompt` is a string, a list of strings, a list of token ids or a list of such lists (1 to 16
prompts x n); every id must be in the vocabulary (400 naming prompt). `suffix` asks for the text
between prompt and suffix: fill-in-the-middle, built with the vocabulary's FIM tokens
(`<|fim_prefix|>`, `<|fim_suffix|>`, `<|fim_middle|>`, CodeGemma's); a vocabulary without them
(Gemma 3, Gemma 4) cannot insert, so 400. `echo` puts the prompt's text before each choice's
completion, and with `logprobs` its tokens' logprobs too (the first token's null), scored by one
forward over the prompt on the scheduler's thread (generate/score.py). `max_tokens: 0` is allowed
with echo alone: scoring without generating, as lm-eval-harness asks for log-likelihoods.
"""

from __future__ import annotations

import asyncio

from fastapi import Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from ..generate.score import PromptScorer
from . import convert, respond
from .chat_plan import client_data, tensor
from .limits import Closing
from .schema import CompletionRequest

FIM = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
MAX_PROMPTS = 16  # prompts x n per request: each is one more request through the batcher


def fim_ids(tokenizer) -> tuple[int, int, int] | None:
    """The vocabulary's fill-in-the-middle tokens, or None when it has none."""
    ids = tuple(tokenizer.token_to_id(t) for t in FIM)
    return None if None in ids else ids


def _prompts(prompt) -> list:
    """The request's prompts: each a str or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def _check_ids(ids: list[int], vocab: int, where: str) -> list[int]:
    if not ids:
        raise InputError(f"{where}: empty prompt")
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise InputError(f"{where}: token id {bad} is outside the vocabulary (0..{vocab - 1})")
    return ids


def _encode(tokenizer, prompt: str | list[int], suffix: str | None, fim, vocab: int, where: str) -> list[int]:
    if suffix is None:
        return _check_ids(tokenizer.encode(prompt) if isinstance(prompt, str) else prompt, vocab, where)
    pre, suf, mid = fim
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    body = tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
    return _check_ids(head + [pre] + body + [suf] + tokenizer.encode(suffix, add_special_tokens=False) + [mid],
                      vocab, where)


def echo_logprobs(tokenizer, ids: list[int], entries: list[dict | None], added_bos: bool) -> dict:
    """The prompt's part of a choice's `logprobs` (OpenAI's completions shape). A `<bos>` the
    tokenizer added is listed (its logprob null) but takes no room in the echoed text."""
    def text(i: int) -> str:
        return tokenizer.token_bytes(i).decode("utf-8", "replace")

    tokens, offsets, pos = [], [], 0
    for j, i in enumerate(ids):
        piece = text(i)
        tokens.append(piece)
        offsets.append(pos)
        if not (added_bos and j == 0):
            pos += len(piece)
    return {"tokens": tokens, "text_offset": offsets,
            "token_logprobs": [None if e is None else convert.finite(e["logprob"]) for e in entries],
            "top_logprobs": [None if e is None else {text(t): convert.finite(lp) for t, lp in e["top"]}
                             for e in entries]}


def register(app: FastAPI) -> None:
    served = app.state.served
    gemma, config, meter = served.gemma, served.config, served.meter
    tokenizer = gemma.tokenizer
    vocab = min(tokenizer.vocab_size, gemma.config.text.vocab_size)

    @app.post("/v1/completions", dependencies=[Depends(served.auth)])
    async def completions(body: CompletionRequest, request: Request):
        model = served.check_model(body.model)
        prompts = _prompts(body.prompt)
        if not prompts or len(prompts) * body.n > MAX_PROMPTS:
            raise InputError(f"prompt: 1 to {MAX_PROMPTS} prompts × n")
        if body.max_tokens == 0 and not body.echo:
            raise InputError("max_tokens: 0 only with echo (scoring the prompt); at least 1 otherwise")
        fim = None
        if body.suffix is not None:
            fim = fim_ids(tokenizer)
            if fim is None:
                raise InputError("suffix: this model cannot insert (its vocabulary has no fill-in-the-middle "
                                 "tokens); send the prompt alone")
            if body.echo:
                raise InputError("suffix: not with echo")
        where = lambda k: "prompt" if len(prompts) == 1 else f"prompt[{k}]"  # noqa: E731
        ids = [await run_in_threadpool(client_data, where(k), _encode, tokenizer, p, body.suffix, fim, vocab, where(k))
               for k, p in enumerate(prompts)]
        for k, x in enumerate(ids):
            if len(x) >= served.scheduler.max_len:
                raise InputError(f"{where(k)}: the prompt is {len(x)} tokens; this server's context holds "
                                 f"{served.scheduler.max_len} (prompt + reply)")
        # every check before any work: the parameters too, though only a generation uses them
        params = ([convert.params(body, gemma.default_params, i, config.max_tokens_default) for i in range(body.n)]
                  if body.max_tokens != 0 else None)
        if meter.closing:
            raise Closing("the server is shutting down; try again later")
        echoes = None
        if body.echo:
            echoes = []
            for p, x in zip(prompts, ids):
                text = p if isinstance(p, str) else tokenizer.decode(x)
                lp = None
                if body.logprobs is not None:
                    scorer = PromptScorer(gemma.engine.model, x, body.logprobs, gemma.engine.prefill_chunk)
                    adapter = model if model in served.adapters else None
                    while not await asyncio.wrap_future(served.scheduler.call(scorer.step, adapter=adapter)):
                        pass  # one chunk per call: running streams wait a chunk at a time, as for a prefill
                    lp = echo_logprobs(tokenizer, x, scorer.entries, isinstance(p, str) and x[0] == tokenizer.bos_id)
                echoes += [(text, lp)] * body.n
        requests = []
        if params is not None:
            try:
                for x in ids:
                    requests += served.submit({"input_ids": tensor(x)}, params, [None] * body.n, model)
            except Exception:
                for r in requests:
                    r.cancel()
                raise
        prompt_tokens = sum(len(x) for x in ids)
        prompt_ids = [x for x in ids for _ in range(body.n)] if body.return_token_ids else None
        return await respond.completion(request, requests, body, model, tokenizer, meter, prompt_tokens, echoes,
                                        prompt_ids)
