"""Continuous batching on the trained nano model: rows join and leave the running batch at every step, each answer
equals what `HealthGPT` gives alone, seeds reproduce, disconnects free their slot, admission is by cache capacity."""

from __future__ import annotations

import dataclasses
import queue
import time

import numpy as np
import pytest
import torch
from _models import random_model

from healthgpt.api import HealthGPT
from healthgpt.data.phantoms import sample_case
from healthgpt.serving.batcher import Failed, ImageDone, Job, QueueFullError, TextDelta, TextDone
from healthgpt.serving.continuous import ContinuousBatcher

QUESTIONS = ["Is there a lesion in this image?", "Which side is the lesion on?", "How many lesions are there?"]


@pytest.fixture(scope="module")
def nano() -> HealthGPT:
    return HealthGPT.from_pretrained("nano", enforce_eager=True)


@pytest.fixture(scope="module")
def phantoms():
    rng = np.random.default_rng(21)
    return [sample_case(rng, p_lesion=0.7) for _ in range(3)]


def _text_job(model: HealthGPT, question: str, image, *, max_tokens: int = 24, **extra) -> tuple[Job, queue.Queue]:
    events: queue.Queue = queue.Queue()
    sampling = model.sampling_params({"max_new_tokens": max_tokens, **extra.pop("sampling", {})})
    request = model.build_request([{"role": "user", "content": question}], [image] if image else [])
    return Job(request, sampling, events.put, **extra), events


def _image_job(model: HealthGPT, image, task: str, guidance: float = 1.0) -> tuple[Job, queue.Queue]:
    events: queue.Queue = queue.Queue()
    built = model.build_image_request(image, task, guided=guidance != 1.0)
    sampling = model.sampling_params({"max_new_tokens": model.config.vq.num_image_tokens + 1})
    return Job(built.request, sampling, events.put, built.unconditional, guidance), events


def _last(events: queue.Queue, timeout: float = 120):
    while True:
        event = events.get(timeout=timeout)
        if not isinstance(event, TextDelta):
            return event


@pytest.fixture
def batcher(nano):
    with ContinuousBatcher(nano, max_batch_size=6, max_model_len=1024) as b:
        yield b


def test_a_short_question_is_answered_within_a_few_steps_while_a_long_answer_runs(nano, phantoms, batcher):
    long_job, long_events = _text_job(nano, QUESTIONS[0], phantoms[0].rgb("ct"), max_tokens=900, min_tokens=900)
    long_job.ignore_eos = True
    batcher.submit(long_job)
    while len(long_job.ids) < 50:  # the long answer is well under way
        time.sleep(0.01)
    short_job, short_events = _text_job(nano, QUESTIONS[1], phantoms[1].rgb("mri"))
    at_arrival = len(long_job.ids)
    batcher.submit(short_job)
    done = _last(short_events)
    at_answer = len(long_job.ids)
    assert isinstance(done, TextDone) and done.text == nano.ask(phantoms[1].rgb("mri"), QUESTIONS[1])
    assert at_answer - at_arrival <= done.completion_tokens + 3, (at_arrival, at_answer)
    long_done = _last(long_events)
    assert (
        isinstance(long_done, TextDone) and long_done.completion_tokens == 900 and long_done.finish_reason == "length"
    )


def test_every_answer_equals_the_model_alone_with_mixed_plugins_and_image_rows(nano, phantoms, batcher):
    jobs = []
    for i, case in enumerate(phantoms):
        jobs.append(("text", case.rgb("ct"), QUESTIONS[i], *_text_job(nano, QUESTIONS[i], case.rgb("ct"))))
    ct = phantoms[0].rgb("ct")
    jobs.append(("image", ct, "ct2mri", *_image_job(nano, ct, "ct2mri")))
    jobs.append(("guided", ct, "ct2mri", *_image_job(nano, ct, "ct2mri", guidance=2.0)))
    jobs.append(("text-only", None, QUESTIONS[2], *_text_job(nano, QUESTIONS[2], None)))
    for *_, job, _ in jobs:
        batcher.submit(job)
    for kind, image, what, _, events in jobs:
        done = _last(events)
        if kind in ("image", "guided"):
            alone = nano.generate_image(image, what, guidance_scale=2.0 if kind == "guided" else None, progress=False)
            assert isinstance(done, ImageDone) and torch.equal(done.codes, alone.codes), kind
        else:
            assert isinstance(done, TextDone) and done.text == nano.ask(image, what, max_new_tokens=24), kind


def test_a_seeded_sampled_request_equals_ask_with_that_seed_beside_greedy_rows(nano, phantoms, batcher):
    image = phantoms[2].rgb("ct")
    settings = {"temperature": 1.0, "top_k": 40, "seed": 11}
    seeded, seeded_events = _text_job(nano, QUESTIONS[0], image, sampling=settings)
    greedy, greedy_events = _text_job(nano, QUESTIONS[1], image)
    batcher.submit(greedy, seeded)
    assert _last(seeded_events).text == nano.ask(image, QUESTIONS[0], max_new_tokens=24, **settings)
    assert _last(greedy_events).text == nano.ask(image, QUESTIONS[1], max_new_tokens=24)


def test_rows_with_their_own_settings_share_steps_and_a_freed_slot_starts_clean(phantoms):
    """Random weights (flat distributions, so settings change the answers); each row equals `ask` alone."""
    model = random_model(seed=4)
    image = phantoms[0].rgb("ct")
    settings = [  # (answer budget, sampling settings)
        (24, {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 5}),
        (12, {"repetition_penalty": 5.0}),
        (24, {"repetition_penalty": 5.0}),  # waits for a slot, then takes the one the short answer freed
    ]
    with ContinuousBatcher(model, max_batch_size=2, max_model_len=1024) as b:
        jobs = [_text_job(model, QUESTIONS[i], image, max_tokens=n, sampling=s) for i, (n, s) in enumerate(settings)]
        b.submit(*(job for job, _ in jobs))
        answers = [_last(events) for _, events in jobs]
        assert b.batch.window.rows <= 2 and b.batch.free_slots == 2
    for i, (done, (n, s)) in enumerate(zip(answers, settings, strict=True)):
        assert isinstance(done, TextDone) and done.text == model.ask(image, QUESTIONS[i], max_new_tokens=n, **s), s
    assert len({done.text for done in answers}) == 3


def test_requests_joining_together_are_prefilled_together_and_a_bad_one_fails_alone(nano, phantoms, batcher):
    image = phantoms[1].rgb("mri")
    good = [_text_job(nano, q, image) for q in QUESTIONS[:2]]
    bad, bad_events = _text_job(nano, QUESTIONS[2], image)
    bad.request = dataclasses.replace(bad.request, pixel_values=bad.request.pixel_values[:0])  # image slot, no image
    batcher.submit(good[0][0], bad, good[1][0])  # one step takes all three
    assert isinstance(_last(bad_events), Failed)
    for (_, events), question in zip(good, QUESTIONS, strict=False):
        done = _last(events)
        assert isinstance(done, TextDone) and done.text == nano.ask(image, question, max_new_tokens=24)
    assert batcher.batch.free_slots == batcher.max_batch_size


def test_a_cancelled_request_frees_its_slot_at_the_next_step(nano, phantoms, batcher):
    job, events = _text_job(nano, QUESTIONS[0], phantoms[0].rgb("ct"), max_tokens=900, min_tokens=900)
    batcher.submit(job)
    while len(job.ids) < 5:
        time.sleep(0.01)
    assert batcher.running == 1
    job.cancel()  # what the server does when the client disconnects
    deadline = time.monotonic() + 10
    while batcher.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.running == 0 and batcher.batch.free_slots == batcher.max_batch_size
    assert len(job.ids) < 900


def test_admission_is_by_cache_capacity_and_a_request_longer_than_a_slot_is_refused(nano, phantoms):
    with ContinuousBatcher(nano, max_batch_size=1, max_model_len=256, max_queue=100) as b:
        first, _ = _text_job(nano, QUESTIONS[0], None, max_tokens=200, min_tokens=200)
        b.submit(first)
        while not b.running:  # the one slot is taken; what follows waits in the queue
            time.sleep(0.01)
        waiting, _ = _text_job(nano, QUESTIONS[1], None, max_tokens=200)
        assert b.tokens_needed(waiting) > b.capacity // 2
        b.submit(waiting)  # books most of the cache's one turn
        with pytest.raises(QueueFullError, match="fully booked"):
            b.submit(_text_job(nano, QUESTIONS[1], None, max_tokens=200)[0])
        assert b.queued == 1
        too_long, _ = _text_job(nano, QUESTIONS[1], phantoms[0].rgb("ct"), max_tokens=400)
        with pytest.raises(ValueError, match="max-model-len"):
            b.submit(too_long)
        first.cancel()
        waiting.cancel()
