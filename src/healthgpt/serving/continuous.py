"""Continuous batching for the server: the worker schedules per iteration over KV-cache slots (`SlotBatch`), so
requests join the running batch at the next step and leave it at the step they end, whatever their plugin, sampling
settings or kind (text, image, guided image). Admission is by cache capacity; cancelled, disconnected and expired
requests free their slot at the next step."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from ..api import HealthGPT
from ..generation.slots import Admission, Row, SlotBatch, positions_needed
from .batcher import Batcher, BatcherClosedError, Failed, Job, JobTimeoutError, QueueFullError, _emit
from .metrics import ServingMetrics

log = logging.getLogger(__name__)


class ContinuousBatcher(Batcher):
    """`Batcher`'s interface with iteration-level scheduling: `max_batch_size` slots of `max_model_len` positions
    (default: the model's context). Queued requests may reserve at most one full turn of the cache
    (slots x length tokens of prompt and answer); beyond that, or `max_queue` requests, `submit` refuses.
    At most `max_prefills_per_step` requests join per step, prefilled together in one forward between steps."""

    def __init__(
        self,
        model: HealthGPT,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_model_len: int | None = None,
        max_prefills_per_step: int = 4,
        name: str = "healthgpt",
        metrics: ServingMetrics | None = None,
    ) -> None:
        super().__init__(
            model, max_batch_size=max_batch_size, max_wait=0.0, max_queue=max_queue, name=name, metrics=metrics
        )
        context = model.model.llm.config.max_position_embeddings
        self.max_len = min(max_model_len or context, context)
        self.max_prefills_per_step = max_prefills_per_step
        self.batch: SlotBatch | None = None
        self._jobs: dict[int, Job] = {}  # Row.id -> job

    @property
    def capacity(self) -> int:
        """Tokens the cache holds: slots x length."""
        return self.max_batch_size * self.max_len

    @property
    def running(self) -> int:
        """Requests being decoded now."""
        return len(self._jobs)

    def tokens_needed(self, job: Job) -> int:
        """Positions the job's longest row needs: prompt plus answer budget."""
        return positions_needed(self.model.model, job.request, job.unconditional, job.budget)

    def submit(self, *jobs: Job) -> None:
        """Queue jobs (all or none): a job longer than a slot is a `ValueError`; a full cache or queue a
        `QueueFullError` (the server's 503 with Retry-After)."""
        needed = [self.tokens_needed(job) for job in jobs]
        for need in needed:
            if need > self.max_len:
                raise ValueError(
                    f"the prompt and the answer budget need {need} positions but this server holds {self.max_len} "
                    "per request (--max-model-len): shorten the prompt or lower max_tokens"
                )
        with self._ready:
            reserved = sum(self.tokens_needed(job) for job in self._queue)
            if reserved + sum(needed) > self.capacity:
                raise QueueFullError(
                    f"{self.name}'s cache is fully booked ({reserved} of {self.capacity} positions queued); retry "
                    "shortly"
                )
        super().submit(*jobs)

    # ----- worker ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        hg = self.model
        self.batch = SlotBatch(hg.model, self.max_batch_size, self.max_len, stop_ids=hg.stop_ids, pad_id=hg.pad_id)
        while not self._closed:
            self._admit()
            self._gauge()
            if not self._jobs:
                with self._ready:
                    while not self._queue and not self._closed:
                        self._ready.wait()
                continue
            try:
                produced = self.batch.step()
            except Exception as exc:  # a failing step fails its requests, never the worker
                log.exception("decode step of %d requests failed", len(self._jobs))
                self._fail_running(exc)
                continue
            self._deliver(produced)
            self._drop_expired()
            self._gauge()
        self._fail_running(BatcherClosedError("the server is shutting down"))

    def _gauge(self) -> None:
        self.metrics.queued.labels(self.name).set(len(self._queue))
        self.metrics.running.labels(self.name).set(len(self._jobs))

    def _admit(self) -> None:
        """Move queued jobs into free slots (in arrival order, at most `max_prefills_per_step`), prefilling them
        together."""
        taken: list[Job] = []
        free = self.batch.free_slots
        with self._ready:
            while self._queue and len(taken) < self.max_prefills_per_step:
                job = self._queue[0]
                if job.cancelled.is_set() or (job.deadline is not None and time.monotonic() > job.deadline):
                    self._queue.popleft()
                    if not job.cancelled.is_set():
                        _emit(job, Failed(JobTimeoutError("the request timed out while queued")))
                    continue
                need = 1 if job.unconditional is None else 2
                if need > free:
                    break
                free -= need
                taken.append(self._queue.popleft())
        if taken:
            self._join(taken)

    def _join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` together; if that fails, one at a time, so a bad prompt fails its own request only."""
        joining = [
            Admission(job.request, job.sampling, job.unconditional, job.guidance_scale, job.min_tokens, job.ignore_eos)
            for job in jobs
        ]
        try:
            rows = self.batch.admit(*joining)
        except Exception as exc:
            if len(jobs) > 1:
                for job in jobs:
                    self._join([job])
                return
            log.exception("prefill failed")
            jobs[0].finished = True
            _emit(jobs[0], Failed(exc))
            return
        for job, row in zip(jobs, rows, strict=True):
            self._jobs[row.id] = job

    def _deliver(self, produced: Sequence[tuple[Row, int]]) -> None:
        """Send each job its token; finished image jobs get their picture; ended or idle jobs leave the batch."""
        images = []
        with self._tokenizer_lock:
            for row, token in produced:
                job = self._jobs[row.id]
                if not job.idle:
                    self._feed(job, token)
                    if job.finished and job.is_image:
                        images.append(job)
                if row.finished or job.idle:
                    self._leave(row)
        self.emit_images(images)

    def _leave(self, row: Row) -> None:
        self.batch.release(row)
        self._jobs.pop(row.id, None)

    def _drop_expired(self) -> None:
        """Free the slots of cancelled (disconnected) and expired jobs now."""
        now = time.monotonic()
        for row in list(self.batch.rows):
            job = self._jobs[row.id]
            if not job.cancelled.is_set() and job.deadline is not None and now > job.deadline:
                _emit(job, Failed(JobTimeoutError("the request ran past its deadline")))
                job.cancel()
            if job.idle:
                self._leave(row)

    def _fail_running(self, exc: BaseException) -> None:
        for row in list(self.batch.rows if self.batch else []):
            job = self._jobs.get(row.id)
            if job is not None and not job.idle:
                job.finished = True
                _emit(job, Failed(exc))
            self._leave(row)
