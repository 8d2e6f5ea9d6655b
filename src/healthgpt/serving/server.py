"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over loaded HealthGPT models: chat completions with images
(streamed as server-sent events), image generation as `images/edits`, a model list and a health check.

Every model runs in its own worker thread behind a `Batcher`; handlers only parse, queue and wait, and prompt
building runs in the thread pool, so the event loop never waits on torch. This module assembles the app (routes,
auth and body limits, error bodies); the routes live in `chat` and `image_edits`, their shared steps in `steps`, the
settings in `options`."""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..api import HealthGPT
from ..errors import http_status
from .batcher import (
    Batcher,
    named_models,
)
from .chat import chat_completion
from .continuous import ContinuousBatcher
from .image_edits import edit_images
from .metrics import ServingMetrics
from .options import API_KEY_ENV, BATCHING, ServerOptions, ServerState
from .remote import client as remote_client
from .schemas import ApiError, ChatCompletionRequest

log = logging.getLogger(__name__)

__all__ = ["API_KEY_ENV", "BATCHING", "ServerOptions", "create_app", "serve"]


def create_app(models: HealthGPT | Mapping[str, HealthGPT], options: ServerOptions | None = None) -> FastAPI:
    """The ASGI app serving `models` (a model, or `{served name: model}`); batchers start with the app."""
    options = options or ServerOptions()
    if options.api_key is None and os.environ.get(API_KEY_ENV):
        options = replace(options, api_key=os.environ[API_KEY_ENV])
    metrics = ServingMetrics()
    state = ServerState(
        options, {name: _batcher(model, name, options, metrics) for name, model in named_models(models).items()}
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for batcher in state.batchers.values():
            batcher.start()
        if options.allow_remote_images:
            state.http = remote_client()
        try:
            yield
        finally:
            for batcher in state.batchers.values():
                await run_in_threadpool(batcher.close)
            if state.http is not None:
                await state.http.aclose()

    app = FastAPI(title="HealthGPT", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.healthgpt = state
    app.add_middleware(_Guard, api_key=options.api_key, max_body_bytes=options.max_body_bytes)
    if options.cors_origins:  # outermost, so preflight requests need no key
        app.add_middleware(
            CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": {name: {"queued": b.queued} for name, b in state.batchers.items()}}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(name, state) for name in state.batchers]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict:
        state.batcher(model)
        return _model_card(model, state)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        return await chat_completion(state, body)

    @app.post("/v1/images/edits")
    async def image_edits(request: HttpRequest) -> dict:
        return await edit_images(state, request)

    return app


def _batcher(model: HealthGPT, name: str, options: ServerOptions, metrics: ServingMetrics) -> Batcher:
    if options.batching == "continuous":
        return ContinuousBatcher(
            model,
            max_batch_size=options.max_batch_size,
            max_queue=options.max_queue,
            max_model_len=options.max_model_len,
            name=name,
            metrics=metrics,
        )
    return Batcher(
        model,
        max_batch_size=options.max_batch_size,
        max_wait=options.batch_wait_ms / 1000,
        max_queue=options.max_queue,
        name=name,
        metrics=metrics,
    )


def serve(
    models: HealthGPT | Mapping[str, HealthGPT],
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServerOptions | None = None,
    *,
    log_level: str = "info",
) -> None:
    """Serve `models` over HTTP until interrupted (loopback only unless `host` says otherwise)."""
    import uvicorn

    uvicorn.run(create_app(models, options), host=host, port=port, log_level=log_level)


def _model_card(name: str, state: ServerState) -> dict:
    """The OpenAI model object, plus how the base LLM is stored and the model's bytes by part."""
    model = state.batchers[name].model
    return {
        "id": name,
        "object": "model",
        "created": state.started,
        "owned_by": "healthgpt",
        "quantization": model.quantization,
        "memory_bytes": model.memory(),
    }


# ----- errors, keys and limits --------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [part for part in first.get("loc", ()) if part != "body"]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(_: HttpRequest, exc: Exception) -> JSONResponse:
        status = http_status(exc)
        if status < 500:  # bad input that no route turned into an ApiError
            return JSONResponse(ApiError(status, str(exc)).body(), status_code=status)
        log.exception("request failed")
        return JSONResponse(ApiError(500, "internal error", type="server_error").body(), status_code=500)


class _Guard:
    """Checks the API key on /v1 routes, then refuses bodies over the size limit before the app reads them."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                error = ApiError(
                    401,
                    "missing or wrong API key: send it as `Authorization: Bearer <key>`",
                    code="invalid_api_key",
                )
                await _send_error(send, error)
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _send_error(send, self._too_large(length.decode("latin-1")))
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            await _send_error(send, self._too_large("more than that"))
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self, length: str) -> ApiError:
        return ApiError(
            413,
            f"the request body is {length} bytes; this server accepts at most {self.max_body_bytes}: "
            "send smaller or fewer images",
            code="request_too_large",
        )


async def _read_body(receive: Receive, limit: int) -> list[Message] | None:
    """The body's messages, or None once more than `limit` bytes arrive."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A `receive` that gives the read body again, then waits on the connection (for the disconnect)."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


async def _send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
