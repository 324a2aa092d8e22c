"""The tensor-parallel process group and its collectives, each turning a lost peer into `RankLost`.

    group = init_group(2)            # under torchrun: RANK / WORLD_SIZE / MASTER_ADDR from the env
    group.all_reduce(x)              # sum over ranks, in place (after a row-parallel layer)
    group.gather_last(x)             # rank 0: the ranks' slices side by side on the last dim
    group.broadcast(obj)             # rank 0 → every rank (a step's message: tp/mirror.py)
    exit_rank(code)                  # the end of a rank's process (not sys.exit: see there)

gloo on CPU, NCCL on GPUs (one GPU per rank: cuda:LOCAL_RANK). The group is made with a timeout,
so a peer that hangs fails the others' collectives within it rather than never; a peer that dies
closes its sockets and fails them at once. Either way the collective raises `RankLost` and the
group is marked lost: later calls raise at once, never wait. This file knows no model.

Plain eager c10d calls, not DTensor / `parallelize_module` or functional collectives: the shards
are ordinary tensors of the loader's modules (oneDNN-packed weights are opaque tensors DTensor
cannot wrap), the model needs only these four calls, and an in-place all_reduce measured 1.8 ms
against the functional all_reduce's 3.3 ms here (gloo, 1536 bf16 values, a loaded 2-core box).
"""

from __future__ import annotations

import atexit
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from ..errors import UnigemmaError

MESSAGE_BYTES = 1 << 16  # rank 0's messages up to this size (pickled) take one collective
TIMEOUT_S = 60.0  # how long a collective waits for a peer that neither answers nor hangs up


class RankLost(UnigemmaError):
    """A collective failed: a rank died, hung past the timeout, or the group is already lost."""


@dataclass
class Group:
    rank: int
    world: int
    device: torch.device
    timeout_s: float = TIMEOUT_S
    lost: threading.Event = field(default_factory=threading.Event)  # set once: a peer is gone
    calls: int = 0  # collectives run, and the seconds spent in them (waiting for peers included)
    seconds: float = 0.0

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _run(self, what: str, fn, *args):
        if self.lost.is_set():
            raise RankLost(f"tensor parallelism: the process group was lost before this {what}")
        t = time.perf_counter()
        try:
            return fn(*args)
        except (RuntimeError, ValueError, ConnectionError) as e:  # gloo / NCCL report peers as RuntimeError
            self.lost.set()
            raise RankLost(f"tensor parallelism: {what} failed on rank {self.rank} (a rank died or hung "
                           f"past {self.timeout_s:g} s): {e}") from e
        finally:
            self.calls, self.seconds = self.calls + 1, self.seconds + time.perf_counter() - t

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        self._run("all_reduce", dist.all_reduce, x)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim`, on every rank."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._run("all_gather", dist.all_gather, parts, x)
        return torch.cat(parts, dim)

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0: the ranks' `x` concatenated on the last dim; other ranks: their own `x`."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)] if self.is_leader else None
        self._run("gather", dist.gather, x, parts, 0)
        return torch.cat(parts, -1) if self.is_leader else x

    def broadcast(self, obj=None):
        """Rank 0 sends `obj` (any picklable object); every rank returns it. One collective of
        MESSAGE_BYTES carries the pickle's length and, whole, a small message (a decode step's);
        the rest of a longer one (a prefill chunk's embeddings) follows in a second.
        (broadcast_object_list always takes two: the size, then the bytes.) Pickled as
        broadcast_object_list does: the peers are this group's own processes."""
        room = MESSAGE_BYTES - 8
        head, data = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8), b""
        if self.is_leader:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            head[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
            head[8:8 + min(len(data), room)] = torch.frombuffer(bytearray(data[:room]), dtype=torch.uint8)
        head = self._broadcast_bytes(head)
        n = int(head[:8].view(torch.int64))
        rest = None
        if n > room:
            rest = self._broadcast_bytes(torch.frombuffer(bytearray(data[room:]), dtype=torch.uint8) if self.is_leader
                                         else torch.empty(n - room, dtype=torch.uint8))
        if self.is_leader:
            return obj
        data = head[8:8 + min(n, room)].numpy().tobytes() + (b"" if rest is None else rest.numpy().tobytes())
        return pickle.loads(data)

    def _broadcast_bytes(self, buf: torch.Tensor) -> torch.Tensor:
        """A uint8 buffer from rank 0 to every rank (through the GPU under NCCL)."""
        on = buf.to(self.device)
        self._run("broadcast", dist.broadcast, on, 0)
        return on.cpu()


def init_group(world: int, timeout_s: float = TIMEOUT_S, device: str | None = None) -> Group:
    """Join the group torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT) started; its size must be `world`. device: "cpu" (gloo) or "cuda" (NCCL);
    default cuda when this machine has as many GPUs as local ranks need, else cpu."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    missing = [k for k, v in env.items() if v is None]
    if missing:
        raise UnigemmaError(f"--tp {world} runs one process per rank: start it with "
                            f"`torchrun --nproc-per-node {world} -m unigemma ...` (missing {', '.join(missing)})")
    if int(env["WORLD_SIZE"]) != world:
        raise UnigemmaError(f"--tp {world}, but the launcher started {env['WORLD_SIZE']} processes "
                            f"(torchrun --nproc-per-node {world})")
    local = int(os.environ.get("LOCAL_RANK", env["RANK"]))
    if device is None:
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > local else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Group(dist.get_rank(), dist.get_world_size(), dev, timeout_s)


def exit_rank(code: int) -> NoReturn:
    """End a process that joined a group: the exit handlers (rank 0's Leader.close tells the
    others to stop), flushed output, then os._exit(code), skipping the interpreter's finalization.

    Why not sys.exit: a gloo worker thread drops its hold on a finished collective's tensors a
    moment after the caller sees it done, and dropping a tensor Python made takes the GIL. When
    the main thread has meanwhile begun finalizing, Python ends the asking thread in the middle
    of that C++ destructor and the process aborts: "terminate called without an active
    exception", status -6. A core dump's stacks showed it; here 3 two-rank runs of
    tests/tp_rank.py in 40 ended so, 1 in 80 with destroy_process_group() first, none in 160
    this way. Once the peers are told, nothing left to finalize matters."""
    atexit._run_exitfuncs()  # (what sys.exit would run first, in the same order; logging's flush among them)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


__all__ = ["Group", "RankLost", "TIMEOUT_S", "exit_rank", "init_group"]
