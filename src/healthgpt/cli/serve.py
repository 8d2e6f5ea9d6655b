"""`serve` (OpenAI-compatible HTTP API) and `ui` (Gradio app): one loaded model, both tasks, continuous batching."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from .common import ModelOptions, command


@command
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(help="Require `Authorization: Bearer KEY` (default: $HEALTHGPT_API_KEY).")
    ] = None,
    allow_remote_images: Annotated[
        bool, typer.Option("--allow-remote-images/--no-remote-images", help="Fetch http(s) image URLs.")
    ] = False,
    remote_image_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Repeatable: with --allow-remote-images, fetch only from these hosts (which may then be on a private "
            "network); without it, any host whose addresses are all public."
        ),
    ] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(help="Browser origin allowed to call the API.")] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Rows per forward pass (1: no batching).")] = 32,
    batching: Annotated[
        str, typer.Option(help="continuous (rows join and leave the running batch at every step) or static.")
    ] = "continuous",
    max_model_len: Annotated[
        int | None, typer.Option(min=1, help="Positions per request (prompt + answer); default: the model's context.")
    ] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting requests before 503.")] = 256,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 300.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Default and largest answer length.")] = 512,
    *,
    model: ModelOptions,
) -> None:
    """Serve /v1/chat/completions (streaming too), /v1/images/edits, /v1/models, /health and /metrics."""
    from ..serving.server import ServerOptions
    from ..serving.server import serve as run

    options = ServerOptions(
        api_key=api_key or os.environ.get("HEALTHGPT_API_KEY"),
        allow_remote_images=allow_remote_images,
        remote_image_hosts=tuple(remote_image_host or ()),
        cors_origins=tuple(cors_origin or ()),
        max_batch_size=max_batch_size,
        batching=batching,
        max_model_len=max_model_len,
        max_queue=max_queue,
        request_timeout=timeout,
        max_tokens=max_tokens,
    )
    run(model.load(), host=host, port=port, options=options)


@command
def ui(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    share: Annotated[bool, typer.Option("--share/--no-share", help="Ask Gradio for a public link.")] = False,
    *,
    model: ModelOptions,
) -> None:
    """The browser app: analyze or generate, DICOM/NIfTI uploads with slice and window controls, streamed answers."""
    from ..serving.ui import launch_ui

    launch_ui(model.load(), host=host, port=port, share=share)
