"""The OpenAI-compatible HTTP app: routes, server-sent events, errors.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streaming and not),
``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``, ``GET /metrics``. Built on Starlette
rather than FastAPI: requests are parsed by hand (protocol.parse_request) so that every malformed one gets
OpenAI's error body with a 400, where FastAPI's automatic validation answers 422 in its own shape.

One request may carry several prompts (``/v1/completions``); each becomes an engine request (a
"job") whose outputs turn into text through outputs.ChoiceText, and the jobs' pieces are merged into
one response. A streaming response is only started once the engine has accepted every job, so a
refused request is still a plain 400. A client that goes away has its jobs aborted at once by a
watcher task (their cache blocks are freed at the engine's next pass), streaming or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from coscale.errors import ConfigError
from coscale.serve import protocol as P
from coscale.serve.async_engine import AsyncEngine, EngineUnavailable, RequestAborted, RequestStream
from coscale.serve.metrics import RequestTimer, ServerMetrics
from coscale.serve.outputs import ChoiceText, Piece
from coscale.tokenizer import ChatTemplateError, Tokenizer

log = logging.getLogger("coscale.serve")
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Tokenizer
    model_name: str
    metrics: ServerMetrics
    created: int = field(default_factory=P.now)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise P.APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                             param="model", code="model_not_found")


@dataclass
class Job:
    """One prompt's engine request and the reply text it is growing."""

    stream: RequestStream
    text: ChoiceText
    prompt_tokens: int
    timer: RequestTimer


def build_app(engine, tokenizer: Tokenizer, model_name: str) -> Starlette:
    """An app serving ``engine`` (an Engine, run on a background thread by AsyncEngine)."""
    async_engine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
    state = ServerState(async_engine, tokenizer, model_name, ServerMetrics(model_name, async_engine.stats))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async_engine.start()
        sampler = asyncio.create_task(_sample_rates(state))
        try:
            yield
        finally:
            sampler.cancel()
            await async_engine.shutdown()

    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {P.APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.server = state
    return app


async def _sample_rates(state: ServerState) -> None:
    while True:
        state.metrics.rates.sample(state.engine.stats())
        await asyncio.sleep(1.0)


# ---- errors ---------------------------------------------------------------------------------


async def _api_error(request: Request, exc: P.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(P.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").body(),
                        status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path, exc_info=exc)
    return JSONResponse(P.APIError(500, f"internal server error: {exc}").body(), status_code=500)


def _engine_error(exc: BaseException) -> P.APIError:
    if isinstance(exc, ConfigError | ChatTemplateError):
        return P.APIError(400, str(exc))
    if isinstance(exc, EngineUnavailable | RequestAborted):
        return P.APIError(503, str(exc))
    return P.APIError(500, f"internal server error: {exc}")


# ---- simple routes --------------------------------------------------------------------------


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "coscale",
            "max_model_len": state.engine.max_model_len}


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.server)]})


async def retrieve_model(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.server
    state.check_model(request.path_params["model"])
    return JSONResponse(_model_card(state))


async def health(request: Request) -> JSONResponse:
    engine: AsyncEngine = request.app.state.server.engine
    if engine.error is not None:
        return JSONResponse(P.APIError(503, f"the engine failed: {engine.error}").body(), status_code=503)
    if not engine.accepting:
        return JSONResponse(P.APIError(503, "the server is shutting down").body(), status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---- generation -------------------------------------------------------------------------------


def _completion_prompts(prompt, tokenizer: Tokenizer) -> list[list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise P.APIError(400, "'prompt' must not be empty", param="prompt")
    ids = [tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p) for p in prompt]
    if any(not p for p in ids):
        raise P.APIError(400, "'prompt' must not be empty", param="prompt")
    return ids


async def _submit(state: ServerState, response_id: str, prompts: list[list[int]], req, *, arrival: float,
                  default_max_tokens: int | None, logprobs: int | None) -> list[Job]:
    """Validate every prompt's parameters, then hand all jobs to the engine (all or none)."""
    from coscale.infer.sampling import SamplingParams  # imported here: the engine side loads torch

    stops = P.stop_strings(req)
    params = []
    for ids in prompts:
        kwargs = P.sampling_kwargs(req, prompt_tokens=len(ids), max_model_len=state.engine.max_model_len,
                                   default_max_tokens=default_max_tokens, logprobs=logprobs,
                                   eos_token_ids=state.tokenizer.eos_token_ids)
        p = SamplingParams(**kwargs)
        try:
            p.validate()
        except ConfigError as e:
            raise P.APIError(400, str(e)) from None
        params.append(p)
    jobs: list[Job] = []
    try:
        for index, (ids, p) in enumerate(zip(prompts, params)):
            stream = await state.engine.generate(f"{response_id}-{index}", ids, p)
            jobs.append(Job(stream, ChoiceText(state.tokenizer, stops, logprobs), len(ids),
                            RequestTimer(state.metrics, arrival)))
    except BaseException as e:
        for job in jobs:
            job.stream.abort()
        if isinstance(e, Exception):
            raise _engine_error(e) from None
        raise
    return jobs


async def _run_job(index: int, job: Job, out: asyncio.Queue) -> None:
    try:
        async for output in job.stream:
            job.timer.tokens(len(output.new_token_ids))
            piece = job.text.add(output)
            out.put_nowait((index, piece))
            if job.text.finished:
                job.stream.abort()  # a stop string: the engine does not know it is done
                break
        out.put_nowait((index, None))
    except Exception as e:
        out.put_nowait((index, e))
    finally:
        job.timer.finish(job.text.finish_reason or "abort")


async def _pieces(jobs: list[Job]) -> AsyncIterator[tuple[int, Piece]]:
    """The jobs' pieces as they come, tagged with the job's index; raises the first job error."""
    out: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_run_job(i, job, out)) for i, job in enumerate(jobs)]
    try:
        remaining = len(jobs)
        while remaining:
            index, item = await out.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for job in jobs:
            job.stream.abort()


async def _abort_on_disconnect(request: Request, jobs: list[Job]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.stream.abort()  # a no-op for finished jobs (the server also sees "disconnect" after replying)


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _Reply:
    """The parts of a response that differ between the completions and chat APIs."""

    def __init__(self, state: ServerState, response_id: str, req, jobs: list[Job], chat: bool,
                 echo: list[str] | None) -> None:
        self.state, self.id, self.req, self.jobs, self.chat, self.echo = state, response_id, req, jobs, chat, echo
        self.created = P.now()
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def usage(self) -> dict:
        return P.usage(sum(j.prompt_tokens for j in self.jobs), sum(j.text.completion_tokens for j in self.jobs))

    def body(self, choices: list[dict], usage: dict | None, chunk: bool) -> dict:
        build = P.chat_object if self.chat else P.completion_object
        body = build(self.id, self.created, self.state.model_name, choices, usage, chunk)
        if chunk and self.include_usage:
            body.setdefault("usage", None)  # OpenAI: null on every chunk but the last when usage is asked
        return body

    def choice(self, index: int, text: str, tokens: list, finish_reason: str | None, offset: int,
               chunk: bool) -> dict:
        if self.chat:
            logprobs = {"content": P.chat_logprob_content(tokens)} if self.jobs[index].text.logprobs is not None \
                else None
            key, value = ("delta", {"content": text}) if chunk else ("message", {"role": "assistant",
                                                                                  "content": text})
            return {"index": index, key: value, "logprobs": logprobs, "finish_reason": finish_reason}
        logprobs = P.completion_logprobs(tokens, offset) if self.jobs[index].text.logprobs is not None else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    async def collect(self) -> dict:
        texts = [[] for _ in self.jobs]
        tokens = [[] for _ in self.jobs]
        async for index, piece in _pieces(self.jobs):
            texts[index].append(piece.text)
            tokens[index] += piece.tokens
        choices = []
        for index, job in enumerate(self.jobs):
            prefix = self.echo[index] if self.echo else ""
            choices.append(self.choice(index, prefix + "".join(texts[index]), tokens[index],
                                       job.text.finish_reason, len(prefix), chunk=False))
        return self.body(choices, self.usage(), chunk=False)

    async def events(self) -> AsyncIterator[str]:
        offsets = [len(self.echo[i]) if self.echo else 0 for i in range(len(self.jobs))]
        for index in range(len(self.jobs)):
            if self.chat:
                first = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}
                yield _sse(self.body([first], None, chunk=True))
            elif self.echo:
                yield _sse(self.body([self.choice(index, self.echo[index], [], None, 0, True)], None, True))
        try:
            async for index, piece in _pieces(self.jobs):
                if piece.text or piece.tokens or (piece.finish_reason and not self.chat):
                    finish = None if self.chat else piece.finish_reason
                    choice = self.choice(index, piece.text, piece.tokens, finish, offsets[index], chunk=True)
                    yield _sse(self.body([choice], None, chunk=True))
                if piece.finish_reason and self.chat:
                    choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": piece.finish_reason}
                    yield _sse(self.body([choice], None, chunk=True))
            if self.include_usage:
                yield _sse(self.body([], self.usage(), chunk=True))
        except Exception as e:  # the stream has begun: report in-band, as OpenAI's client expects
            yield _sse(_engine_error(e).body())
        yield _sse("[DONE]")


async def _respond(request: Request, reply: _Reply) -> Response:
    watcher = asyncio.create_task(_abort_on_disconnect(request, reply.jobs))
    if reply.req.stream:
        async def events():
            try:
                async for event in reply.events():
                    yield event
            finally:
                watcher.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return JSONResponse(await reply.collect())
    except Exception as e:
        raise _engine_error(e) from None
    finally:
        watcher.cancel()


async def create_completion(request: Request) -> Response:
    arrival, state = time.monotonic(), request.app.state.server
    req = P.parse_request(await request.body(), P.CompletionRequest)
    P.refuse_unsupported(req)
    state.check_model(req.model)
    prompts = _completion_prompts(req.prompt, state.tokenizer)
    response_id = P.new_id("cmpl")
    jobs = await _submit(state, response_id, prompts, req, arrival=arrival,
                         default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS, logprobs=req.logprobs)
    echo = [state.tokenizer.decode(p) for p in prompts] if req.echo else None
    return await _respond(request, _Reply(state, response_id, req, jobs, chat=False, echo=echo))


async def create_chat_completion(request: Request) -> Response:
    arrival, state = time.monotonic(), request.app.state.server
    req = P.parse_request(await request.body(), P.ChatCompletionRequest)
    P.refuse_unsupported(req)
    state.check_model(req.model)
    add_generation_prompt = True if req.add_generation_prompt is None else req.add_generation_prompt
    try:
        prompt = state.tokenizer.encode_chat(P.chat_messages(req), add_generation_prompt)
    except ChatTemplateError as e:
        raise P.APIError(400, str(e), param="messages") from None
    if not prompt:
        raise P.APIError(400, "the chat template rendered an empty prompt", param="messages")
    response_id = P.new_id("chatcmpl")
    jobs = await _submit(state, response_id, [prompt], req, arrival=arrival, default_max_tokens=None,
                         logprobs=P.chat_logprobs(req))
    return await _respond(request, _Reply(state, response_id, req, jobs, chat=True, echo=None))
