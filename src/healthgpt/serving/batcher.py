"""Dynamic batching: one worker thread owns a loaded model; queued requests run together through the one generation
loop, comprehension and generation rows side by side (each row picks its H-LoRA plugin)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch
from PIL import Image

from ..api import HealthGPT
from ..api.images import decode_image_ids
from ..generation import IncrementalDetokenizer, Request, SamplingParams, stream
from .metrics import ServingMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The batcher's queue holds as many requests as it may; try again later."""


class BatcherClosedError(RuntimeError):
    """The batcher is not running (not started yet, or shut down)."""


class JobTimeoutError(TimeoutError):
    """A request ran past its deadline."""


@dataclass(frozen=True)
class TextDelta:
    """New text of a streamed answer."""

    text: str


@dataclass(frozen=True)
class TextDone:
    """A finished answer: its whole text (as `HealthGPT.ask` decodes it), why it stopped and its token counts."""

    text: str
    finish_reason: str  # "stop" (a stop token) or "length" (the token budget)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ImageDone:
    """A generated image and the VQ codes it was decoded from."""

    image: Image.Image
    codes: torch.Tensor  # [grid, grid]
    prompt_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request failed; `error` says why."""

    error: BaseException


Event = TextDelta | TextDone | ImageDone | Failed


@dataclass(eq=False)
class Job:
    """One request for the worker: a built `Request` (its `max_new_tokens` is this job's budget), the sampling
    settings, and a sink that receives its events from the worker thread (it must not block)."""

    request: Request
    sampling: SamplingParams
    sink: Callable[[Event], None]
    unconditional: Request | None = None  # image jobs with classifier-free guidance
    guidance_scale: float = 1.0
    deadline: float | None = None  # time.monotonic() after which the job is dropped
    min_tokens: int = 0  # stop tokens are suppressed before this many tokens (vLLM's extension)
    ignore_eos: bool = False  # run to the budget whatever is generated (vLLM's extension, for benchmarks)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    # worker-side state
    ids: list[int] = field(default_factory=list)
    finished: bool = False
    detokenizer: IncrementalDetokenizer | None = None
    last_token_at: float | None = None

    @property
    def is_image(self) -> bool:
        return self.request.image_span

    @property
    def budget(self) -> int:
        """This job's token budget (its request's `max_new_tokens`)."""
        return self.request.max_new_tokens or self.sampling.max_new_tokens

    def cancel(self) -> None:
        """Stop working on this job (the client left or timed out); no more events are sent."""
        self.cancelled.set()

    @property
    def idle(self) -> bool:
        return self.finished or self.cancelled.is_set()


def batch_key(job: Job) -> Hashable:
    """Jobs with equal keys share one forward pass: same sampling settings (greedy ignores temperature, top-k/p and
    seed), same guidance. A seeded sampled job runs alone, so its seed reproduces `HealthGPT.ask(..., seed=)`."""
    s = job.sampling
    if s.greedy:
        sampling: tuple = ("greedy", s.repetition_penalty)
    elif s.seed is not None:
        return ("alone", id(job))
    else:
        sampling = (s.temperature, s.top_p, s.top_k, s.repetition_penalty)
    guided = job.guidance_scale != 1.0
    return (*sampling, job.guidance_scale if guided else None)


def named_models(models: HealthGPT | Mapping[str, HealthGPT]) -> dict[str, HealthGPT]:
    """Served names: the mapping's keys, or `healthgpt-<variant>` for a single model."""
    if isinstance(models, HealthGPT):
        return {f"healthgpt-{models.config.name}": models}
    if not models:
        raise ValueError("serve at least one model")
    return dict(models)


class Batcher:
    """Queue jobs for one model; a worker thread runs what is queued (after waiting `max_wait` s for company) in
    batches of up to `max_batch_size` rows grouped by `batch_key`. At most `max_queue` jobs may wait to start."""

    def __init__(
        self,
        model: HealthGPT,
        *,
        max_batch_size: int = 32,
        max_wait: float = 0.005,
        max_queue: int = 256,
        name: str = "healthgpt",
        metrics: ServingMetrics | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait >= 0")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.name = name
        self.metrics = metrics or ServingMetrics()
        self.metrics.watch(name)
        self._queue: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stops = frozenset(model.stop_ids)
        self._tokenizer_lock = threading.Lock()  # fast tokenizers must not encode and decode at once

    # ----- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> Batcher:
        """Start the worker thread (idempotent)."""
        with self._ready:
            if self._thread is None:
                self._closed = False
                self._thread = threading.Thread(target=self._work, name=f"batcher-{self.name}", daemon=True)
                self._thread.start()
        return self

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking jobs, fail the queued ones, and wait for the running batch to end."""
        with self._ready:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._ready.notify_all()
        for job in left:
            _emit(job, Failed(BatcherClosedError("the server is shutting down")))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Batcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- submission -----------------------------------------------------------------------------------------
    def prepare(self, build: Callable[[HealthGPT], T]) -> T:
        """Run `build(model)` (tokenizing a prompt, preprocessing images) safely beside the worker; call it from a
        worker pool, never from an event loop."""
        with self._tokenizer_lock:
            return build(self.model)

    @property
    def queued(self) -> int:
        """Jobs waiting to start."""
        return len(self._queue)

    def submit(self, *jobs: Job) -> None:
        """Queue jobs (all or none); raises `QueueFullError` when they do not fit."""
        with self._ready:
            if self._closed or self._thread is None:
                raise BatcherClosedError(f"the batcher for {self.name} is not running")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFullError(
                    f"{self.name} has {len(self._queue)} requests waiting (at most {self.max_queue}); retry shortly"
                )
            self._queue.extend(jobs)
            self._ready.notify()

    # ----- worker ---------------------------------------------------------------------------------------------
    def _take(self) -> list[Job]:
        """Wait for a job, give others `max_wait` to arrive, then take up to a batch of live ones."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            end = time.monotonic() + self.max_wait
            while not self._closed and len(self._queue) < self.max_batch_size and (left := end - time.monotonic()) > 0:
                self._ready.wait(left)
            taken = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
        now = time.monotonic()
        live = []
        for job in taken:
            if job.cancelled.is_set():
                continue
            if job.deadline is not None and now > job.deadline:
                _emit(job, Failed(JobTimeoutError("the request timed out while queued")))
                continue
            live.append(job)
        return live

    def _work(self) -> None:
        while not self._closed:
            groups: dict[Hashable, list[Job]] = {}
            for job in self._take():
                groups.setdefault(batch_key(job), []).append(job)
            for rows in groups.values():
                try:
                    self.run(rows)
                except Exception as exc:  # a failing batch fails its requests, never the worker
                    log.exception("batch of %d requests failed", len(rows))
                    for job in rows:
                        if not job.finished:
                            job.finished = True
                            _emit(job, Failed(exc))

    def run(self, jobs: Sequence[Job]) -> None:
        """Run jobs of one `batch_key` as one batch in the calling thread, sending each job its events."""
        hg = self.model
        first = jobs[0]
        sampling = replace(first.sampling, max_new_tokens=max(job.budget for job in jobs))
        kwargs: dict = hg.generation_kwargs()
        if first.guidance_scale != 1.0:
            kwargs |= {"unconditional": [job.unconditional for job in jobs], "guidance_scale": first.guidance_scale}
        log.debug("%s: batch of %d (%d image)", self.name, len(jobs), sum(job.is_image for job in jobs))
        self.metrics.running.labels(self.name).set(len(jobs))
        requests = [replace(job.request, max_new_tokens=job.budget) for job in jobs]
        steps = stream(hg.model, requests, sampling, **kwargs)
        try:
            for step in steps:
                with self._tokenizer_lock:
                    for job, token, active in zip(jobs, step.tokens.tolist(), step.active.tolist(), strict=True):
                        if active and not job.idle:
                            self._feed(job, token)
                if all(job.idle for job in jobs):
                    break
        finally:
            steps.close()
        self.emit_images([job for job in jobs if job.is_image and job.finished and not job.cancelled.is_set()])

    def emit_images(self, jobs: Sequence[Job]) -> None:
        """Decode finished image jobs' codes with the VQGAN and send each its picture."""
        if not jobs:
            return
        hg = self.model
        span = hg.config.vq.num_image_tokens
        decoded = decode_image_ids(hg, torch.tensor([job.ids[:span] for job in jobs]))
        for job, (picture, codes) in zip(jobs, decoded, strict=True):
            _emit(job, ImageDone(picture, codes, _prompt_tokens(hg, job)))

    def _feed(self, job: Job, token: int) -> None:
        """Advance one job by its new token: stream text pieces, collect image codes, finish."""
        now = time.monotonic()
        labels = self.metrics.tokens.labels(self.name)
        labels.inc()
        if job.last_token_at is None:
            self.metrics.ttft.labels(self.name).observe(now - job.arrived)
        else:
            self.metrics.itl.labels(self.name).observe(now - job.last_token_at)
        job.last_token_at = now
        if job.is_image:
            job.ids.append(token)
            job.finished = len(job.ids) > self.model.config.vq.num_image_tokens  # the codes and the end token
            return
        if token in self._stops and not job.ignore_eos and len(job.ids) >= job.min_tokens:
            self._finish_text(job, "stop")
            return
        job.ids.append(token)
        if job.detokenizer is None:
            job.detokenizer = IncrementalDetokenizer(self.model.tokenizer)
        if delta := job.detokenizer.push(token):
            _emit(job, TextDelta(delta))
        if len(job.ids) >= job.budget:
            self._finish_text(job, "length")

    def _finish_text(self, job: Job, reason: str) -> None:
        job.finished = True
        if job.detokenizer is not None and (rest := job.detokenizer.flush()):
            _emit(job, TextDelta(rest))
        text = self.model.tokenizer.decode(job.ids, skip_special_tokens=True).strip()
        completion = len(job.ids) + (reason == "stop")
        _emit(job, TextDone(text, reason, _prompt_tokens(self.model, job), completion))


def _prompt_tokens(model: HealthGPT, job: Job) -> int:
    return model.prompt_length(job.request)


def _emit(job: Job, event: Event) -> None:
    if job.cancelled.is_set():
        return
    try:
        job.sink(event)
    except Exception:  # a closed event loop or a gone client must not stop the worker
        log.warning("could not deliver %s to a request", type(event).__name__, exc_info=True)
