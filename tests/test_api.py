"""The `HealthGPT` facade on the nano model: batches equal single calls, streams join to answers, multi-turn chat
uses the history, bad calls raise named errors; `import healthgpt` stays cheap."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from healthgpt import GeneratedImage, HealthGPT, PromptError, PromptTooLongError, load_image

TOKENS = dict(max_new_tokens=10)


@pytest.fixture(scope="module")
def ct() -> Image.Image:
    return load_image(get_testdata_file("CT_small.dcm")).to_pil()


@pytest.fixture(scope="module")
def gradient() -> Image.Image:
    return Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))).convert("RGB")


def test_batched_ask_equals_individual_asks(nano: HealthGPT, ct: Image.Image, gradient: Image.Image) -> None:
    images = [ct, None, gradient, ct]
    questions = ["Is there a lesion?", "What is a CT scan?", "Describe the image.", "Which organ is shown here?"]
    batched = nano.ask(images, questions, **TOKENS)
    assert batched == [nano.ask(im, q, **TOKENS) for im, q in zip(images, questions, strict=True)]
    assert len(set(batched)) > 1  # the rows really differ, so a mixed-up batch would show


def test_one_image_or_question_is_shared_by_the_batch(nano: HealthGPT, ct: Image.Image, gradient: Image.Image) -> None:
    assert nano.ask(ct, ["Is there a lesion?", "Describe it."], **TOKENS) == [
        nano.ask(ct, "Is there a lesion?", **TOKENS),
        nano.ask(ct, "Describe it.", **TOKENS),
    ]
    assert nano.ask([ct, gradient], "Describe it.", **TOKENS) == [
        nano.ask(ct, "Describe it.", **TOKENS),
        nano.ask(gradient, "Describe it.", **TOKENS),
    ]


def test_stream_joins_to_the_answer_single_and_batched(nano: HealthGPT, ct: Image.Image) -> None:
    pieces = list(nano.stream(ct, "Is there a lesion?", **TOKENS))
    assert all(isinstance(p, str) for p in pieces) and len(pieces) > 1
    assert "".join(pieces).strip() == nano.ask(ct, "Is there a lesion?", **TOKENS)
    questions = ["Is there a lesion?", "What is a CT scan?"]
    rows = ["", ""]
    for row, piece in nano.stream([ct, None], questions, **TOKENS):
        rows[row] += piece
    assert [r.strip() for r in rows] == nano.ask([ct, None], questions, **TOKENS)


def test_chat_uses_the_history_and_batches(nano: HealthGPT, ct: Image.Image) -> None:
    first = [{"role": "user", "content": "Is there a lesion?"}]
    reply = nano.chat(first, ct, **TOKENS)
    assert reply == nano.ask(ct, "Is there a lesion?", **TOKENS)  # a one-turn chat is an ask
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Where is it?"}]
    follow_up = nano.chat(second, ct, **TOKENS)
    assert follow_up != nano.chat([{"role": "user", "content": "Where is it?"}], ct, **TOKENS)  # history matters
    assert "".join(nano.stream_chat(second, ct, **TOKENS)).strip() == follow_up
    assert nano.chat([second, first], [ct, ct], **TOKENS) == [follow_up, reply]


def test_generate_image_batch_equals_single_calls(nano: HealthGPT, ct: Image.Image, gradient: Image.Image) -> None:
    batch = nano.generate_image([ct, gradient], "ct2mri", progress=False)
    singles = [nano.generate_image(im, "ct2mri", progress=False) for im in (ct, gradient)]
    assert all(isinstance(g, GeneratedImage) for g in batch)
    for got, want in zip(batch, singles, strict=True):
        assert got.task == "ct2mri" and got.image.size == want.image.size
        assert np.array_equal(got.codes, want.codes)
        # the VQGAN decodes a batch with other float rounding; the uint8 cast may then differ by one level
        diff = np.abs(np.asarray(got.image, dtype=int) - np.asarray(want.image, dtype=int))
        assert diff.max() <= 1


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m, im: m.ask(im, "   "), PromptError, "question is empty"),
        (lambda m, im: m.ask([im, im], ["one question"]), ValueError, "2 images for 1"),
        (lambda m, im: m.ask(im, "word " * 3000), PromptTooLongError, "context is 1024 tokens"),
        (lambda m, im: m.ask(im, "Why?", temperature=-1), ValueError, "temperature must be >= 0"),
        (lambda m, im: m.ask(im, "Why?", max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
        (lambda m, im: m.ask(im, "Why?", top_p=1.5), ValueError, "top_p must be in"),
        (lambda m, im: m.stream(im, ""), PromptError, "question is empty"),  # raised at the call, not when iterated
        (lambda m, im: m.chat([]), PromptError, "question is empty"),
        (lambda m, im: m.chat([[{"role": "user", "content": "Hi"}]] * 2, [im]), ValueError, "1 images for 2"),
        (lambda m, im: m.ask(Image.new("I;16", (8, 8)), "Why?"), ValueError, "16-bit"),
        (lambda m, im: m.generate_image(None, "ct2mri"), ValueError, "transforms an image: give an input image"),
        (lambda m, im: m.generate_image(None, "report_to_cxr"), ValueError, "needs text"),
        (lambda m, im: m.generate_image(im, "  "), ValueError, "empty instruction"),
    ],
)
def test_bad_calls_raise_named_errors(nano: HealthGPT, ct: Image.Image, call, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call(nano, ct)


def test_import_is_cheap_and_names_load_on_use() -> None:
    code = (
        "import sys, healthgpt\n"
        "assert {'HealthGPT', 'load_image', 'GeneratedImage'} <= set(dir(healthgpt))\n"
        "healthgpt.load_image\n"
        "assert not {'torch', 'transformers'} & set(sys.modules), 'import healthgpt loaded torch'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import healthgpt
    import healthgpt.api

    assert healthgpt.HealthGPT is healthgpt.api.HealthGPT
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        healthgpt.nothing_here  # noqa: B018
