"""The server's settings and per-app state: admission limits, batching mode, the batcher of each served model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx

from .batcher import (
    Batcher,
)
from .schemas import ApiError

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
class ServerState:
    """What every route needs: the options and the batcher of each served model (and the remote-image client)."""

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
