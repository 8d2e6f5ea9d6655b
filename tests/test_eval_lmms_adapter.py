"""The lmms-eval adapter: request unpacking, settings, stop strings, batching and log-likelihoods."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
from _models import random_model
from PIL import Image

from healthgpt.evaluation.lmms_adapter import (
    HealthGPTLMMSCore,
    LMMSAdapterError,
    cut_at_stop_strings,
    sampling_from_gen_kwargs,
)
from healthgpt.generation import SamplingParams, stream


@pytest.fixture(scope="module")
def model():
    return random_model(seed=2)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


DOCS = {"vqarad": {"test": [{"images": [_image(0)]}, {"images": [_image(1), _image(2)]}, {"images": []}]}}


def _visual(doc):
    return doc["images"]


def test_settings_map_and_beam_search_is_refused():
    assert sampling_from_gen_kwargs({"max_new_tokens": 7, "temperature": 0}) == {
        "max_new_tokens": 7,
        "temperature": 0.0,
    }
    sampled = sampling_from_gen_kwargs({"do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert sampled == {"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.9}
    with pytest.raises(LMMSAdapterError, match="beam search"):
        sampling_from_gen_kwargs({"num_beams": 3})


def test_stop_strings_cut_at_the_earliest():
    assert cut_at_stop_strings("yes. Question: no", ["Question:", "."]) == "yes"
    assert cut_at_stop_strings("plain", None) == "plain"


def test_generate_until_answers_each_request_like_the_model_alone(model):
    core = HealthGPTLMMSCore(model, batch_size=2, max_new_tokens=6)
    greedy = {"max_new_tokens": 6, "temperature": 0, "until": ["\n\n"]}
    args = [
        ("Is there a lesion?", greedy, _visual, 0, "vqarad", "test"),
        ("Compare the two images.", greedy, _visual, 1, "vqarad", "test"),
        ("What is a CT scan?", {"max_new_tokens": 4}, _visual, 2, "vqarad", "test"),
    ]
    answers = core.generate_until(args, DOCS)
    expected = [
        model.answer([([_image(0)], "Is there a lesion?")], max_new_tokens=6)[0],
        model.answer([([_image(1), _image(2)], "Compare the two images.")], max_new_tokens=6)[0],
        model.answer([([], "What is a CT scan?")], max_new_tokens=4)[0],
    ]
    assert answers == [cut_at_stop_strings(a, ["\n\n"]) for a in expected[:2]] + [expected[2]]


def test_loglikelihood_matches_prefix_by_prefix_prefills(model):
    """One forward pass scores the continuation; independently, a fresh prefill of the prompt plus each prefix of the
    continuation gives the next token's log-probability through the generation loop."""
    continuation = " yes, on the left"
    target = model.prompts.encode_text(continuation)
    req = model.build_request([{"role": "user", "content": "Is there a lesion?"}], [_image(0)])
    expected, greedy = 0.0, True
    for k, token in enumerate(target):
        prefixed = type(req)(input_ids=req.input_ids + target[:k], plugin=req.plugin, pixel_values=req.pixel_values)
        step = next(
            stream(
                model.model,
                [prefixed],
                SamplingParams(max_new_tokens=1),
                stop_ids=[],
                pad_id=model.pad_id,
                return_logits=True,
            )
        )
        expected += float(step.logits[0].log_softmax(-1)[token])
        greedy &= int(step.logits[0].argmax()) == token
    core = HealthGPTLMMSCore(model)
    [(logprob, is_greedy)] = core.loglikelihood(
        [("Is there a lesion?", continuation, _visual, 0, "vqarad", "test")], DOCS
    )
    assert logprob == pytest.approx(expected, abs=1e-3)
    assert is_greedy == greedy


def test_the_package_registers_the_lmms_eval_entry_point():
    entry = [e for e in importlib.metadata.entry_points(group="lmms_eval.models") if e.name == "healthgpt"]
    assert [e.value for e in entry] == ["healthgpt.evaluation.lmms_eval_model:manifest"]


def test_lmms_eval_model_class_where_lmms_eval_imports():
    pytest.importorskip(
        "lmms_eval", reason="lmms-eval is not installed: it needs torchvision, which has no build beside this CPU torch"
    )
    from healthgpt.evaluation.lmms_eval_model import HealthGPTLMMs, manifest

    assert manifest().model_id == "healthgpt"
    assert HealthGPTLMMs(pretrained="nano").core.batch_size == 8


def test_lmms_eval_model_class_loads_the_named_models_weights(monkeypatch):
    """With stand-ins for the two lmms-eval modules it imports, the class loads `pretrained` by name (the shipped
    nano's trained weights, not a random model) and answers as that model does."""
    import sys
    import types
    from dataclasses import dataclass

    import torch

    from healthgpt.api import HealthGPT

    api_model = types.ModuleType("lmms_eval.api.model")
    api_model.lmms = type("lmms", (), {})
    registry = types.ModuleType("lmms_eval.models.registry_v2")
    registry.ModelManifest = dataclass(
        type("ModelManifest", (), {"__annotations__": {"model_id": str, "simple_class_path": str}})
    )
    for name, module in (("lmms_eval.api.model", api_model), ("lmms_eval.models.registry_v2", registry)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "healthgpt.evaluation.lmms_eval_model", raising=False)
    from healthgpt.evaluation.lmms_eval_model import HealthGPTLMMs, manifest

    assert manifest().simple_class_path == "healthgpt.evaluation.lmms_eval_model.HealthGPTLMMs"
    loaded = HealthGPTLMMs(pretrained="nano", batch_size="2").core
    shipped = HealthGPT.from_pretrained("nano")
    ours, theirs = loaded.model.model.state_dict(), shipped.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert loaded.batch_size == 2
