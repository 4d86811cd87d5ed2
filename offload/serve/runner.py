"""Running the app under uvicorn, with a drain that ends requests cleanly on SIGTERM.

uvicorn's own drain waits for connections and, when time runs out, cancels their tasks mid-response
(tracebacks in the log, streams cut without a last chunk). Here the drain ends by stopping generation
instead: each open request gets a final 503 error (streams: an error chunk and [DONE]) and closes.
"""
from __future__ import annotations

import asyncio
import signal
import socket

import uvicorn
from fastapi import FastAPI

from offload.serve.server import Server

SHUTDOWN_GRACE = 5.0  # seconds after the drain for the last responses to go out before uvicorn's cancel


def run(app: FastAPI, server: Server, sock: socket.socket, drain: float, log_level: str) -> None:
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain + SHUTDOWN_GRACE)
    # uvicorn re-raises SIGTERM once its shutdown is done; by then the exit is clean and should be status 0
    signal.signal(signal.SIGTERM, _after_drain)
    _DrainingServer(config, server, drain).run(sockets=[sock])


def _after_drain(signum: int, frame) -> None:
    """SIGTERM as re-raised by uvicorn after the shutdown: nothing is left to do, run() returns."""


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, server: Server, drain: float) -> None:
        super().__init__(config)
        self.app_server, self.drain = server, drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain, self.app_server.batcher.stop)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
