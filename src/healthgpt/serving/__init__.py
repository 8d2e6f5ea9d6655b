"""Serving one loaded model to many users: an OpenAI-compatible HTTP server (`serve`) and a Gradio app
(`launch_ui`), both feeding the same dynamic batcher."""

from __future__ import annotations

from typing import Any

__all__ = ["build_ui", "create_app", "launch_ui", "serve"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the server pulls in FastAPI, the app Gradio; neither should load the other.
    if name in ("create_app", "serve"):
        from . import server

        return getattr(server, name)
    if name in ("build_ui", "launch_ui"):
        from . import ui

        return getattr(ui, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
