"""Our loader reproduces what the published HealthGPT code computes on tiny M3-shaped files (fp32):
prompt ids, pixel values, CLIP and projected features, every logits row and the greedy tokens.
The expected values were recorded from the published code itself (shared/fixtures/published-m3-comprehension)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from healthgpt.api import HealthGPT
from healthgpt.generation import SamplingParams, StaticEngine, stream
from healthgpt.vision import project_images


@pytest.fixture(scope="module")
def m3(published) -> HealthGPT:
    return HealthGPT.from_pretrained(
        "m3",
        base_model=published / "tiny_phi3",
        vision_tower=published / "tiny_clip",
        plugin_files={"comprehension": published / "case_a_m3_com" / "com_hlora_weights.bin"},
        dtype="float32",
    )


@pytest.fixture(scope="module")
def engines(m3) -> dict[str, StaticEngine | None]:
    """The eager path and the compiled static-cache engine (compiled once for the module)."""
    return {"eager": None, "compiled": StaticEngine(m3.model)}


def _steps(model: HealthGPT, request, max_new_tokens: int, engine: StaticEngine | None = None):
    params = SamplingParams(max_new_tokens=max_new_tokens)
    kw = dict(stop_ids=model.stop_ids, pad_id=model.pad_id, return_logits=True, engine=engine)
    return list(stream(model.model, [request], params, **kw))


def test_vocabulary_has_published_image_tokens_and_mean_rows(m3):
    vocab = m3.model.image_vocab
    assert (vocab.start_id, vocab.first_code_id, vocab.end_id, vocab.newline_id) == (523, 524, 8716, 8717)
    head = m3.model.llm.get_output_embeddings().weight
    assert head.shape[0] == 8718
    mean = head[:523].mean(0)
    torch.testing.assert_close(head[523:], mean.expand(8718 - 523, -1))


@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("case", ["image", "text_only"])
def test_prompt_logits_and_greedy_tokens_match_published(m3, published, engines, case, path):
    folder = published / "case_a_m3_com" / ("text_only" if case == "text_only" else "")
    expected = json.loads((folder / "outputs.json").read_text())
    images = [Image.open(published / "input_image.png")] if case == "image" else []
    request = m3.build_request([{"role": "user", "content": expected["question"]}], images)
    assert request.input_ids == expected["input_ids"]

    steps = _steps(m3, request, max_new_tokens=16, engine=engines[path])
    tokens = [int(s.tokens[0]) for s in steps]
    assert tokens == expected["output_ids"]  # the text-only case ends with eos 519, as published
    logits = np.stack([s.logits[0].numpy() for s in steps])
    np.testing.assert_allclose(logits[0], np.load(folder / "prefill_last_logits.npy"), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, np.load(folder / "greedy_logits_per_step.npy"), atol=1e-4, rtol=0)


def test_pixels_and_features_match_published(m3, published):
    pixels = m3.preprocessor([Image.open(published / "input_image.png")])
    np.testing.assert_allclose(pixels.numpy(), np.load(published / "input_pixel_values.npy"), atol=1e-6, rtol=0)
    feats = m3.model.vision.features(pixels, [-2])[-2][0]
    expected_feats = np.load(published / "case_a_m3_com" / "vision_features.npy")
    np.testing.assert_allclose(feats.numpy(), expected_feats, atol=1e-5, rtol=0)
    with torch.no_grad():
        model = m3.model
        projected = project_images(model.vision, model.projectors, model.vision_layers, pixels, ["comprehension"])
    expected_proj = np.load(published / "case_a_m3_com" / "image_features.npy")
    np.testing.assert_allclose(projected[0].numpy(), expected_proj, atol=1e-5, rtol=0)


def test_answers_are_cut_at_stop_tokens_not_by_characters(m3, published):
    """The published script drops 8 characters; we cut at the stop token, so the text-only answer is the same and
    the max-token-limited image answer keeps its last 8 characters."""
    text_only = json.loads((published / "case_a_m3_com" / "text_only" / "outputs.json").read_text())
    assert m3.ask(None, text_only["question"], max_new_tokens=16) == text_only["stdout"].split("HealthGPT: ")[1].strip()
    image_case = json.loads((published / "case_a_m3_com" / "outputs.json").read_text())
    answer = m3.ask(Image.open(published / "input_image.png"), image_case["question"], max_new_tokens=16)
    assert answer == image_case["decoded_skip_special"].strip()
