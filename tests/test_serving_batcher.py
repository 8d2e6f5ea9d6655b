"""The dynamic batcher in-process: mixed comprehension/generation batches give what the model gives alone, streams
add up to the answer, the queue is bounded, cancelled and expired jobs are dropped."""

from __future__ import annotations

import dataclasses
import queue
import time

import numpy as np
import pytest
import torch
from _models import random_model
from PIL import Image

from healthgpt.config import GENERATION, get_variant
from healthgpt.generation import SamplingParams
from healthgpt.serving.batcher import (
    Batcher,
    Failed,
    ImageDone,
    Job,
    JobTimeoutError,
    QueueFullError,
    TextDelta,
    TextDone,
    batch_key,
)
from healthgpt.tasks import TASKS

QUESTIONS = ["What is this?", "Is there a lesion in this CT image?", "Describe the findings.", "How many lesions?"]


@pytest.fixture(scope="module")
def model():
    """Nano with a 4x4 code grid (quick image spans) and plugins that really differ (non-zero B matrices)."""
    nano = get_variant("nano")
    return random_model(nano.replace(vq=dataclasses.replace(nano.vq, image_size=32)), seed=1)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 60), dtype=np.uint8))


def _text_job(model, question: str, image: Image.Image | None, **sampling) -> tuple[Job, queue.Queue]:
    events: queue.Queue = queue.Queue()
    params = SamplingParams(**{"max_new_tokens": 6, **sampling})
    request = model.build_request(
        [{"role": "user", "content": question}], [image] if image else [], max_new_tokens=params.max_new_tokens
    )
    return Job(request, params, events.put), events


def _image_job(model, image: Image.Image) -> tuple[Job, queue.Queue]:
    events: queue.Queue = queue.Queue()
    span = model.config.vq.num_image_tokens
    request = model.build_request(
        [{"role": "user", "content": TASKS["ct2mri"].instruction}],
        [image],
        plugin=GENERATION,
        image_generation=True,
        max_new_tokens=span + 1,
    )
    return Job(request, SamplingParams(max_new_tokens=span + 1), events.put), events


def _drain(events: queue.Queue) -> tuple[list, object]:
    """(text deltas, the final event)."""
    deltas = []
    while isinstance(event := events.get(timeout=60), TextDelta):
        deltas.append(event.text)
    return deltas, event


def test_a_mixed_batch_gives_what_each_request_gives_alone(model):
    images = [_image(i) for i in range(len(QUESTIONS))]
    expected = [model.ask(im, q, max_new_tokens=6) for im, q in zip(images, QUESTIONS, strict=True)]
    expected_image = model.generate_image(images[0], "ct2mri", progress=False)
    batcher = Batcher(model, max_wait=0.5)
    sizes: list[tuple[int, int]] = []
    run = batcher.run
    batcher.run = lambda jobs: (sizes.append((len(jobs), sum(j.is_image for j in jobs))), run(jobs))[1]
    text = [_text_job(model, q, im) for q, im in zip(QUESTIONS, images, strict=True)]
    picture = _image_job(model, images[0])
    with batcher:
        batcher.submit(*[job for job, _ in text], picture[0])
        finals = [_drain(events) for _, events in text]
        _, done = _drain(picture[1])
    assert sizes == [(5, 1)]  # one forward pass for all five rows, one of them on the generation plugin
    # (text rows beside an image row may not open image spans; alone, greedy, these answers never do)
    for (deltas, final), answer in zip(finals, expected, strict=True):
        assert isinstance(final, TextDone) and final.text == answer
        assert "".join(deltas).strip() == answer
        assert final.finish_reason in ("stop", "length") and final.completion_tokens <= 6
    assert isinstance(done, ImageDone)
    assert torch.equal(done.codes, expected_image.codes)
    assert np.abs(np.asarray(done.image, dtype=int) - np.asarray(expected_image.image, dtype=int)).max() <= 1


def test_the_token_budget_ends_an_answer_with_finish_reason_length(model):
    job, events = _text_job(model, QUESTIONS[0], _image(0), max_new_tokens=3)
    with Batcher(model) as batcher:
        batcher.submit(job)
        _, final = _drain(events)
    assert isinstance(final, TextDone)
    assert (final.finish_reason, final.completion_tokens) == ("length", 3)
    assert final.prompt_tokens == len(job.request.input_ids) - 1 + model.model.num_patches


def test_seeded_sampling_runs_alone_and_reproduces_ask(model):
    sampling = {"temperature": 1.0, "top_p": 0.9, "seed": 7}
    expected = model.ask(_image(1), QUESTIONS[1], max_new_tokens=6, **sampling)
    jobs = [_text_job(model, QUESTIONS[1], _image(1), **sampling) for _ in range(2)]
    assert batch_key(jobs[0][0]) != batch_key(jobs[1][0])
    with Batcher(model, max_wait=0.2) as batcher:
        batcher.submit(*[job for job, _ in jobs])
        assert [_drain(events)[1].text for _, events in jobs] == [expected, expected]


def test_batch_keys_group_by_sampling_settings(model):
    greedy = _text_job(model, "a", None)[0]
    assert batch_key(greedy) == batch_key(_text_job(model, "b", None, seed=3)[0])  # greedy ignores the seed
    assert batch_key(greedy) == batch_key(_image_job(model, _image(0))[0])  # text and image rows mix
    assert batch_key(greedy) != batch_key(_text_job(model, "a", None, temperature=0.7)[0])
    assert batch_key(greedy) != batch_key(_text_job(model, "a", None, repetition_penalty=1.3)[0])
    guided = _image_job(model, _image(0))[0]
    guided.guidance_scale = 3.0
    assert batch_key(guided) != batch_key(greedy)


def test_a_full_queue_refuses_all_of_a_submission(model):
    batcher = Batcher(model, max_queue=2)
    batcher._thread = object()  # accept submissions without a worker taking them
    batcher.submit(_text_job(model, "a", None)[0])
    with pytest.raises(QueueFullError, match="at most 2"):
        batcher.submit(*[_text_job(model, "b", None)[0] for _ in range(2)])
    assert batcher.queued == 1


def test_cancelled_and_expired_jobs_are_dropped_before_they_run(model):
    cancelled, cancelled_events = _text_job(model, "a", None)
    cancelled.cancel()
    expired, expired_events = _text_job(model, "b", None)
    expired.deadline = time.monotonic() - 1
    live, live_events = _text_job(model, QUESTIONS[0], None, max_new_tokens=2)
    with Batcher(model, max_wait=0.2) as batcher:
        batcher.submit(cancelled, expired, live)
        assert isinstance(_drain(live_events)[1], TextDone)
    assert cancelled_events.empty()
    failure = expired_events.get_nowait()
    assert isinstance(failure, Failed) and isinstance(failure.error, JobTimeoutError)


def test_closing_fails_queued_jobs_and_refuses_new_ones(model):
    batcher = Batcher(model)
    batcher._thread = object()
    job, events = _text_job(model, "a", None)
    batcher.submit(job)
    batcher._thread = None
    batcher.close()
    assert isinstance(events.get_nowait(), Failed)
    with pytest.raises(RuntimeError, match="not running"):
        batcher.submit(_text_job(model, "b", None)[0])
