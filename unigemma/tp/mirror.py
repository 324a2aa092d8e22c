"""Rank 0 drives the other ranks: each top-level call on the sharded model or a KV cache is sent, then run everywhere.

    rank 0:  Leader(group, {"model": model, "text": model.text}).wrap(model, "forward", ...)
             ... the engine, scheduler, sampler and server run as on one process ...
    others:  follow(group, {"model": model, "text": model.text})   # until rank 0 says stop

Every rank holds the same module tree with 1/N of the weights and K/V (tp/shard.py); the
forwards' collectives (all_reduce, gather) line up only if every rank makes the same calls on
the same state. So the entry points that reach sharded state are mirrored: on rank 0 a call to
`model.forward` / `model.embed` / `model.head` / `model.text.embed` (the drafter's lookup) and
every mutating method of a KV cache (cache/kv.py, cache/batch.py mark them `@mirrored`, and
their constructor) first broadcasts (target, method, arguments), then runs; the other ranks
run the same call on their own copies. Caches are named by an id: rank 0's cache object and
the others' twins stay in step, and a twin is dropped once rank 0's cache is garbage. Calls
made inside a mirrored call are not sent again (the others make them too). Sampling, text,
scheduling and HTTP never leave rank 0; only their model calls do.

A failed collective (tp/group.py `RankLost`) fails the call that met it, so the requests in
that step fail with an error; then rank 0 exits non-zero after `grace_s` (a rank is gone: the
model can no longer run), and the other ranks leave their loop. While rank 0 is idle it sends a
heartbeat, so waiting ranks never hit the group's timeout and a dead rank is noticed.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from .group import Group, RankLost

log = logging.getLogger("unigemma.tp")

_LEADER: "Leader | None" = None  # set in the rank-0 process while it drives a group


@dataclass(frozen=True)
class Ref:
    """A cache named across ranks."""
    id: int


def mirrored(method):
    """Mark a KV-cache method (or `__init__`) as one rank 0 sends to the other ranks before it
    runs (a no-op outside a tensor-parallel leader)."""
    name = method.__name__

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        leader = _LEADER
        if leader is None:
            return method(self, *args, **kwargs)
        if name == "__init__":
            method(self, *args, **kwargs)
            leader.register(self, args, kwargs)
            return None
        return leader.call(self, name, functools.partial(method, self), args, kwargs)
    return run


def _encode(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if hasattr(x, "_tp_id"):
        return Ref(x._tp_id)
    if isinstance(x, (list, tuple)):
        return type(x)(_encode(v) for v in x)
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    return x


def _decode(x, caches: dict, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Ref):
        return caches[x.id]
    if isinstance(x, (list, tuple)):
        return type(x)(_decode(v, caches, device) for v in x)
    if isinstance(x, dict):
        return {k: _decode(v, caches, device) for k, v in x.items()}
    return x


class Leader:
    """Rank 0's side. `after[name](obj, args, kwargs, result)` post-processes a top-level call
    on every rank alike (a cache's `kv_for` gathers its heads for the drafter)."""

    HEARTBEAT_FRACTION = 0.25  # of the group's timeout: idle rank 0 pings this often

    def __init__(self, group: Group, targets: dict[str, object], after: dict[str, Callable] | None = None,
                 grace_s: float | None = 2.0):
        """grace_s: after a lost rank, seconds before this process exits (with status 1) so the
        failed requests' errors reach their clients; None: never exit (the caller handles it)."""
        global _LEADER
        if _LEADER is not None:
            raise RuntimeError("this process already leads a tensor-parallel group")
        self.group, self.after, self.grace_s = group, after or {}, grace_s
        self.names = {id(obj): name for name, obj in targets.items()}
        self.lock = threading.RLock()
        self.depth = 0  # > 0 inside a mirrored call: nested calls are not sent
        self.ids = itertools.count()
        self.dropped: list[int] = []
        self.last_sent = time.monotonic()
        self.closed = False
        _LEADER = self
        threading.Thread(target=self._heartbeat, name="unigemma-tp-heartbeat", daemon=True).start()
        threading.Thread(target=self._watch, name="unigemma-tp-watch", daemon=True).start()
        atexit.register(self.close)

    def wrap(self, obj, name: str) -> None:
        """Mirror `obj.name(...)` from now on (an instance attribute over the class's method)."""
        fn = getattr(obj, name)
        setattr(obj, name, lambda *args, **kwargs: self.call(obj, name, fn, args, kwargs))

    def _ref(self, obj):
        if id(obj) in self.names:
            return self.names[id(obj)]
        if hasattr(obj, "_tp_id"):
            return Ref(obj._tp_id)
        raise RuntimeError(f"tensor parallelism: a {type(obj).__name__} made outside the group's view is used")

    def _send(self, message: tuple) -> None:
        dropped = []
        while self.dropped:  # (pop is atomic: a finalizer may append meanwhile, from any thread)
            dropped.append(self.dropped.pop())
        self.group.broadcast((dropped, message))
        self.last_sent = time.monotonic()

    def register(self, cache, args, kwargs) -> None:
        """A new cache: the other ranks build its twin with the same arguments."""
        with self.lock:
            if self.depth:  # made inside a mirrored call: every rank makes its own, unnamed
                return
            cid = next(self.ids)
            cls = type(cache)
            self._send(("new", cid, cls.__module__, cls.__qualname__, _encode(args), _encode(kwargs)))
            cache._tp_id = cid
            weakref.finalize(cache, self.dropped.append, cid)

    def call(self, obj, name: str, fn, args: tuple, kwargs: dict):
        with self.lock:
            top = self.depth == 0
            if top:
                self._send(("call", self._ref(obj), name, _encode(args), _encode(kwargs)))
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
                post = self.after.get(name) if top else None
                return post(obj, args, kwargs, out) if post is not None else out
            finally:
                self.depth -= 1

    def close(self) -> None:
        """Tell the other ranks to leave their loop (at exit, or before leading another group)."""
        global _LEADER
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if not self.group.lost.is_set():
                try:
                    self._send(("stop",))
                except RankLost:
                    pass
            if _LEADER is self:
                _LEADER = None

    def _heartbeat(self) -> None:
        every = self.group.timeout_s * self.HEARTBEAT_FRACTION
        while not self.closed and not self.group.lost.is_set():
            time.sleep(min(every, 1.0))
            with self.lock:
                if self.closed or time.monotonic() - self.last_sent < every:
                    continue
                try:
                    self._send(("ping",))
                except RankLost:
                    return

    def _watch(self) -> None:
        self.group.lost.wait()
        if self.closed or self.grace_s is None:
            return
        log.error("tensor parallelism: a rank was lost; failing requests and exiting in %.1f s", self.grace_s)
        time.sleep(self.grace_s)
        os._exit(1)  # noqa: SLF001 (threads hold the model; nothing can run any more)


def follow(group: Group, targets: dict[str, object], after: dict[str, Callable] | None = None) -> int:
    """A non-zero rank's loop: run what rank 0 sends until it says stop (0) or is lost (1)."""
    after = after or {}
    caches: dict[int, object] = {}
    with torch.inference_mode():
        while True:
            try:
                dropped, message = group.broadcast()
            except RankLost as e:
                log.error("%s", e)
                return 1
            for cid in dropped:
                caches.pop(cid, None)
            kind = message[0]
            if kind == "stop":
                return 0
            if kind == "ping":
                continue
            try:
                if kind == "new":
                    _, cid, module, qualname, args, kwargs = message
                    cls = functools.reduce(getattr, qualname.split("."), __import__(module, fromlist=["_"]))
                    caches[cid] = cls(*_decode(args, caches, group.device), **_decode(kwargs, caches, group.device))
                    continue
                _, ref, name, args, kwargs = message
                obj = targets[ref] if isinstance(ref, str) else caches[ref.id]
                args, kwargs = _decode(args, caches, group.device), _decode(kwargs, caches, group.device)
                out = getattr(obj, name)(*args, **kwargs)
                if name in after:
                    after[name](obj, args, kwargs, out)
            except RankLost as e:
                log.error("%s", e)
                return 1
            except Exception as e:  # noqa: BLE001 rank 0's same call raised the same error (a bad input): it fails there
                log.debug("rank %d: %s.%s raised %r (as rank 0's did)", group.rank, message[1], message[2], e)


def leader() -> Leader | None:
    return _LEADER


__all__ = ["Leader", "Ref", "follow", "leader", "mirrored"]
