"""A small bounded pool for turning media requests into model inputs.

Decoding an image, a clip or a sound, or fetching a URL, can hold a thread for seconds. Run in
the shared worker pool that plain requests use, 45 slow media requests once made a plain chat
wait 17 s. Here they get `workers` threads of their own and at most `queue` more may wait; past
that the request is refused at once (QueueFull: a 429 with Retry-After), so a flood of media
costs the flooder, not the other clients. The threads are daemons: a decode still running
does not hold up the process's exit after a shutdown.
"""

from __future__ import annotations

import asyncio
import queue
import threading

from ..errors import QueueFull


class MediaPool:
    def __init__(self, workers: int = 2, queue_size: int = 8):
        self.workers = workers
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        for i in range(workers):
            threading.Thread(target=self._work, name=f"unigemma-media-{i}", daemon=True).start()

    async def run(self, fn, *args):
        """fn(*args) on a media thread; QueueFull at once when `workers + queue_size` are taken."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self.jobs.put_nowait((fn, args, future, loop))
        except queue.Full:
            raise QueueFull(f"{self.workers} media requests are being decoded and {self.jobs.maxsize} are waiting; "
                            "try again later") from None
        return await future

    def _work(self) -> None:
        while True:
            fn, args, future, loop = self.jobs.get()
            if future.cancelled():  # the request is gone (disconnect, shutdown): skip the work
                continue
            try:
                result, error = fn(*args), None
            except BaseException as e:  # noqa: BLE001 (handed to the request, which maps it to a status)
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop closed (server shut down)
                pass


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
