"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over loaded HealthGPT models: chat completions with images
(streamed as server-sent events), image generation as `images/edits`, a model list and a health check.

Every model runs in its own worker thread behind a `Batcher`; handlers only parse, queue and wait, and prompt
building runs in the thread pool, so the event loop never waits on torch."""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..api import HealthGPT, PromptTooLongError
from ..errors import ImageInputError, ImageRejected, http_status
from ..generation import Request
from ..tasks import TASKS, GenerationTask, check_image_input, resolve_instruction
from ..templates import PromptError
from .batcher import (
    Batcher,
    BatcherClosedError,
    Event,
    Failed,
    ImageDone,
    Job,
    JobTimeoutError,
    QueueFullError,
    TextDelta,
    named_models,
)
from .continuous import ContinuousBatcher
from .images import data_uri_bytes, decode_image, is_remote
from .metrics import ServingMetrics
from .remote import RemotePolicy, fetch_remote
from .remote import client as remote_client
from .schemas import ApiError, ChatCompletionRequest
from .schemas import Message as ChatMessage

log = logging.getLogger(__name__)
API_KEY_ENV = "HEALTHGPT_API_KEY"


BATCHING = ("continuous", "static")


@dataclass(frozen=True)
class ServerOptions:
    """How the server admits and batches requests."""

    api_key: str | None = None  # required as `Authorization: Bearer <key>` on /v1; default: $HEALTHGPT_API_KEY
    allow_remote_images: bool = False  # fetch http(s) image URLs (data: URIs are always accepted)
    remote_image_hosts: tuple[str, ...] = ()  # if given, the only hosts fetched from (private addresses allowed)
    remote_image_timeout: float = 10.0  # seconds for a whole remote fetch, redirects included
    image_decode_timeout: float = 30.0  # seconds to decode one request image (pixel limits bound the work too)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none by default
    max_batch_size: int = 32  # rows per forward pass (continuous: KV-cache slots); 1 turns batching off
    batching: str = "continuous"  # "continuous" (rows join and leave at every step) or "static" (whole batches)
    max_model_len: int | None = None  # positions per request slot (continuous); default: the model's context
    batch_wait_ms: float = 5.0  # static batching: how long the first queued request waits for others to join
    max_queue: int = 256  # requests waiting to start; more are answered 503 with Retry-After
    request_timeout: float = 300.0  # seconds from arrival to the last token
    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 4096 * 4096  # per image, all slices of a volume counted
    max_images: int = 4  # per request
    max_tokens: int = 512  # default and largest answer length in tokens

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_queue, self.max_body_bytes, self.max_image_pixels, self.max_tokens) < 1:
            raise ValueError("batch size, queue, body, pixel and token limits must be >= 1")
        if self.request_timeout <= 0 or self.batch_wait_ms < 0:
            raise ValueError("request_timeout must be > 0 and batch_wait_ms >= 0")
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")


@dataclass
class _State:
    options: ServerOptions
    batchers: dict[str, Batcher]
    started: int = field(default_factory=lambda: int(time.time()))
    http: httpx.AsyncClient | None = None

    def batcher(self, name: str | None) -> Batcher:
        if name is None and len(self.batchers) == 1:
            return next(iter(self.batchers.values()))
        if name not in self.batchers:
            raise ApiError(
                404,
                f"the model {name!r} is not served here; use one of {sorted(self.batchers)}",
                param="model",
                code="model_not_found",
            )
        return self.batchers[name]


def create_app(models: HealthGPT | Mapping[str, HealthGPT], options: ServerOptions | None = None) -> FastAPI:
    """The ASGI app serving `models` (a model, or `{served name: model}`); batchers start with the app."""
    options = options or ServerOptions()
    if options.api_key is None and os.environ.get(API_KEY_ENV):
        options = replace(options, api_key=os.environ[API_KEY_ENV])
    metrics = ServingMetrics()
    state = _State(
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
        return await _chat(state, body)

    @app.post("/v1/images/edits")
    async def image_edits(request: HttpRequest) -> dict:
        return await _image_edits(state, request)

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


# ----- chat completions ---------------------------------------------------------------------------------------
async def _chat(state: _State, body: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
    batcher = state.batcher(body.model)
    unsupported = body.unsupported()
    if unsupported is not None:
        raise ApiError(400, unsupported[1], param=unsupported[0], code="unsupported_parameter")
    deadline = time.monotonic() + state.options.request_timeout
    system, turns, urls = _split_messages(body.messages, state.options.max_images)
    images = [await _load_image(state, url, param) for url, param in urls]
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > state.options.max_tokens:
        raise ApiError(
            400,
            f"max_tokens is {requested} but this server answers with at most {state.options.max_tokens} tokens",
            param="max_tokens",
        )

    def build(model: HealthGPT) -> Request:
        return model.build_request(turns, images, system=system, max_new_tokens=requested or 0)

    request = await _prepare(batcher, build)
    prompt, context = batcher.model.prompt_length(request), batcher.model.context_length
    budget = requested or min(state.options.max_tokens, context - prompt)
    if budget < 1:
        raise ApiError(400, f"the prompt fills the model's context of {context} tokens", code="context_length_exceeded")
    try:
        chosen = dict(
            max_new_tokens=budget,
            temperature=body.temperature or 0.0,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
        )
        sampling = batcher.model.sampling_params({k: v for k, v in chosen.items() if v is not None})
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    if (body.min_tokens or body.ignore_eos) and not isinstance(batcher, ContinuousBatcher):
        raise ApiError(
            400, "min_tokens and ignore_eos need continuous batching (healthgpt serve --batching continuous)"
        )
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(
        request,
        sampling,
        _async_sink(events),
        deadline=deadline,
        min_tokens=body.min_tokens or 0,
        ignore_eos=body.ignore_eos,
    )
    _submit(batcher, job)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _stream_chunks(job, events, deadline, completion_id, body.model, usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        while isinstance(event := await _next_event(events, deadline), TextDelta):
            pass
    finally:
        job.cancel()
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": event.text},
                    "finish_reason": event.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(event),
        }
    )


def _split_messages(
    messages: list[ChatMessage], max_images: int
) -> tuple[str | None, list[dict[str, str]], list[tuple[str, str]]]:
    """(system prompt, user/assistant turns, [(image url, parameter name)]). Images belong to the first user turn,
    where the model sees them."""
    system: list[str] = []
    turns: list[dict[str, str]] = []
    urls: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        texts = [message.content] if isinstance(message.content, str) else []
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type == "text":
                texts.append(part.text)
                continue
            param = f"messages[{i}].content[{j}].image_url"
            if message.role != "user" or turns:
                raise ApiError(
                    400, "images may only be sent in the first user message, where the model sees them", param=param
                )
            urls.append((part.image_url.url, param))
        if message.role in ("system", "developer"):
            if turns:
                raise ApiError(400, "system messages must come before the conversation", param=f"messages[{i}].role")
            system.append("\n".join(texts))
        else:
            turns.append({"role": message.role, "content": "\n".join(texts)})
    if len(urls) > max_images:
        raise ApiError(400, f"{len(urls)} images sent; this server takes at most {max_images}", param="messages")
    if not turns:
        raise ApiError(400, "the conversation has no user message", param="messages")
    return ("\n".join(system) if system else None), turns, urls


async def _stream_chunks(
    job: Job, events: asyncio.Queue[Event], deadline: float, completion_id: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; errors arrive as an error event."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while isinstance(event := await _next_event(events, deadline), TextDelta):
            yield chunk({"content": event.text})
        yield chunk({}, event.finish_reason)
        if include_usage:
            yield chunk({}, usage=_usage(event))
    except ApiError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        job.cancel()
    yield "data: [DONE]\n\n"


def _usage(event: Any) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


# ----- image generation ---------------------------------------------------------------------------------------
async def _image_edits(state: _State, http: HttpRequest) -> dict:
    """`POST /v1/images/edits`: `image` (none for report_to_cxr) and `prompt` (a task name, a free instruction, or the
    report with `task=report_to_cxr`) -> `b64_json` PNGs; `task`, sampling and `guidance_scale` extend the schema."""
    async with http.form(max_files=8, max_fields=64) as form:
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        uploads = [value for key, value in form.multi_items() if key in ("image", "image[]")]
        if "mask" in form:
            raise ApiError(400, "masks are not supported: the whole image is generated", param="mask")
        if any(not isinstance(u, UploadFile) for u in uploads):
            raise ApiError(400, "image must be an uploaded file (multipart), not a text field", param="image")
        if len(uploads) > 1:
            raise ApiError(400, f"{len(uploads)} images sent; image generation takes one", param="image")
        data = await uploads[0].read() if uploads else None
    batcher = state.batcher(fields.get("model"))
    model = batcher.model
    if not model.generates_images:
        raise ApiError(400, f"the model {batcher.name} cannot generate images (no generation plugin or VQGAN)")
    deadline = time.monotonic() + state.options.request_timeout
    instruction, task = _instruction(fields)
    try:
        check_image_input(task, data is not None)
    except ValueError as exc:
        raise ApiError(400, f"{exc} (the `image` upload)", param="image") from None
    size = model.config.vq.image_size
    if fields.get("size", "auto") not in ("auto", f"{size}x{size}"):
        raise ApiError(400, f"this model generates {size}x{size} images; send size={size}x{size} or auto", param="size")
    if fields.get("response_format", "b64_json") != "b64_json":
        raise ApiError(400, "images are returned inline only: use response_format=b64_json", param="response_format")
    if fields.get("output_format", "png") != "png":
        raise ApiError(400, "images are returned as PNG only", param="output_format")
    n = _form_number(fields, "n", int, 1)
    if not 1 <= n <= 4:
        raise ApiError(400, "n must be between 1 and 4", param="n")
    guidance = _form_number(fields, "guidance_scale", float, 1.0)
    try:
        sampling = model.sampling_params(
            dict(
                max_new_tokens=model.config.vq.num_image_tokens + 1,
                temperature=_form_number(fields, "temperature", float, 0.0),
                top_p=_form_number(fields, "top_p", float, None),
                top_k=_form_number(fields, "top_k", int, None),
                seed=_form_number(fields, "seed", int, None),
            )
        )
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    image = None
    if data is not None:
        image = await _decode(data, state.options, "image")

    def build(hg: HealthGPT) -> tuple[Request, Request | None]:
        built = hg.build_image_request(image, instruction, guided=guidance != 1.0)
        return built.request, built.unconditional

    request, unconditional = await _prepare(batcher, build)
    queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in range(n)]
    jobs = [Job(request, sampling, _async_sink(q), unconditional, guidance, deadline=deadline) for q in queues]
    _submit(batcher, *jobs)
    try:
        done = [await _next_event(q, deadline) for q in queues]
    finally:
        for job in jobs:
            job.cancel()
    pngs = [await run_in_threadpool(_png_base64, event.image) for event in done if isinstance(event, ImageDone)]
    return {
        "created": int(time.time()),
        "data": [{"b64_json": png, "revised_prompt": instruction} for png in pngs],
        "output_format": "png",
        "size": f"{size}x{size}",
    }


def _instruction(fields: Mapping[str, str]) -> tuple[str, GenerationTask | None]:
    """(instruction, its task: None for a free instruction) from `task` and `prompt`."""
    prompt = fields.get("prompt", "")
    name = fields.get("task") or (prompt.strip() if prompt.strip() in TASKS else None)
    if name is not None and name not in TASKS:
        raise ApiError(400, f"unknown task {name!r}; use one of {', '.join(TASKS)}", param="task")
    try:
        if name is None:
            return resolve_instruction(prompt)[0], None
        return resolve_instruction(name, None if prompt.strip() == name else prompt)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from None


def _form_number(fields: Mapping[str, str], key: str, kind: type, default: Any) -> Any:
    if key not in fields or fields[key] == "":
        return default
    try:
        value = kind(fields[key])
    except ValueError:
        raise ApiError(400, f"{key} must be a number, got {fields[key]!r}", param=key) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"{key} must be finite", param=key)
    return value


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ----- shared steps -------------------------------------------------------------------------------------------
async def _load_image(state: _State, url: str, param: str) -> Image.Image:
    """A request image (data: URI, or a remote URL when allowed) decoded off the event loop."""
    try:
        if is_remote(url):
            if state.http is None:
                raise ImageRejected(
                    "remote image URLs are disabled on this server: send the image inline as a data: URI "
                    "(data:image/png;base64,...), or start the server with --allow-remote-images"
                )
            policy = RemotePolicy(
                frozenset(h.lower() for h in state.options.remote_image_hosts),
                max_bytes=state.options.max_body_bytes,
                deadline=state.options.remote_image_timeout,
            )
            data = await fetch_remote(url, state.http, policy, param)
        else:
            data = data_uri_bytes(url, param)
    except ImageRejected as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_image") from None
    return await _decode(data, state.options, param)


async def _decode(data: bytes, options: ServerOptions, param: str) -> Image.Image:
    """Decode in the thread pool (never in the batch worker), answering 400 past `options.image_decode_timeout`."""
    decoding = run_in_threadpool(decode_image, data, max_pixels=options.max_image_pixels, name=param)
    try:
        return await asyncio.wait_for(decoding, options.image_decode_timeout)
    except asyncio.TimeoutError:
        message = f"{param} took longer than {options.image_decode_timeout:g} s to decode; send a smaller image"
        raise ApiError(400, message, param=param, code="invalid_image") from None
    except ImageRejected as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_image") from None


async def _prepare(batcher: Batcher, build: Callable[[HealthGPT], Any]) -> Any:
    """Build the model inputs in the thread pool; prompt problems become 400s."""
    try:
        return await run_in_threadpool(batcher.prepare, build)
    except PromptTooLongError as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except (PromptError, ImageInputError, ValueError) as exc:
        raise ApiError(400, str(exc), param="messages") from None


def _submit(batcher: Batcher, *jobs: Job) -> None:
    try:
        batcher.submit(*jobs)
    except QueueFullError as exc:
        raise ApiError(503, str(exc), type="server_error", code="queue_full", headers={"Retry-After": "1"}) from None
    except BatcherClosedError as exc:
        raise ApiError(503, str(exc), type="server_error", code="unavailable") from None
    except ValueError as exc:
        raise ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None


def _async_sink(events: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """A sink the worker thread may call: it hands each event to this event loop."""
    loop = asyncio.get_running_loop()
    return lambda event: loop.call_soon_threadsafe(events.put_nowait, event)


async def _next_event(events: asyncio.Queue[Event], deadline: float) -> Event:
    """The job's next event; failures and the deadline become `ApiError`s."""
    try:
        event = await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0.0))
    except asyncio.TimeoutError:
        event = Failed(JobTimeoutError())
    if not isinstance(event, Failed):
        return event
    if isinstance(event.error, JobTimeoutError):
        raise ApiError(504, "the request took longer than the server's timeout", type="server_error", code="timeout")
    if isinstance(event.error, BatcherClosedError):
        raise ApiError(503, str(event.error), type="server_error", code="unavailable")
    raise ApiError(500, f"generation failed: {event.error}", type="server_error")


def _model_card(name: str, state: _State) -> dict:
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
