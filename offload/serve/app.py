"""The HTTP side: FastAPI routes speaking OpenAI's API, in front of one Server.

Handlers never touch the model: they validate, hand a Sequence to the engine thread and relay its
Events (as SSE chunks when streaming). Every refusal is OpenAI's error JSON with a 4xx status.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from offload.serve.batcher import QueueFull
from offload.serve.protocol import (APIError, ChatRequest, CompletionRequest, chat_chunk, chat_response,
                                    completion_chunk, completion_response, error_body, parse, usage)
from offload.serve.sequence import Event, Sequence
from offload.serve.server import Server

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there
log = logging.getLogger("offload.serve")


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        server.close()

    app = FastAPI(title="offload-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, server=server)

    @app.exception_handler(APIError)
    async def refused(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", "invalid_request_error"),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error; see the server log", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": server.name}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "moe-offload"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        stats = await asyncio.to_thread(server.batcher.model_stats)  # waits for the current step to end
        text = server.metrics.render(stats, server.batcher.waiting, server.batcher.running)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = parse(ChatRequest, await request.body())
        server.check_model(req.model)
        return await _generate(server, request, req, server.chat_prompt(req), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await request.body())
        server.check_model(req.model)
        return await _generate(server, request, req, server.completion_prompt(req), chat=False)

    return app


async def _generate(server: Server, request: Request, req: ChatRequest | CompletionRequest, prompt: list[int],
                    chat: bool) -> Response:
    params = server.sampling(req, len(prompt))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    seq = server.sequence(prompt, params, lambda ev: _deliver(loop, events, ev))
    try:
        server.batcher.submit(seq)
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}; retry later", code="queue_full", kind="rate_limit_error") from None
    reply = _Reply(server.name, chat, prompt, req.return_token_ids)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(seq, events, reply, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _collect(request, seq, events, reply)


def _deliver(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, ev: Event) -> None:
    """Called on the engine thread: hand the event to the request's loop (gone at shutdown: drop it)."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, ev)
    except RuntimeError:
        pass


class _Reply:
    """Builds one request's bodies: the same id and timestamp in every chunk, chat or completion shape."""

    def __init__(self, model: str, chat: bool, prompt: list[int], return_token_ids: bool) -> None:
        self.model, self.chat, self.prompt, self.return_token_ids = model, chat, prompt, return_token_ids
        self.prompt_tokens = len(prompt)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def full(self, ev: Event, text: str) -> dict:
        build = chat_response if self.chat else completion_response
        body = build(self.id, self.created, self.model, text, ev.finish_reason,
                     usage(self.prompt_tokens, ev.completion_tokens))
        if self.return_token_ids:
            body["prompt_token_ids"] = self.prompt
            body["choices"][0]["token_ids"] = list(ev.token_ids)
        return body

    def chunk(self, text: str | None, finish: str | None = None, use: dict | None = None, role: bool = False) -> str:
        if self.chat:
            delta = None if text is None else ({"role": "assistant", "content": text} if role else
                                               {} if finish else {"content": text})
            body = chat_chunk(self.id, self.created, self.model, delta, finish, use)
        else:
            body = completion_chunk(self.id, self.created, self.model, text, finish, use)
        return _sse(body)


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, separators=(',', ':'))}\n\n"


async def _stream(seq: Sequence, events: asyncio.Queue, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
    finished = False
    try:
        if reply.chat:
            yield reply.chunk("", role=True)
        while not finished:
            ev = await events.get()
            if ev.error:
                yield _sse(error_body(ev.error, "server_error"))
                break
            if ev.text:
                yield reply.chunk(ev.text)
            if ev.finish_reason:
                finished = True
                yield reply.chunk("", finish=ev.finish_reason)
                if include_usage:
                    yield reply.chunk(None, use=usage(reply.prompt_tokens, ev.completion_tokens))
        yield _sse("[DONE]")
    finally:
        if not finished:  # the client left (or the server is stopping): free the batch slot
            seq.cancelled.set()


async def _collect(request: Request, seq: Sequence, events: asyncio.Queue, reply: _Reply) -> Response:
    parts: list[str] = []
    finished = False
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:  # TimeoutError itself only from 3.11
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
                continue
            if ev.error:
                return JSONResponse(error_body(ev.error, "server_error"), status_code=ev.status)
            parts.append(ev.text)
            if ev.finish_reason:
                finished = True
                return JSONResponse(reply.full(ev, "".join(parts)))
    finally:
        if not finished:
            seq.cancelled.set()


class Gate:
    """ASGI middleware around everything: the API key (all routes but /health) and response counting."""

    def __init__(self, app, server: Server) -> None:
        self.app, self.server = app, server
        self._expected = f"Bearer {server.api_key}".encode() if server.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"
        if self._expected is not None and path != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                self.server.metrics.request(route, 401)
                body = error_body("missing or wrong API key; send the header Authorization: Bearer KEY",
                                  "invalid_request_error", code="invalid_api_key")
                return await JSONResponse(body, status_code=401)(scope, receive, send)
        status = 500  # stays 500 if the app raises before it starts a response

        async def counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.server.metrics.request(route, status)
