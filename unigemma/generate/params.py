"""Per-request sampling parameters: one validated, immutable object per request.

Bad values raise InputError naming the field, so the server can answer 400 before any work.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from ..errors import InputError

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows


# --- per-request parameters --------------------------------------------------------------
def _int(name, v, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise InputError(f"{name} must be an int, got {v!r}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise InputError(f"{name} must be in [{lo}, {'inf' if hi is None else hi}], got {v}")
    return v


def _float(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _seq(name, v, kind):
    """A list/tuple of ints or of strings, as a tuple (a lone string counts as one stop string)."""
    if kind is str and isinstance(v, str):
        v = (v,)
    if not isinstance(v, (list, tuple)):
        raise InputError(f"{name} must be a list of {kind.__name__}, got {v!r}")
    if kind is int:
        return tuple(_int(f"{name}[{i}]", x, lo=0) for i, x in enumerate(v))
    for i, x in enumerate(v):
        if not isinstance(x, str) or not x:
            raise InputError(f"{name}[{i}] must be a non-empty string, got {x!r}")
    return tuple(v)


def _bias(v) -> tuple[tuple[int, float], ...]:
    """logit_bias {token id (an int or its decimal string): bias in [-100, 100]} -> sorted pairs."""
    if isinstance(v, dict):
        v = list(v.items())
    if not isinstance(v, (list, tuple)):
        raise InputError(f"logit_bias must be a map of token id to bias, got {type(v).__name__}")
    if len(v) > MAX_LOGIT_BIAS:
        raise InputError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(v)}")
    out = {}
    for pair in v:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InputError(f"logit_bias entries must be (token id, bias) pairs, got {pair!r}")
        key, bias = pair
        if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 19:
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, numbers.Integral) or key < 0:
            raise InputError(f"logit_bias: {key!r} is not a token id")
        bias = _float(f"logit_bias[{key}]", bias)
        if not -100 <= bias <= 100:
            raise InputError(f"logit_bias[{key}] must be in [-100, 100], got {bias}")
        out[int(key)] = bias
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Validated on construction: bad values raise InputError."""
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy (argmax); the seed is then ignored
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # in (0, 1]; 1: off
    min_p: float = 0.0  # in [0, 1], relative to the most likely token's probability; 0: off
    repetition_penalty: float = 1.0  # > 0, CTRL/HF style over prompt + output tokens; 1: off
    presence_penalty: float = 0.0  # [-2, 2], OpenAI style over output tokens
    frequency_penalty: float = 0.0  # [-2, 2], OpenAI style over output tokens
    seed: int | None = None  # None: a fresh nondeterministic generator
    stop: tuple[str, ...] = ()  # stop strings (not part of the output)
    stop_token_ids: tuple[int, ...] = ()  # stop ids on top of the model's eos ids
    ignore_eos: bool = False  # the model's eos ids do not stop (stop_token_ids still do)
    suppress_tokens: tuple[int, ...] = ()  # never sampled
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token, 0..20; needs logprobs
    min_tokens: int = 0  # stop ids cannot be sampled before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit); a dict is accepted

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise in place)
        put("max_tokens", _int("max_tokens", self.max_tokens, lo=1))
        put("min_tokens", _int("min_tokens", self.min_tokens, lo=0, hi=self.max_tokens))
        put("top_k", _int("top_k", self.top_k, lo=0, hi=2**31 - 1))  # a device int; any k >= vocab keeps all
        put("top_logprobs", _int("top_logprobs", self.top_logprobs, lo=0, hi=MAX_TOP_LOGPROBS))
        for name, ok, rule in (("temperature", lambda v: v >= 0, ">= 0"),
                               ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
                               ("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
                               ("repetition_penalty", lambda v: v > 0, "> 0"),
                               ("presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]"),
                               ("frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")):
            v = _float(name, getattr(self, name))
            if not ok(v):
                raise InputError(f"{name} must be {rule}, got {getattr(self, name)!r}")
            put(name, v)
        if self.seed is not None:
            put("seed", _int("seed", self.seed, lo=0, hi=2**64 - 1))
        for name in ("logprobs", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.top_logprobs and not self.logprobs:
            raise InputError(f"top_logprobs={self.top_logprobs} needs logprobs=True")
        put("stop", _seq("stop", self.stop, str))
        put("stop_token_ids", _seq("stop_token_ids", self.stop_token_ids, int))
        put("suppress_tokens", _seq("suppress_tokens", self.suppress_tokens, int))
        put("logit_bias", _bias(self.logit_bias))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @classmethod
    def from_generation_config(cls, d: dict, **overrides) -> "SamplingParams":
        """Params from a checkpoint's generation_config.json; `overrides` win. As in
        transformers, do_sample absent or false means greedy; keys absent take this class's
        defaults (not transformers' implicit top_k=50)."""
        if not isinstance(d, dict):
            raise InputError(f"generation config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InputError(f"unknown sampling parameter {unknown[0]!r}")
        kw = {}
        for key, name in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                          ("min_p", "min_p"), ("repetition_penalty", "repetition_penalty"),
                          ("max_new_tokens", "max_tokens"), ("min_new_tokens", "min_tokens")):
            if d.get(key) is not None:
                kw[name] = d[key]
        if not d.get("do_sample", False):
            kw["temperature"] = 0.0
        if d.get("suppress_tokens"):
            kw["suppress_tokens"] = tuple(d["suppress_tokens"])
        eos = d.get("eos_token_id")
        if eos is not None and not overrides.get("ignore_eos", False):
            kw["stop_token_ids"] = (eos,) if isinstance(eos, numbers.Integral) else tuple(eos)
        return cls(**{**kw, **overrides})
