"""`POST /v1/chat/completions`: questions with images, answered whole or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from ..api import HealthGPT
from ..generation import Request, SamplingParams
from .batcher import (
    Event,
    Job,
    TextDelta,
)
from .continuous import ContinuousBatcher
from .options import ServerState
from .schemas import ApiError, ChatCompletionRequest
from .schemas import Message as ChatMessage
from .steps import async_sink, load_request_image, next_event, prepare, submit


async def chat_completion(state: ServerState, body: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
    batcher = state.batcher(body.model)
    unsupported = body.unsupported()
    if unsupported is not None:
        raise ApiError(400, unsupported[1], param=unsupported[0], code="unsupported_parameter")
    deadline = time.monotonic() + state.options.request_timeout
    system, turns, urls = _split_messages(body.messages, state.options.max_images)
    images = [await load_request_image(state, url, param) for url, param in urls]
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > state.options.max_tokens:
        raise ApiError(
            400,
            f"max_tokens is {requested} but this server answers with at most {state.options.max_tokens} tokens",
            param="max_tokens",
        )

    def build(model: HealthGPT) -> Request:
        return model.build_request(turns, images, system=system, max_new_tokens=requested or 0)

    request = await prepare(batcher, build)
    prompt, context = batcher.model.prompt_length(request), batcher.model.context_length
    budget = requested or min(state.options.max_tokens, context - prompt)
    if budget < 1:
        raise ApiError(400, f"the prompt fills the model's context of {context} tokens", code="context_length_exceeded")
    sampling = _sampling(batcher.model, body, budget)
    if (body.min_tokens or body.ignore_eos) and not isinstance(batcher, ContinuousBatcher):
        raise ApiError(
            400, "min_tokens and ignore_eos need continuous batching (healthgpt serve --batching continuous)"
        )
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(
        request,
        sampling,
        async_sink(events),
        deadline=deadline,
        min_tokens=body.min_tokens or 0,
        ignore_eos=body.ignore_eos,
    )
    submit(batcher, job)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _stream_chunks(job, events, deadline, completion_id, body.model, usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        while isinstance(event := await next_event(events, deadline), TextDelta):
            pass
    finally:
        job.cancel()
    return JSONResponse(_completion(completion_id, body.model, event))


def _sampling(model: HealthGPT, body: ChatCompletionRequest, budget: int) -> SamplingParams:
    """The request's sampling settings with an answer budget of `budget` tokens; bad values are a 400."""
    chosen = dict(
        max_new_tokens=budget,
        temperature=body.temperature or 0.0,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
    )
    try:
        return model.sampling_params({k: v for k, v in chosen.items() if v is not None})
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


def _completion(completion_id: str, model: str, event: Any) -> dict[str, Any]:
    """The `chat.completion` body of a finished answer."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
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
        while isinstance(event := await next_event(events, deadline), TextDelta):
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
