"""The one generation loop: KV cache, batching with left padding, sampling, stop tokens, streaming, image spans."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _models import random_model
from conftest import tiny_config
from PIL import Image

from healthgpt.api import HealthGPT
from healthgpt.config import COMPREHENSION, GENERATION
from healthgpt.generation import SamplingParams, generate


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 32, 3), dtype=np.uint8))


def _request(model: HealthGPT, question: str, seed: int = 0, plugin: str = COMPREHENSION, **kw):
    return model.build_request([{"role": "user", "content": question}], [_image(seed)], plugin=plugin, **kw)


def _run(model: HealthGPT, requests, **kw):
    sampling = SamplingParams(**{"max_new_tokens": 12, **kw.pop("sampling", {})})
    return generate(
        model.model, requests, sampling, stop_ids=kw.pop("stop_ids", model.stop_ids), pad_id=model.pad_id, **kw
    )


@pytest.mark.parametrize("arch", ["phi3", "qwen2"])
def test_kv_cache_gives_the_same_greedy_tokens_as_full_recompute(arch):
    model = random_model(tiny_config(arch))
    req = _request(model, "Is there a lesion in this CT image?")
    cached = _run(model, [req], stop_ids=[])
    recomputed = _run(model, [req], stop_ids=[], use_cache=False)
    assert cached == recomputed
    assert len(cached[0]) == 12


def test_greedy_loop_matches_transformers_generate_on_the_base_model():
    """With no-op plugins (training init) and no image, our loop must equal HF `generate` on the plain LLM."""
    model = HealthGPT.random("nano", seed=3)
    req = model.build_request([{"role": "user", "content": "How many lesions are there?"}])
    ours = _run(model, [req], stop_ids=[], sampling={"max_new_tokens": 10})[0]
    with torch.no_grad():
        theirs = model.model.llm.generate(
            torch.tensor([req.input_ids]),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=model.pad_id,
        )
    assert ours == theirs[0, len(req.input_ids) :].tolist()


def test_batched_left_padded_equals_unbatched_with_mixed_plugins():
    model = random_model()
    reqs = [
        _request(model, "Is there a lesion?", 1),
        _request(model, "Describe the findings of this chest CT image in detail please.", 2, plugin=GENERATION),
        _request(model, "Which side?", 3),
    ]
    assert len({len(r.input_ids) for r in reqs}) == 3
    batched = _run(model, reqs, stop_ids=[])
    alone = [_run(model, [r], stop_ids=[])[0] for r in reqs]
    assert batched == alone


def test_sampling_is_reproducible_with_a_seed():
    model = random_model()
    req = _request(model, "Is there a lesion?")
    params = {"temperature": 1.0, "top_k": 50, "top_p": 0.95, "max_new_tokens": 16}
    a = _run(model, [req], stop_ids=[], sampling={**params, "seed": 7})
    b = _run(model, [req], stop_ids=[], sampling={**params, "seed": 7})
    c = _run(model, [req], stop_ids=[], sampling={**params, "seed": 8})
    assert a == b
    assert a != c


def test_rows_stop_at_their_stop_token_which_is_returned():
    model = random_model()
    req = _request(model, "Is there a lesion?")
    free = _run(model, [req], stop_ids=[])[0]
    stop = free[4]
    first = free.index(stop)
    assert _run(model, [req], stop_ids=[stop])[0] == free[: first + 1]


def test_stream_yields_the_same_text_as_ask():
    model = random_model()
    image = _image(5)
    pieces = list(model.stream(image, "Is there a lesion?", max_new_tokens=12))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == model.ask(image, "Is there a lesion?", max_new_tokens=12)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.5, "top_k": 100, "seed": 3}])
def test_image_span_has_exactly_the_grid_of_codes_then_end(sampling):
    model = random_model()
    vocab = model.model.image_vocab
    span = model.config.vq.num_image_tokens
    reqs = [model.build_image_request(_image(s), "reconstruct").request for s in range(4)]
    outs = _run(model, reqs, sampling={"max_new_tokens": span + 1, **sampling})
    for out in outs:
        assert len(out) == span + 1
        codes = torch.tensor(out[:span])
        assert bool(vocab.is_code(codes).all())
        assert out[span] == vocab.end_id


def test_each_row_keeps_its_own_token_budget():
    model = random_model()
    reqs = [_request(model, "Is there a lesion?", 1), _request(model, "Which side?", 2)]
    reqs[0] = dataclasses.replace(reqs[0], max_new_tokens=3)
    out = _run(model, reqs, stop_ids=[])
    assert [len(o) for o in out] == [3, 12]
    assert out[1] == _run(model, [reqs[1]], stop_ids=[])[0]


def test_text_answers_never_contain_image_tokens():
    """Even when the LLM prefers image tokens, a comprehension row cannot emit them (nor open an image span)."""
    model = random_model()
    vocab = model.model.image_vocab
    boost = torch.zeros(model.model.llm.get_output_embeddings().weight.shape[0])
    boost[vocab.start_id : vocab.newline_id + 1] = 1e4
    handle = model.model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: o + boost)
    try:
        out = _run(model, [_request(model, "Is there a lesion?")], stop_ids=[])[0]
    finally:
        handle.remove()
    assert len(out) == 12 and not any(vocab.start_id <= t <= vocab.newline_id for t in out)


def test_incremental_detokenizer_pieces_join_to_the_decoded_row_without_broken_characters():
    from healthgpt.generation import IncrementalDetokenizer

    model = HealthGPT.random("nano", seed=1)
    tok = model.tokenizer
    ids = tok.encode("Lésion à gauche: 12 mm → suivi, 肺结节 ok", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])
    assert sum(bool(p) for p in pieces) > 3  # it streams, not everything at the end


ROW_SETTINGS = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5, seed=1),
    SamplingParams(temperature=0.9, top_p=0.8, seed=2),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.95, repetition_penalty=1.3, seed=3),
    SamplingParams(repetition_penalty=0.8),
]


def _processors(params: SamplingParams):
    """transformers' own processors for one row's settings: the reference `RowSampling` must equal."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    penalty = LogitsProcessorList()
    if params.repetition_penalty is not None:
        penalty.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    warpers = LogitsProcessorList()
    if not params.greedy:
        warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k is not None:
            warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p is not None:
            warpers.append(TopPLogitsWarper(params.top_p))
    return penalty, warpers


def test_per_row_sampling_equals_transformers_processors_row_by_row():
    from healthgpt.generation.sampling import RowSampling

    torch.manual_seed(0)
    rows, vocab = len(ROW_SETTINGS), 300
    sampling = RowSampling(rows, torch.device("cpu"))
    for i, params in enumerate(ROW_SETTINGS):
        sampling.set(i, params)
    generated = torch.randint(0, vocab, (rows, 7))
    seen = torch.zeros(rows, vocab, dtype=torch.bool).scatter(1, generated, True)
    generators = {i: torch.Generator().manual_seed(p.seed) for i, p in enumerate(ROW_SETTINGS) if p.seed is not None}
    for _ in range(20):
        raw = torch.randn(rows, vocab) * 4
        raw[:, 10:20] = float("-inf")  # what the span constraint leaves
        penalized = sampling.penalize(raw, seen)
        warped = sampling.warp(penalized)
        tokens = sampling.choose(penalized)
        for i, params in enumerate(ROW_SETTINGS):
            penalty, warpers = _processors(params)
            theirs = penalty(generated[i : i + 1], raw[i : i + 1])
            assert torch.equal(penalized[i : i + 1], theirs), params
            if params.greedy:
                assert tokens[i] == theirs.argmax(), params
                continue
            theirs = warpers(generated[i : i + 1], theirs)
            assert torch.equal(warped[i : i + 1], theirs), params
            if i in generators:
                drawn = torch.multinomial(theirs.softmax(dim=-1), 1, generator=generators[i])[0, 0]
                assert tokens[i] == drawn, params
            assert torch.isfinite(theirs[0, tokens[i]]), params  # unseeded rows draw an allowed token
    sampling.clear(4)
    assert 4 not in sampling.generators and sampling.params[4] is None


def test_rows_with_different_settings_in_one_batch_equal_each_row_alone():
    from healthgpt.generation.loop import DecodeRows

    model = random_model()
    reqs = [_request(model, q, s) for s, q in enumerate(["Is there a lesion?", "Which side?", "How many?"] * 2)]
    device = torch.device("cpu")
    together = DecodeRows(model.model, len(reqs), model.stop_ids, model.pad_id, device)
    alone = []
    for i, (req, params) in enumerate(zip(reqs, ROW_SETTINGS, strict=True)):
        together.place(i, req, params, min_tokens=3 if i == 1 else 0)
        alone.append(DecodeRows(model.model, 1, model.stop_ids, model.pad_id, device))
        alone[-1].place(0, req, params, min_tokens=3 if i == 1 else 0)
    torch.manual_seed(1)
    for _ in range(12):
        raw = torch.randn(len(reqs), model.model.llm.get_output_embeddings().weight.shape[0]) * 3
        raw[:, model.stop_ids] += 6  # stop tokens are likely: min_tokens must hold them back
        token = together.pick(raw)
        for i, rows in enumerate(alone):
            if ROW_SETTINGS[i].greedy or ROW_SETTINGS[i].seed is not None:
                assert token[i] == rows.pick(raw[i : i + 1])[0], i
            rows.advance(token[i : i + 1])
        together.advance(token)
    assert together.finished.tolist() == [rows.finished[0] for rows in alone]
    assert together.count.tolist() == [int(rows.count[0]) for rows in alone]
    assert 0 < int(together.count[0]) < 12 and int(together.count[1]) >= 3  # stop tokens end rows, after min_tokens
