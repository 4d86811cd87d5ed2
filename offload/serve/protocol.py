"""The OpenAI wire format: request bodies (validated strictly), response and chunk bodies, error bodies.

Validation is strict (a string where a number belongs is a 400, not coerced) and unknown fields are
ignored, as OpenAI clients send fields this server has no use for.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """A request the server refuses: becomes `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- requests ------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


Stop = Annotated[str, Field(min_length=1)]


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    return_token_ids: bool = False  # vLLM's extension: the prompt's and the answer's token ids in the reply
    ignore_eos: bool = False  # vLLM's extension: keep decoding past the end-of-sequence token

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | list[int]
    echo: bool | None = None
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None


# Fields accepted only at their no-op values: anything else would silently change what the client gets.
UNSUPPORTED = {"n": (None, 1), "frequency_penalty": (None, 0.0), "presence_penalty": (None, 0.0),
               "logprobs": (None, False), "echo": (None, False), "best_of": (None, 1), "suffix": (None,)}


def parse(cls: type[_Body], raw: bytes) -> _Body:
    """Validate a raw JSON body; the first problem becomes a 400 naming its field."""
    try:
        req = cls.model_validate_json(raw or b"null")
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON ({first['msg']})") from None
        if not first["loc"]:
            raise APIError(400, "the request body must be a JSON object") from None
        param = _param(first["loc"])
        raise APIError(400, f"{param}: {first['msg']}", param=param) from None
    for name, allowed in UNSUPPORTED.items():
        if name in req.model_fields_set and getattr(req, name) not in allowed:
            raise APIError(400, f"{name}={getattr(req, name)!r} is not supported by this server", param=name)
    return req


_TYPE_NAMES = {"str", "int", "float", "bool"}


def _param(loc: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content'."""
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p.isidentifier() and p not in _TYPE_NAMES:  # pydantic also names the union member it tried
            out += f".{p}" if out else p
    return out


# --- responses -----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, created: int, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, delta: dict | None, finish: str | None = None,
               use: dict | None = None) -> dict:
    """One streamed chunk; delta None makes the usage-only chunk (no choices) of stream_options.include_usage."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "usage": use}


def completion_response(rid: str, created: int, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": use}


def completion_chunk(rid: str, created: int, model: str, text: str | None, finish: str | None = None,
                     use: dict | None = None) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": use}
