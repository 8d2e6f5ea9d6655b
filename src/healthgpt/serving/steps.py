"""Steps every route shares: request images decoded off the event loop, inputs built in the thread pool, jobs
queued, and their events awaited, each failure turned into the matching HTTP error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..api import HealthGPT, PromptTooLongError
from ..errors import ImageInputError, ImageRejected
from ..templates import PromptError
from .batcher import (
    Batcher,
    BatcherClosedError,
    Event,
    Failed,
    Job,
    JobTimeoutError,
    QueueFullError,
)
from .images import data_uri_bytes, decode_image, is_remote
from .options import ServerOptions, ServerState
from .remote import RemotePolicy, fetch_remote
from .schemas import ApiError


async def load_request_image(state: ServerState, url: str, param: str) -> Image.Image:
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
    return await decode_upload(data, state.options, param)


async def decode_upload(data: bytes, options: ServerOptions, param: str) -> Image.Image:
    """Decode in the thread pool (never in the batch worker), answering 400 past `options.image_decode_timeout`."""
    decoding = run_in_threadpool(decode_image, data, max_pixels=options.max_image_pixels, name=param)
    try:
        return await asyncio.wait_for(decoding, options.image_decode_timeout)
    except asyncio.TimeoutError:
        message = f"{param} took longer than {options.image_decode_timeout:g} s to decode; send a smaller image"
        raise ApiError(400, message, param=param, code="invalid_image") from None
    except ImageRejected as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_image") from None


async def prepare(batcher: Batcher, build: Callable[[HealthGPT], Any]) -> Any:
    """Build the model inputs in the thread pool; prompt problems become 400s."""
    try:
        return await run_in_threadpool(batcher.prepare, build)
    except PromptTooLongError as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except (PromptError, ImageInputError, ValueError) as exc:
        raise ApiError(400, str(exc), param="messages") from None


def submit(batcher: Batcher, *jobs: Job) -> None:
    try:
        batcher.submit(*jobs)
    except QueueFullError as exc:
        raise ApiError(503, str(exc), type="server_error", code="queue_full", headers={"Retry-After": "1"}) from None
    except BatcherClosedError as exc:
        raise ApiError(503, str(exc), type="server_error", code="unavailable") from None
    except ValueError as exc:
        raise ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None


def async_sink(events: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """A sink the worker thread may call: it hands each event to this event loop."""
    loop = asyncio.get_running_loop()
    return lambda event: loop.call_soon_threadsafe(events.put_nowait, event)


async def next_event(events: asyncio.Queue[Event], deadline: float) -> Event:
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
