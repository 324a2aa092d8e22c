"""The decode step: a few new tokens per row through the model over its KV cache.

    h = decode_step(model, cache, tokens, positions)    # tokens, positions [B, S] -> [B, S, hidden]

Every forward after the prompt goes through here: a batch step (S = 1), a speculative verify
forward (S = k + 1), a request leaving speculation, the greedy oracle. It is the boundary a
compiler or CUDA graphs capture; `make_step(compile_step=True)` returns it under
`torch.compile` (dynamic shapes, so a growing cache does not recompile every step). The
caller takes the hidden states it needs (the last position's, or every verify position's)
and runs the head itself.

Owns no state and knows no family: `model(...)` is the protocol of models/ (new tokens appended
to `cache`, media already embedded at prefill).
"""

from __future__ import annotations

from typing import Callable

import torch

Step = Callable[..., torch.Tensor]


def decode_step(model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tokens, positions [B, S] (S >= 1, no media) appended to `cache` -> final hidden [B, S, hidden]."""
    return model(tokens, positions, cache=cache, require_media=False)


def make_step(compile_step: bool = False) -> Step:
    """The decode step, eager (the default) or compiled with Inductor. Compiled, it is captured
    whole (one graph, no break) over plain modules; the packed oneDNN linears of the CPU fast
    path (models/packed.py) have no Inductor lowering, so compile a model loaded with
    `fast=False` / `pack=False`. On the 2-core AVX512 test machine it was not faster
    (bench/compile_step.py: 0.82x the packed eager step, 0.69x the plain one, bf16), and in
    bf16 its fused kernels round differently from eager (float32: the same tokens)."""
    if not compile_step:
        return decode_step
    return torch.compile(decode_step, dynamic=True)


__all__ = ["decode_step", "make_step", "Step"]
