"""The bridge between asyncio request handlers and the synchronous, single-threaded Engine.

The Engine (``coscale.infer.engine``) is not thread-safe, so exactly one thread touches it: the loop
here, which applies queued commands (add a request, abort one, stop), calls ``step()`` while
``has_unfinished()`` and hands each step's outputs to the event loop in one ``call_soon_threadsafe``.
Handlers never wait on the engine: they await their own :class:`RequestStream` queue.

Admission is acknowledged: :meth:`AsyncEngine.generate` returns only after the engine thread has
called ``add_request``, so a request the engine refuses (ConfigError: too long, ids out of range) is
reported before an HTTP response has started. An abort (client gone, stop string seen) frees the
request's cache blocks at the engine's next command pass, at most one step later. A step that raises
leaves the engine in an unknown state: every open request fails and the engine is marked dead
(``/health`` then answers 503) instead of serving wrong results.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence

from coscale.errors import ConfigError

log = logging.getLogger("coscale.serve")


class EngineUnavailable(Exception):
    """The engine takes no new requests: it is shutting down or a step failed."""


class RequestAborted(Exception):
    """A request ended early: the engine aborted it, or the server cancelled it at shutdown."""


class RequestStream:
    """The outputs of one request, as an async iterator of the engine's RequestOutput objects.

    Ends after the output with ``finished`` set; raises :class:`RequestAborted` when the request was
    cancelled or aborted, and the engine's ConfigError when it refused the request.
    """

    def __init__(self, request_id: str, owner: AsyncEngine) -> None:
        self.request_id, self._owner = request_id, owner
        self._queue: asyncio.Queue = asyncio.Queue()
        self.accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
            if item.finish_reason == "abort":
                raise RequestAborted("the engine aborted the request")
        return item

    def abort(self) -> None:
        """Stop generating and free the request's cache blocks (no-op once finished)."""
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)

    def _put(self, item) -> None:
        self._queue.put_nowait(item)


class AsyncEngine:
    """Runs an Engine on a background thread; ``generate`` / ``abort`` / ``stats`` / ``shutdown`` from asyncio."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.max_model_len: int = engine.max_model_len
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # touched on the event loop only
        self._stats = engine.stats()  # replaced (never mutated) by the engine thread after each pass
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # the exception that killed the engine thread
        self.accepting = True

    # ---- event-loop side ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="coscale-engine", daemon=True)
            self._thread.start()

    @property
    def running_requests(self) -> int:
        return len(self._streams)

    def stats(self):
        """The EngineStats after the engine thread's latest pass."""
        return self._stats

    async def generate(self, request_id: str, prompt_ids: Sequence[int], params) -> RequestStream:
        """Submit a request; returns once the engine has accepted it (raises its ConfigError otherwise)."""
        self.start()
        if not self.accepting or self.error is not None:
            raise EngineUnavailable("the server is shutting down" if self.error is None
                                    else f"the engine failed: {self.error}")
        if request_id in self._streams:
            raise ConfigError(f"request id {request_id!r} is already running")
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, list(prompt_ids), params))
        try:
            await stream.accepted
        except BaseException:
            self.abort(request_id)  # cancelled while waiting: the engine may have admitted it already
            raise
        return stream

    def abort(self, request_id: str, reason: str = "the request was aborted") -> None:
        """Free a request's cache blocks at the engine's next pass and end its stream (which raises
        RequestAborted(reason) to whoever still reads it). Never blocks; a finished id is a no-op."""
        self._commands.put(("abort", request_id))
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._put(RequestAborted(reason))

    async def shutdown(self, grace: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for up to ``grace`` seconds, cancel the rest
        (their streams raise RequestAborted), then stop the engine thread."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(grace, 0.0)
        while self._streams and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.cancel_all()
        if self._thread is not None:
            self._commands.put(("stop",))
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def cancel_all(self, reason: str = "the server is shutting down; the request was cancelled") -> None:
        """Abort every running request now (their streams raise RequestAborted(reason))."""
        for request_id in list(self._streams):
            log.info("cancelling request %s", request_id)
            self.abort(request_id, reason)

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def _on_outputs(self, outputs: list) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted or cancelled on this side already
                continue
            stream._put(output)
            if output.finished:
                self._forget(output.request_id)

    def _on_admitted(self, request_id: str, error: BaseException | None) -> None:
        stream = self._streams.get(request_id)
        if stream is None or stream.accepted.done():
            return
        if error is None:
            stream.accepted.set_result(None)
        else:
            self._forget(request_id)
            stream.accepted.set_exception(error)

    def _on_engine_failed(self, error: BaseException) -> None:
        self.error = error
        for request_id, stream in list(self._streams.items()):
            self._forget(request_id)
            failure = EngineUnavailable(f"the engine failed: {error}")
            if not stream.accepted.done():
                stream.accepted.set_exception(failure)
            stream._put(failure)

    # ---- engine-thread side --------------------------------------------------------------------

    def _call_soon(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop has closed: nobody is left to tell
            pass

    def _run(self) -> None:
        engine = self.engine
        try:
            while self._apply_commands(block=not engine.has_unfinished()):
                if engine.has_unfinished():
                    outputs = engine.step()
                    if outputs:
                        self._call_soon(self._on_outputs, outputs)
                self._stats = engine.stats()
        except Exception as e:  # a bug in the engine: fail loudly, keep the server answering
            log.exception("the engine thread failed")
            self._call_soon(self._on_engine_failed, e)

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one when ``block``); False once told to stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self.engine.abort(command[1])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                self._stats = self.engine.stats()
                return True

    def _add(self, request_id: str, prompt_ids: list[int], params) -> None:
        try:
            self.engine.add_request(request_id, prompt_ids, params)
        except Exception as e:  # ConfigError: refused (HTTP 400); anything else reaches the client as 500
            if not isinstance(e, ConfigError):
                log.exception("add_request failed for %s", request_id)
            self._call_soon(self._on_admitted, request_id, e)
        else:
            self._call_soon(self._on_admitted, request_id, None)
