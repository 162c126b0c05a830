"""Running the app under uvicorn, with a shutdown that finishes or cancels requests cleanly.

On SIGTERM or Ctrl-C uvicorn stops accepting connections and waits for open ones. Before that wait,
the engine drains: new requests get 503, running ones have ``shutdown_grace`` seconds to finish, and
the rest are cancelled (a stream gets an in-band error event and ``data: [DONE]``, a plain request a
503), so the wait ends promptly and no cache block is left held. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

log = logging.getLogger("coscale.serve")


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the engine between closing the listeners and waiting for requests."""

    def __init__(self, config: uvicorn.Config, engine, shutdown_grace: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_grace = engine, shutdown_grace

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:  # stop accepting first; uvicorn's own shutdown repeats this harmlessly
            server.close()
        if self.engine.running_requests:
            log.info("shutting down: %d request(s) running, %.0f s to finish", self.engine.running_requests,
                     self.shutdown_grace)
        drain = asyncio.ensure_future(self.engine.shutdown(self.shutdown_grace))
        while not drain.done():
            if self.force_exit:  # a second Ctrl-C: cancel now instead of waiting out the grace period
                self.engine.cancel_all()
            await asyncio.wait({drain}, timeout=0.1)
        drain.result()
        await super().shutdown(sockets)


def make_server(app, host: str = "127.0.0.1", port: int = 8000, *, shutdown_grace: float = 30.0,
                log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for an app from ``build_app``; ``run()`` blocks, ``serve()`` is the coroutine."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_grace + 10.0)
    return _DrainingServer(config, app.state.server.engine, shutdown_grace)
