"""glibc's malloc thresholds, set for a phase that frees many big buffers and restored after.

glibc serves allocations below its *dynamic* mmap threshold (which climbs to 32 MiB after the
first big free) from the heap and keeps them there when freed, so a phase that allocates and
frees many mid-size buffers (loading: one per weight; a training step: the activations that
checkpointing recomputes, the loss head's chunks) leaves the process holding dead memory. A fixed
low threshold maps such buffers and unmaps them on free. It must not stay: every activation
buffer of inference would then be a fresh mapping, page-faulted anew (prefill measured 40%
slower). Afterwards the thresholds go to where the dynamic scheme settles (32 MiB, trim at
64 MiB) and the heap is trimmed. A no-op off glibc.
"""

from __future__ import annotations

import contextlib
import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
SETTLED_MMAP, SETTLED_TRIM = 32 << 20, 64 << 20  # where glibc's dynamic thresholds end up


@contextlib.contextmanager
def freed_memory_returned(mmap_from: int, trim_from: int | None = None):
    """Within the block, buffers of `mmap_from` bytes and more are mapped (and unmapped when
    freed); `trim_from`: the heap is also trimmed above that much free memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, mmap_from)
        if trim_from is not None:
            libc.mallopt(M_TRIM_THRESHOLD, trim_from)
    except (OSError, AttributeError):
        libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP)
            libc.mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM)
            libc.malloc_trim(0)
