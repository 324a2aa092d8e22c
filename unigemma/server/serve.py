"""Running the app under uvicorn with a bounded shutdown.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the open ones. A
generation can run for minutes (75 s was seen at max_tokens 1500), so the wait is bounded:
after `grace` seconds every reply still in progress is ended by the server (a stream gets an
error event, `server_shutting_down`, then `[DONE]`; a whole reply a 503 error body), their
rows are freed, and the process exits. New generations are refused with 503 from the start
of the shutdown. uvicorn's own cut (it cancels the tasks) is kept one second later as a
backstop, for a request still converting its media when the grace ends.

    serve(create_app(gemma, config), "127.0.0.1", 8000, shutdown_timeout=5)
"""

from __future__ import annotations

import asyncio

import uvicorn

BACKSTOP = 1.0  # seconds after the grace before uvicorn cancels what is left


class Server(uvicorn.Server):
    """uvicorn.Server whose shutdown ends replies still running after `grace` seconds."""

    def __init__(self, config: uvicorn.Config, grace: float, meter):
        super().__init__(config)
        self.grace, self.meter = grace, meter

    async def shutdown(self, sockets=None) -> None:
        self.meter.closing = True
        cut = asyncio.get_running_loop().call_later(self.grace, self.meter.end_all)
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()


def make_server(app, host: str, port: int, shutdown_timeout: float = 5.0, log_level: str = "warning") -> Server:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + BACKSTOP)
    return Server(config, shutdown_timeout, app.state.meter)


def serve(app, host: str, port: int, shutdown_timeout: float = 5.0, log_level: str = "warning") -> None:
    try:
        make_server(app, host, port, shutdown_timeout, log_level).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its shutdown: nothing left to report
        pass
