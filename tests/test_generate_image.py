"""Image generation through the shared loop: exact code spans, text-to-image, batching, seeds, guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import random_model
from conftest import turns
from PIL import Image

from healthgpt.api import HealthGPT
from healthgpt.evaluation.phantom_goals import held_out
from healthgpt.generation import SamplingParams, stream
from healthgpt.tasks import TASKS
from healthgpt.templates import chat_prompt


@pytest.fixture(scope="module")
def model():
    return random_model(seed=1)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 60), dtype=np.uint8))


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_p": 0.9, "seed": 4}])
@pytest.mark.parametrize("batch", [1, 4])
def test_every_image_has_the_full_grid_of_codes(model, sampling, batch):
    out = model.generate_image([_image(i) for i in range(batch)], "ct2mri", progress=False, **sampling)
    grid = model.config.vq.grid
    size = model.config.vq.image_size
    assert len(out) == batch
    for g in out:
        assert g.codes.shape == (grid, grid)
        assert 0 <= int(g.codes.min()) and int(g.codes.max()) < model.config.vq.num_codes
        assert g.image.size == (size, size) and g.image.mode == "RGB"
        # The picture is the VQGAN decode of the codes (batched convolutions may move a pixel by one 8-bit level).
        alone = np.asarray(model.vqgan.codes_to_pil(g.codes[None])[0]).astype(int)
        assert np.abs(np.asarray(g.image).astype(int) - alone).max() <= 1


def test_codes_are_the_generated_token_ids_minus_the_first_code_id(model):
    vocab = model.model.image_vocab
    span = model.config.vq.num_image_tokens
    req = model.build_image_request(_image(0), "reconstruct").request
    params = SamplingParams(max_new_tokens=span + 1)
    tokens = [
        int(s.tokens[0]) for s in stream(model.model, [req], params, stop_ids=model.stop_ids, pad_id=model.pad_id)
    ]
    assert len(tokens) == span + 1 and tokens[span] == vocab.end_id  # the row stops when its span closes
    g = model.generate_image(_image(0), "reconstruct", progress=False)
    assert g.codes.flatten().tolist() == [t - vocab.first_code_id for t in tokens[:span]]


def test_never_crashes_whatever_the_llm_prefers(model):
    """Even when the LLM strongly prefers to stop (end/stop tokens boosted), the span has exactly the grid."""
    vocab = model.model.image_vocab
    boost = torch.zeros(model.model.llm.get_output_embeddings().weight.shape[0])
    boost[[vocab.end_id, vocab.start_id, *model.stop_ids]] = 1e4
    handle = model.model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: o + boost)
    try:
        g = model.generate_image(_image(3), "mri2ct", progress=False)
    finally:
        handle.remove()
    assert g.codes.numel() == model.config.vq.num_image_tokens


def test_text_alone_gives_an_image(model):
    g = model.generate_image(None, "report_to_cxr", text="Mild cardiomegaly. No effusion.", progress=False)
    assert g.image.size == (model.config.vq.image_size,) * 2
    assert g.instruction == "Mild cardiomegaly. No effusion."
    with pytest.raises(ValueError, match="needs text"):
        model.generate_image(None, "report_to_cxr", progress=False)
    with pytest.raises(ValueError, match="transforms an image: give an input image"):
        model.generate_image(None, "ct2mri", progress=False)


def test_same_seed_same_image_and_batched_greedy_equals_unbatched(model):
    kw = dict(temperature=1.0, top_k=50, seed=11, progress=False)
    a = model.generate_image(_image(5), "super_resolution", **kw)
    b = model.generate_image(_image(5), "super_resolution", **kw)
    assert torch.equal(a.codes, b.codes)
    images = [_image(6), _image(7), _image(8)]
    batched = model.generate_image(images, "reconstruct", progress=False)
    for im, g in zip(images, batched, strict=True):
        assert torch.equal(g.codes, model.generate_image(im, "reconstruct", progress=False).codes)


def test_guidance_combines_conditional_and_unconditional_logits(model):
    built = model.build_image_request(_image(2), "ct2mri", guided=True)
    cond, uncond = built.request, built.unconditional
    assert uncond.pixel_values is None and built.instruction == TASKS["ct2mri"].instruction
    # The production prompt path: the instruction after one image slot, ending with the start-of-image token.
    words, system = turns(TASKS["ct2mri"].instruction), model.config.system_prompt
    with_image = chat_prompt(model.template, words, num_images=1, system=system, image_generation=True)
    assert with_image.endswith("<image>\n" + built.instruction + "<|end|>\n<|assistant|>\n<start_index>")
    assert cond.input_ids == model.prompts.encode_prompt(with_image)
    without = chat_prompt(model.template, words, num_images=0, system=system, image_generation=True)
    assert uncond.input_ids == model.prompts.encode_prompt(without) and "<image>" not in without
    kw = dict(stop_ids=model.stop_ids, pad_id=model.pad_id, return_logits=True)
    params = SamplingParams(max_new_tokens=1)
    c = next(stream(model.model, [cond], params, **kw)).logits
    u = next(stream(model.model, [uncond], params, **kw)).logits
    guided = next(stream(model.model, [cond], params, unconditional=[uncond], guidance_scale=3.0, **kw)).logits
    torch.testing.assert_close(guided, u + 3.0 * (c - u), atol=1e-4, rtol=1e-4)
    g = model.generate_image(_image(2), "ct2mri", guidance_scale=3.0, progress=False)
    assert g.codes.numel() == model.config.vq.num_image_tokens


def test_report_to_image_refuses_an_input_image(model):
    with pytest.raises(ValueError, match="makes an image from the text alone"):
        model.generate_image(_image(0), "report_to_cxr", text="Normal chest.", progress=False)


def test_a_model_samples_with_its_own_guidance_where_a_call_names_none():
    """`config.guidance_scale` is the scale of every call without one: the same codes as naming it. The shipped nano,
    on phantom CTs (a random model's code logits tie, so guidance would move no argmax there)."""
    nano = HealthGPT.from_pretrained("nano")
    cts = [case.rgb("ct") for case in held_out(3, seed=1, size=64)[0]]
    plain = nano.generate_image(cts, "ct2mri", progress=False)
    guided = nano.generate_image(cts, "ct2mri", guidance_scale=3.0, progress=False)
    assert any(not torch.equal(g.codes, p.codes) for g, p in zip(guided, plain, strict=True))
    nano.config = nano.config.replace(guidance_scale=3.0)
    default = nano.generate_image(cts, "ct2mri", progress=False)
    assert all(torch.equal(d.codes, g.codes) for d, g in zip(default, guided, strict=True))
    assert default[0].sampling["guidance_scale"] == 3.0  # what it was made with, recorded
    off = nano.generate_image(cts, "ct2mri", guidance_scale=1.0, progress=False)
    assert all(torch.equal(o.codes, p.codes) for o, p in zip(off, plain, strict=True))
    with pytest.raises(ValueError, match="guidance_scale must be a finite number above 0"):
        nano.generate_image(cts[0], "ct2mri", guidance_scale=0.0, progress=False)
