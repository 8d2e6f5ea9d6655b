"""The HTTP server end to end: the real server in a subprocess on loopback with the nano model, driven by the
official `openai` client (and raw HTTP where the client cannot express a request). Answers are checked against
the same model called directly."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import openai
import pytest
from _serving import MODEL, free_port, image_question, png_bytes, thread_server
from PIL import Image
from pydicom.data import get_testdata_file

from healthgpt.api import HealthGPT
from healthgpt.evaluation.phantom_goals import held_out
from healthgpt.generation import SamplingParams, generate
from healthgpt.io import load_image
from healthgpt.serving.server import ServerOptions, create_app

KEY = "test-key"
QUESTIONS = ["What is this?", "Is there a lesion in this CT image?", "Describe the findings.", "How many lesions?"]
_SERVER = """
import json, sys
from _models import random_model
from healthgpt.serving.server import ServerOptions, serve
serve(random_model("nano", seed=0), "127.0.0.1", int(sys.argv[1]), ServerOptions(**json.loads(sys.argv[2])),
      log_level="warning")
"""


@contextmanager
def _server(log: Path, options: dict, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start the server in a subprocess and yield its base URL once /health answers."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k != "HEALTHGPT_API_KEY"} | (env or {})
    tests = str(Path(__file__).parent)  # the server models the `nano` fixture (tests/_models.py)
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests, environ.get("PYTHONPATH")) if p)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(port), json.dumps(options)], stdout=out, stderr=out, env=environ
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    """What the module's server prints (stdout and stderr)."""
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(server_log) -> Iterator[str]:
    with _server(server_log, {"max_body_bytes": 1_000_000, "max_tokens": 64}, env={"HEALTHGPT_API_KEY": KEY}) as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))


def _nifti(values: np.ndarray) -> bytes:
    return nib.Nifti1Image(values.astype(np.float32), np.eye(4)).to_bytes()


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_models_are_listed(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "healthgpt"


def test_a_chat_completion_with_an_image_answers_as_the_model_does_and_streams_the_same(client, nano):
    image = _image(0)
    expected = nano.ask(image, QUESTIONS[1], max_new_tokens=8)
    messages = image_question(_data_uri(png_bytes(image)), QUESTIONS[1])
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    choice = reply.choices[0]
    assert choice.message.content == expected and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = nano.build_request([{"role": "user", "content": QUESTIONS[1]}], [image]).input_ids
    assert reply.usage.prompt_tokens == len(prompt_ids) - 1 + nano.model.num_patches
    assert 1 <= reply.usage.completion_tokens <= 8

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # really streamed, token by token
    assert "".join(pieces).strip() == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_a_conversation_with_a_system_prompt_uses_both(client, nano):
    image = _image(1)
    turns = [
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": "A CT slice."},
        {"role": "user", "content": QUESTIONS[2]},
    ]
    request = nano.build_request(turns, [image], system="Answer briefly.", max_new_tokens=6)
    ids = generate(nano.model, [request], SamplingParams(max_new_tokens=6), stop_ids=nano.stop_ids, pad_id=nano.pad_id)
    expected = nano.tokenizer.decode([t for t in ids[0] if t not in nano.stop_ids], skip_special_tokens=True).strip()
    messages = [
        {"role": "system", "content": "Answer briefly."},
        image_question(_data_uri(png_bytes(image)), QUESTIONS[0])[0],
        *turns[1:],
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    assert reply.choices[0].message.content == expected
    default = client.chat.completions.create(model=MODEL, messages=messages[1:], max_tokens=6)
    assert default.usage.prompt_tokens != reply.usage.prompt_tokens  # the system prompt reached the model


def test_a_dicom_upload_is_read_with_its_window(client, nano):
    path = get_testdata_file("CT_small.dcm")
    expected = nano.ask(load_image(path).to_pil(), QUESTIONS[1], max_new_tokens=6)
    url = _data_uri(Path(path).read_bytes(), "application/dicom")
    reply = client.chat.completions.create(model=MODEL, messages=image_question(url, QUESTIONS[1]), max_tokens=6)
    assert reply.choices[0].message.content == expected


def test_an_image_edit_returns_the_generated_png(client, nano):
    image = _image(2)
    expected = nano.generate_image(image, "ct2mri", progress=False)
    result = client.images.edit(model=MODEL, image=("ct.png", png_bytes(image), "image/png"), prompt="ct2mri")
    assert result.data[0].revised_prompt == expected.instruction
    png = base64.b64decode(result.data[0].b64_json)
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.size == (64, 64) and result.size == "64x64"
    assert np.abs(np.asarray(picture.convert("RGB"), dtype=int) - np.asarray(expected.image, dtype=int)).max() <= 1


@pytest.mark.parametrize(
    ("fields", "with_image", "message"),
    [
        ({"prompt": "A normal chest.", "task": "report_to_cxr"}, True, "from the text alone: give no input image"),
        ({"prompt": "ct2mri"}, False, "transforms an image: give an input image"),
        ({"prompt": "ct2mri", "size": "256x256"}, True, "generates 64x64"),
        ({"prompt": "x", "task": "colorize"}, True, "unknown task"),
    ],
)
def test_image_edits_refuse_what_the_task_cannot_use(server, fields, with_image, message):
    files = {"image": ("ct.png", png_bytes(_image(0)), "image/png")} if with_image else None
    response = httpx.post(
        f"{server}/v1/images/edits",
        data={"model": MODEL, **fields},
        files=files,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_32_concurrent_requests_are_all_answered_as_the_model_answers_alone(server, nano):
    images = [_image(10 + i) for i in range(4)]
    cases = [(images[i % 4], f"{QUESTIONS[i // 4 % 4]} ({i})") for i in range(32)]
    uris = {id(im): _data_uri(png_bytes(im)) for im in images}

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300) as aclient:
            replies = await asyncio.gather(
                *[
                    aclient.chat.completions.create(model=MODEL, messages=image_question(uris[id(im)], q), max_tokens=6)
                    for im, q in cases
                ]
            )
        return [r.choices[0].message.content for r in replies]

    answers = asyncio.run(ask_all())
    assert answers == [nano.ask(im, q, max_new_tokens=6) for im, q in cases]


def _pixel_length(length: int) -> bytes:
    """pydicom's CT_small.dcm with the length field of its pixel data set to `length` (it holds 32768 bytes)."""
    data = bytearray(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    at = data.rfind(b"\xe0\x7f\x10\x00OW")  # the pixel data element: tag, VR, 2 reserved bytes, 4-byte length
    data[at + 8 : at + 12] = struct.pack("<I", length)
    return bytes(data)


def test_dicom_uploads_that_pydicom_warns_about_leave_no_raw_warning_in_the_server_log(client, nano, server_log):
    """A pixel-data length 10 bytes over what the file holds: pydicom decodes it and warns. Uploaded by 12 clients at
    once (decoded in the server's thread pool), every request is answered and the log holds no raw warning."""
    padded = _pixel_length(32778)
    expected = nano.ask(load_image(get_testdata_file("CT_small.dcm")).to_pil(), QUESTIONS[1], max_new_tokens=2)
    url = _data_uri(padded, "application/dicom")

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=client.base_url, api_key=KEY, max_retries=0, timeout=300) as aclient:
            messages = image_question(url, QUESTIONS[1])
            replies = await asyncio.gather(
                *[aclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=2) for _ in range(12)]
            )
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(ask_all()) == [expected] * 12
    log = server_log.read_text()
    assert "excess padding" not in log and "UserWarning" not in log and "warn_and_log" not in log


def _error(client, messages: list[dict]) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    return caught.value


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        (_data_uri(b"this is not a picture"), 400, "is not a PNG, JPEG, DICOM or NIfTI image"),
        ("data:image/png;base64,@@@", 400, "is not valid base64"),
        ("https://example.com/ct.png", 400, "remote image URLs are disabled"),
        ("file:///etc/passwd", 400, "never reads files from a request"),
        ("/etc/passwd", 400, "never reads files from a request"),
        (_data_uri(os.urandom(800_000)), 413, "accepts at most 1000000"),
        (_data_uri(png_bytes(Image.new("L", (20000, 1)))), 400, "would need 400000000 pixels"),  # its padded square
        (_data_uri(_nifti(np.full((2, 8, 8), np.nan)), "application/octet-stream"), 400, "no finite pixel value"),
        (
            _data_uri(_pixel_length(0x7FFFFFF0), "application/dicom"),
            400,
            "is truncated or corrupt: its pixel data declares 2147483632 bytes, the file holds 32906",
        ),
    ],
    ids=["malformed", "bad-base64", "remote", "file-url", "path", "over-size", "20000x1", "all-nan", "dicom-length"],
)
def test_bad_images_get_a_4xx_with_a_clear_message(client, url, status, message):
    error = _error(client, image_question(url, QUESTIONS[0]))
    assert error.status_code == status
    assert message in error.body["message"]
    if status == 400:
        assert error.body["param"] == "messages[0].content[0].image_url"


def test_too_many_pixels_are_refused_before_decoding(client):
    big = Image.new("L", (5000, 4000))  # 20 M pixels, a few kB as PNG
    error = _error(client, image_question(_data_uri(png_bytes(big)), QUESTIONS[0]))
    assert error.status_code == 400 and "more than the server's limit" in error.body["message"]


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        ([{"role": "tool", "content": "x"}], "messages[0].role", "Input should be"),
        (
            [{"role": "user", "content": "hi"}, *image_question("data:,", "again")],
            "messages[1].content[0].image_url",
            "first",
        ),
        ([{"role": "user", "content": " "}], "messages", "empty"),
    ],
)
def test_bad_conversations_get_a_400_naming_the_parameter(client, messages, param, message):
    error = _error(client, messages)
    assert error.status_code == 400 and error.body["param"] == param and message in error.body["message"]


def test_unknown_models_and_unsupported_options_are_named(client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="stop sequences"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stop=["."])


def test_the_api_key_is_required_on_the_api_only(server):
    assert httpx.get(f"{server}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_cors_is_off_by_default(server):
    origin = {"Origin": "https://example.com", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(f"{server}/v1/chat/completions", headers=origin).headers
    auth = {"Origin": "https://example.com", "Authorization": f"Bearer {KEY}"}
    assert "access-control-allow-origin" not in httpx.get(f"{server}/v1/models", headers=auth).headers


def test_a_full_queue_answers_503_and_a_late_answer_times_out(nano):
    app = create_app(nano, ServerOptions(max_batch_size=1, max_queue=1, request_timeout=3, batching="static"))
    batcher = app.state.healthgpt.batchers[MODEL]
    entered, release = threading.Event(), threading.Event()
    run = batcher.run

    def held_run(jobs):  # the worker takes the first request, then holds it until released
        entered.set()
        release.wait(60)
        run(jobs)

    batcher.run = held_run
    with thread_server(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        request = {"model": MODEL, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 8}
        running = client.chat.completions.create(**request, stream=True)
        assert entered.wait(60)
        waiting = client.chat.completions.create(**request, stream=True)  # admitted: it waits in the queue
        assert batcher.queued == 1
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**request)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["Retry-After"] == "1"
        assert caught.value.body["code"] == "queue_full"
        started = time.monotonic()
        with pytest.raises(openai.APIError, match="timeout"):
            list(running)
        assert time.monotonic() - started < 10
        release.set()
        waiting.close()
        running.close()


def test_min_tokens_and_ignore_eos_run_to_the_budget_and_metrics_count_them(client, server):
    def generated() -> float:
        text = httpx.get(f"{server}/metrics", timeout=10).text
        line = next(row for row in text.splitlines() if row.startswith("healthgpt_generated_tokens_total{"))
        return float(line.rsplit(" ", 1)[1])

    before = generated()
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is there a lesion?"}],
        max_tokens=40,
        extra_body={"min_tokens": 40, "ignore_eos": True},
    )
    assert reply.usage.completion_tokens == 40 and reply.choices[0].finish_reason == "length"
    assert generated() - before == 40
    text = httpx.get(f"{server}/metrics", timeout=10).text
    for name in ("healthgpt_queue_length", "healthgpt_running_rows"):
        assert f'{name}{{model="{MODEL}"}} 0.0' in text, name  # idle again
    counts = {
        name: float(next(r for r in text.splitlines() if r.startswith(f'{name}_count{{model="{MODEL}"}}')).split()[-1])
        for name in ("healthgpt_time_to_first_token_seconds", "healthgpt_inter_token_latency_seconds")
    }
    assert counts["healthgpt_time_to_first_token_seconds"] >= 1
    assert counts["healthgpt_inter_token_latency_seconds"] >= 39  # 40 tokens, 39 gaps in this request alone


def test_an_image_edit_without_a_scale_uses_the_models_guidance():
    """The shipped nano told to guide at 3: an edit naming no scale is the guided image, one naming 1 the plain one,
    and a scale of 0 is refused with the field's name."""
    model = HealthGPT.from_pretrained("nano")
    model.config = model.config.replace(guidance_scale=3.0)
    ct = held_out(1, seed=2, size=64)[0][0].rgb("ct")
    guided, plain = (model.generate_image(ct, "ct2mri", guidance_scale=s, progress=False).image for s in (3.0, 1.0))
    assert not np.array_equal(np.asarray(guided), np.asarray(plain))
    with thread_server(create_app(model)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        upload = ("ct.png", png_bytes(ct), "image/png")

        def edit(**extra) -> np.ndarray:
            result = client.images.edit(model=MODEL, image=upload, prompt="ct2mri", extra_body=extra)
            return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"), int)

        assert np.abs(edit() - np.asarray(guided, int)).max() <= 1
        assert np.abs(edit(guidance_scale=1) - np.asarray(plain, int)).max() <= 1
        with pytest.raises(openai.BadRequestError, match="guidance_scale must be a finite number above 0"):
            edit(guidance_scale=0)
