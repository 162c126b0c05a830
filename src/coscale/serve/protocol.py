"""OpenAI-compatible request schemas, their validation, and the response objects.

Requests are parsed with pydantic in strict mode from the raw JSON, so a wrong type (``"max_tokens":
"ten"``, ``"stream": 1``) is a 400, not a silent coercion. Unknown fields are ignored, as vLLM does, so
clients that send extra OpenAI options keep working; fields coscale knows but cannot honour
(penalties, ``logit_bias``, ``tools``, ``n`` other than 1, ...) are refused with a 400 that names them
when set to anything but their neutral value.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: ``type`` is
``invalid_request_error`` for 4xx and ``server_error`` for 5xx; ``code`` is a string or null
(``context_length_exceeded`` for a prompt that does not fit, ``model_not_found`` for a wrong model name).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

MAX_LOGPROBS = 20  # the engine's limit (SamplingParams.logprobs); OpenAI's chat API uses the same
MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error the client gets as an OpenAI-shaped JSON body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- requests ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Extra keys (name, tool_call_id, ...) pass through to the chat template untouched.
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class _SamplingRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension; 0 or -1: off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    ignore_eos: bool | None = None  # vLLM's extension: generate max_tokens even past EOS (benchmarks)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None  # vLLM's extension


_TYPE_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "messages": "a list of messages, each with a role and a content",
}


_UNION_TAGS = {"str", "int", "float", "bool"}


def parse_request(body: bytes, schema: type[_Strict]) -> Any:
    """The request body as ``schema``; any malformed or mistyped input is an APIError(400)."""
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['msg']}")
    if not first["loc"]:
        return APIError(400, "the request body must be a JSON object")
    param = str(first["loc"][0])
    # pydantic names the member of a union it tried ("str", "list[int]") in the location: leave those out
    where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p)))
    if first["type"] == "missing":
        return APIError(400, f"'{where}' is a required property", param=param)
    if param in _TYPE_HINTS and (param != "messages" or len(first["loc"]) == 1):
        return APIError(400, f"'{param}' must be {_TYPE_HINTS[param]}", param=param)
    if param == "messages" and len(first["loc"]) > 2 and first["loc"][2] == "content":
        return APIError(400, f"'{'.'.join(map(str, first['loc'][:3]))}' must be a string or a list of "
                        '{"type": "text", "text": ...} parts', param=param)
    return APIError(400, f"'{where}': {first['msg']}", param=param)


def refuse_unsupported(req: _SamplingRequest) -> None:
    """400 for options coscale knows but does not implement, unless they hold their neutral value."""
    checks = [
        ("n", req.n in (None, 1), f"n must be 1 (one choice a request; send several requests for more), "
                                  f"got {req.n}"),
        ("stream_options", req.stream_options is None or bool(req.stream),
         "stream_options is only allowed when stream is true"),
        ("presence_penalty", not req.presence_penalty, "presence_penalty is not supported"),
        ("frequency_penalty", not req.frequency_penalty, "frequency_penalty is not supported"),
        ("logit_bias", not req.logit_bias, "logit_bias is not supported"),
    ]
    if isinstance(req, CompletionRequest):
        checks += [
            ("best_of", req.best_of in (None, 1), "only best_of=1 is supported"),
            ("suffix", not req.suffix, "suffix is not supported"),
            ("echo", not (req.echo and req.logprobs is not None),
             "echo with logprobs is not supported (no prompt logprobs)"),
        ]
    if isinstance(req, ChatCompletionRequest):
        fmt = (req.response_format or {}).get("type", "text")
        checks += [
            ("tools", not req.tools, "tools are not supported"),
            ("tool_choice", req.tool_choice in (None, "none"), "tool_choice needs tools, which are not supported"),
            ("response_format", fmt == "text", f"response_format {fmt!r} is not supported (only 'text')"),
        ]
    for param, ok, message in checks:
        if not ok:
            raise APIError(400, message, param=param)


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    """Messages as template input: content parts joined into one string."""
    if not req.messages:
        raise APIError(400, "'messages' must hold at least one message", param="messages")
    out = []
    for message in req.messages:
        content = message.content
        if isinstance(content, list):
            kinds = {part.type for part in content} - {"text"}
            if kinds:
                raise APIError(400, f"content parts of type {sorted(kinds)} are not supported (text only)",
                               param="messages")
            content = "".join(part.text or "" for part in content)
        out.append({**message.model_dump(exclude_none=True), "content": content or ""})
    return out


# ---- sampling ---------------------------------------------------------------------------------


def stop_strings(req: _SamplingRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return stops


def sampling_kwargs(req: _SamplingRequest, *, prompt_tokens: int, max_model_len: int,
                    default_max_tokens: int | None, logprobs: int | None,
                    eos_token_ids: Sequence[int]) -> dict:
    """Keyword arguments for the engine's SamplingParams, checked against the context limit."""
    room = max_model_len - prompt_tokens
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else default_max_tokens
    if prompt_tokens + max(max_tokens, 1) > max_model_len:
        where = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        if max_tokens < 1:  # no max_tokens given, and the prompt alone fills the context
            asked = f"your {where} resulted in {prompt_tokens} tokens. Please reduce the length of the {where}."
        else:
            asked = (f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {where}, "
                     f"{max_tokens} for the completion). Please reduce the {where} or max_tokens.")
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, {asked}",
                       param=where, code="context_length_exceeded")
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise APIError(400, f"temperature must be a finite number >= 0, got {temperature}", param="temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = req.top_k or 0
    if top_k < -1:
        raise APIError(400, f"top_k must be >= 1, or 0 / -1 for off, got {top_k}", param="top_k")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}",
                       param="top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs")
    if req.seed is not None and not -(1 << 63) <= req.seed < 1 << 64:
        raise APIError(400, "seed must fit in 64 bits", param="seed")
    stop_ids = list(req.stop_token_ids or [])
    if any(t < 0 for t in stop_ids):
        raise APIError(400, f"stop_token_ids must be token ids >= 0, got {stop_ids}", param="stop_token_ids")
    if not req.ignore_eos:
        stop_ids += eos_token_ids
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                seed=req.seed, stop_token_ids=tuple(dict.fromkeys(stop_ids)), logprobs=logprobs)


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


# ---- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(response_id: str, created: int, model: str, choices: list[dict],
                      usage_: dict | None, chunk: bool) -> dict:
    body = {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "system_fingerprint": None}
    if not chunk or usage_ is not None:
        body["usage"] = usage_
    return body


def chat_object(response_id: str, created: int, model: str, choices: list[dict],
                usage_: dict | None, chunk: bool) -> dict:
    body = {"id": response_id, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": created, "model": model, "choices": choices, "system_fingerprint": None}
    if not chunk or usage_ is not None:
        body["usage"] = usage_
    return body


def completion_logprobs(tokens: list, text_offset: int) -> dict:
    """Logprobs of the legacy completions API for a run of tokens (outputs.TokenInfo); ``text_offset``
    is where the generated text begins in the choice's text (the echoed prompt's length)."""
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": [text_offset + t.offset for t in tokens]}


def chat_logprob_content(tokens: list) -> list[dict]:
    """Logprobs of the chat API: per token its text, logprob, UTF-8 bytes and the top alternatives."""
    return [{"token": t.text, "logprob": t.logprob, "bytes": list(t.raw),
             "top_logprobs": [{"token": text, "logprob": lp, "bytes": list(raw)}
                              for (text, lp), raw in zip(t.top or [], t.top_raw or [])]}
            for t in tokens]
