"""`POST /v1/images/edits`: image generation from a task name or a free instruction, with an input image or not."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import time
from collections.abc import Mapping
from typing import Any

from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request as HttpRequest

from ..api import HealthGPT
from ..generation import Request
from ..tasks import TASKS, GenerationTask, check_image_input, resolve_instruction
from .batcher import (
    Event,
    ImageDone,
    Job,
)
from .options import ServerState
from .schemas import ApiError
from .steps import async_sink, decode_upload, next_event, prepare, submit


async def edit_images(state: ServerState, http: HttpRequest) -> dict:
    """`POST /v1/images/edits`: `image` (none for report_to_cxr) and `prompt` (a task name, a free instruction, or the
    report with `task=report_to_cxr`) -> `b64_json` PNGs; `task`, sampling and `guidance_scale` (the model's default
    where none is sent) extend the schema."""
    fields, data = await _read_form(http)
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
    _check_output_fields(fields, size)
    n = _form_number(fields, "n", int, 1)
    if not 1 <= n <= 4:
        raise ApiError(400, "n must be between 1 and 4", param="n")
    try:
        guidance = model.resolve_guidance(_form_number(fields, "guidance_scale", float, None))
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
        image = await decode_upload(data, state.options, "image")

    def build(hg: HealthGPT) -> tuple[Request, Request | None]:
        built = hg.build_image_request(image, instruction, guided=guidance != 1.0)
        return built.request, built.unconditional

    request, unconditional = await prepare(batcher, build)
    queues: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in range(n)]
    jobs = [Job(request, sampling, async_sink(q), unconditional, guidance, deadline=deadline) for q in queues]
    submit(batcher, *jobs)
    try:
        done = [await next_event(q, deadline) for q in queues]
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


async def _read_form(http: HttpRequest) -> tuple[dict[str, str], bytes | None]:
    """The multipart form's text fields and its one uploaded image (None without one); a mask, a text `image` or
    several images are refused."""
    async with http.form(max_files=8, max_fields=64) as form:
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        uploads = [value for key, value in form.multi_items() if key in ("image", "image[]")]
        if "mask" in form:
            raise ApiError(400, "masks are not supported: the whole image is generated", param="mask")
        if any(not isinstance(u, UploadFile) for u in uploads):
            raise ApiError(400, "image must be an uploaded file (multipart), not a text field", param="image")
        if len(uploads) > 1:
            raise ApiError(400, f"{len(uploads)} images sent; image generation takes one", param="image")
        return fields, await uploads[0].read() if uploads else None


def _check_output_fields(fields: Mapping[str, str], size: int) -> None:
    """Refuse output settings this server cannot honour: another size, URLs instead of inline data, not PNG."""
    if fields.get("size", "auto") not in ("auto", f"{size}x{size}"):
        raise ApiError(400, f"this model generates {size}x{size} images; send size={size}x{size} or auto", param="size")
    if fields.get("response_format", "b64_json") != "b64_json":
        raise ApiError(400, "images are returned inline only: use response_format=b64_json", param="response_format")
    if fields.get("output_format", "png") != "png":
        raise ApiError(400, "images are returned as PNG only", param="output_format")


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
