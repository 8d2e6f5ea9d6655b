"""The compiled static-cache decode engine: token for token the eager path's output (greedy, fp32, CPU), bounded
compilation, per-row plugin tensors, code-rows-only head, and thread safety of one shared model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from _models import random_model
from PIL import Image

from healthgpt.api import HealthGPT
from healthgpt.config import COMPREHENSION, GENERATION
from healthgpt.data.phantoms import sample_case
from healthgpt.generation import SamplingParams, StaticEngine, generate, head_logits
from healthgpt.generation.decoders import LENGTH_BUCKET, _length_bucket, _row_bucket


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def small() -> tuple[HealthGPT, StaticEngine]:
    """A random model of the nano shapes with non-zero adapters (the plugins really differ), and its engine."""
    model = random_model(seed=5)
    return model, StaticEngine(model.model)


@pytest.fixture(scope="module")
def trained() -> HealthGPT:
    """The shipped, trained nano model on the compiled path."""
    return HealthGPT.from_pretrained("nano", enforce_eager=False)


def _both(model: HealthGPT, engine: StaticEngine, requests, sampling: SamplingParams, **kw):
    common = {"stop_ids": model.stop_ids, "pad_id": model.pad_id, **kw}
    eager = generate(model.model, requests, sampling, **common)
    compiled = generate(model.model, requests, sampling, engine=engine, **common)
    return eager, compiled


def test_buckets_round_rows_to_powers_of_two_and_length_to_its_step():
    assert [_row_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert [_length_bucket(n) for n in (1, LENGTH_BUCKET, LENGTH_BUCKET + 1)] == [
        LENGTH_BUCKET,
        LENGTH_BUCKET,
        2 * LENGTH_BUCKET,
    ]


def test_compiled_equals_eager_on_the_trained_nano_model(trained):
    phantom = sample_case(np.random.default_rng(11), p_lesion=1.0).rgb("ct")
    questions = ["Is there a lesion in this image?", "Which side is the lesion on?", "How many lesions are there?"]
    for q in questions:
        request = trained.build_request([{"role": "user", "content": q}], [phantom])
        eager, compiled = _both(trained, trained.generation_kwargs()["engine"], [request], SamplingParams(24))
        assert compiled == eager and len(eager[0]) >= 2
    assert trained.compiled and trained.ask(phantom, questions[0]) == HealthGPT.from_pretrained(
        "nano", enforce_eager=True
    ).ask(phantom, questions[0])


def test_compiled_equals_eager_at_batch_one_without_a_stop(small):
    model, engine = small
    request = model.build_request([{"role": "user", "content": "Describe the lesion."}], [_image(1)])
    eager, compiled = _both(model, engine, [request], SamplingParams(40), stop_ids=[])
    assert compiled == eager and len(eager[0]) == 40


def test_compiled_equals_eager_on_a_mixed_batch_of_8_with_both_plugins_image_spans_and_guidance(small):
    model, engine = small
    span = model.config.vq.num_image_tokens
    requests, twins = [], []
    for i in range(8):
        generating = i % 2 == 1
        content = f"Question {i}: is there a lesion{' on the left' * i}?"
        plugin = GENERATION if generating else COMPREHENSION
        requests.append(
            model.build_request(
                [{"role": "user", "content": content}], [_image(i)], plugin=plugin, image_generation=generating
            )
        )
        twins.append(
            model.build_request([{"role": "user", "content": content}], plugin=plugin, image_generation=generating)
        )
    eager, compiled = _both(
        model, engine, requests, SamplingParams(span + 1), unconditional=twins, guidance_scale=2.5, stop_ids=[]
    )
    assert compiled == eager
    vocab = model.model.image_vocab
    for row in eager[1::2]:  # image rows: exactly the span's codes, then the end token
        assert len(row) == span + 1 and row[-1] == vocab.end_id
        assert all(vocab.first_code_id <= t < vocab.first_code_id + vocab.num_codes for t in row[:-1])


def test_seeded_sampling_on_the_compiled_path_is_reproducible(small):
    model, engine = small
    request = model.build_request([{"role": "user", "content": "Is there a lesion?"}], [_image(2)])
    kw = dict(stop_ids=[], pad_id=model.pad_id, engine=engine)
    params = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    a = generate(model.model, [request], SamplingParams(**params, seed=7), **kw)
    b = generate(model.model, [request], SamplingParams(**params, seed=7), **kw)
    c = generate(model.model, [request], SamplingParams(**params, seed=8), **kw)
    assert a == b and a != c


def test_runs_within_one_bucket_reuse_the_compiled_step(small):
    """Different prompt lengths, answer budgets and row counts that fall in the same buckets compile nothing new."""
    model, engine = small
    kw = dict(stop_ids=[], pad_id=model.pad_id, engine=engine)
    first = model.build_request([{"role": "user", "content": "Is there a lesion?"}], [_image(3)])
    generate(model.model, [first], SamplingParams(8), **kw)  # warm this bucket
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    longer = model.build_request([{"role": "user", "content": "Is there a lesion in the left lung, or not?"}])
    generate(model.model, [longer], SamplingParams(20), **kw)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_a_tensor_of_plugin_indices_equals_the_per_sample_selection():
    model = random_model(seed=2)
    hlora = model.model.hlora
    x = torch.randn(4, 3, model.model.llm.config.hidden_size)
    layer = next(iter(hlora.layers.values()))
    names = (COMPREHENSION, GENERATION, GENERATION, COMPREHENSION)
    with torch.no_grad(), hlora.use(names):
        expected = layer(x)
    index = torch.tensor([hlora.plugin_names.index(n) for n in names])
    with torch.no_grad(), hlora.use(index):
        got = layer(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(expected[0], layer.base_layer(x)[0])  # the adapters really act


def test_code_rows_only_head_equals_the_full_head_on_the_code_columns():
    model = random_model(seed=3)
    hidden = torch.randn(3, model.model.llm.config.hidden_size)
    v = model.model.image_vocab
    with torch.no_grad():
        full = head_logits(model.model, hidden, GENERATION, codes_only=False)
        codes = head_logits(model.model, hidden, GENERATION, codes_only=True)
    code_cols = slice(v.first_code_id, v.first_code_id + v.num_codes)
    torch.testing.assert_close(codes[:, code_cols], full[:, code_cols])
    assert torch.isinf(codes[:, : v.first_code_id]).all() and torch.isinf(codes[:, v.end_id]).all()


@pytest.mark.parametrize("eager", [True, False])
def test_two_threads_on_one_model_get_the_answers_each_gets_alone(trained, eager):
    model = HealthGPT.from_pretrained("nano", enforce_eager=True) if eager else trained
    phantom = sample_case(np.random.default_rng(12), p_lesion=1.0).rgb("mri")
    alone_text = model.ask(phantom, "Is there a lesion in this image?")
    alone_codes = model.generate_image(phantom, "mri2ct", progress=False).codes
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def ask() -> None:
        barrier.wait()
        results["text"] = [model.ask(phantom, "Is there a lesion in this image?") for _ in range(3)]

    def draw() -> None:
        barrier.wait()
        results["codes"] = model.generate_image(phantom, "mri2ct", progress=False).codes

    threads = [threading.Thread(target=ask), threading.Thread(target=draw)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["text"] == [alone_text] * 3
    assert torch.equal(results["codes"], alone_codes)
