"""The unified model: image vocabulary, multimodal embedding, response-only loss, per-sample plugins, freezing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import random_model
from conftest import tiny_config
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

from healthgpt.config import COMPREHENSION, GENERATION
from healthgpt.errors import ImageInputError
from healthgpt.fusion import set_plugin_tables
from healthgpt.model import ImageSlotError, attach_image_vocab, expand_image_slots
from healthgpt.templates import PromptError
from healthgpt.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from healthgpt.training.stages import StageConfig, prepare_stage


def _image(seed: int, size=(40, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def test_m3_image_token_ids_and_mean_rows():
    """REFERENCE §1.6 on a tokenizer of M3's base length 32011 and a model with M3's 32064 embedding rows."""
    vocab = {f"t{i}": i for i in range(32011)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    llm = Phi3ForCausalLM(
        Phi3Config(
            vocab_size=32064,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=False,
        )
    )
    before = llm.get_input_embeddings().weight[:32011].clone()
    v = attach_image_vocab(llm, tok, 8192)
    assert (v.start_id, v.first_code_id, v.end_id, v.newline_id) == (32011, 32012, 40204, 40205)
    assert tok.convert_tokens_to_ids(["<idx_0>", "<idx_8191>"]) == [32012, 40203]
    for weight in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
        assert weight.shape == (40206, 8)
        expected_mean = weight[:32011].mean(0)
        torch.testing.assert_close(weight[32011:], expected_mean.expand(40206 - 32011, -1))  # padding rows too
    torch.testing.assert_close(llm.get_input_embeddings().weight[:32011], before)


def _loss_inputs(model, question: str, answer: str, n_images: int = 1):
    request = model.build_request([{"role": "user", "content": question}], [_image(i) for i in range(n_images)])
    prompt = expand_image_slots(request.input_ids, model.model.num_patches)
    response = model.tokenizer.encode(answer, add_special_tokens=False)
    ids = torch.tensor([prompt + response])
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + response])
    return ids, labels, request.pixel_values


@pytest.mark.parametrize("arch", ["phi3", "qwen2"])
def test_loss_covers_response_tokens_only(arch):
    model = random_model(tiny_config(arch))
    ids, labels, pixels = _loss_inputs(model, "Is there a lesion?", "Yes, on the left side.")
    out = model.model(ids, COMPREHENSION, pixel_values=pixels, labels=labels)
    # Independent computation: next-token cross-entropy over response positions only, from every position's logits.
    with torch.no_grad():
        logits = model.model(ids, COMPREHENSION, pixel_values=pixels).logits[0, :-1].float()
    target = ids[0, 1:]
    keep = labels[0, 1:] != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], target[keep])
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits[0], logits[keep])  # only the supervised positions' rows are computed
    assert keep.sum() == len(model.tokenizer.encode("Yes, on the left side.", add_special_tokens=False))
    out.loss.backward()  # gradients reach the plugin and the projector
    assert model.model.projectors[COMPREHENSION][0].weight.grad is not None


@pytest.mark.parametrize(
    ("arch", "plugins"),
    [
        ("phi3", (COMPREHENSION, COMPREHENSION)),
        ("qwen2", (COMPREHENSION, COMPREHENSION)),
        ("phi3", (GENERATION, COMPREHENSION)),  # mixed, and the generation plugin has its own head (fusion table)
    ],
)
def test_the_supervised_head_gives_the_loss_and_gradients_of_every_position(arch, plugins):
    """A padded batch of two: the loss over the kept rows and its gradients equal transformers' own `labels=` path,
    which applies the head at every position."""
    model = random_model(tiny_config(arch))
    if GENERATION in plugins:
        g = torch.Generator().manual_seed(3)
        embedding, head = model.model.llm.get_input_embeddings().weight, model.model.llm.get_output_embeddings().weight
        set_plugin_tables(
            model.model, GENERATION, torch.randn(embedding.shape, generator=g), torch.randn(head.shape, generator=g)
        )
    rows = [_loss_inputs(model, "Is there a lesion?", "Yes, on the left side."), _loss_inputs(model, "Side?", "Left.")]
    width = max(ids.shape[1] for ids, _, _ in rows)
    pad = model.tokenizer.pad_token_id or 0
    ids = torch.stack([F.pad(i[0], (0, width - i.shape[1]), value=pad) for i, _, _ in rows])
    labels = torch.stack([F.pad(lab[0], (0, width - lab.shape[1]), value=IGNORE_INDEX) for _, lab, _ in rows])
    mask = torch.stack([F.pad(torch.ones(i.shape[1], dtype=torch.long), (0, width - i.shape[1])) for i, _, _ in rows])
    pixels = torch.cat([p for _, _, p in rows])
    n = int((labels[:, 1:] != IGNORE_INDEX).sum()) + 3  # as a larger global batch would count

    def loss_and_grads(ours: bool) -> list[torch.Tensor]:
        model.model.zero_grad()
        if ours:
            loss = model.model(
                ids, list(plugins), pixel_values=pixels, attention_mask=mask, labels=labels, num_items_in_batch=n
            ).loss
        else:
            with model.model.hlora.use(list(plugins)):
                embeds = model.model.embed(ids, pixels, list(plugins))
                masked = labels.masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
                loss = model.model.llm(
                    inputs_embeds=embeds, attention_mask=mask, labels=masked, num_items_in_batch=n
                ).loss
        loss.backward()
        return [loss.detach(), *(p.grad.clone() for p in trained)]

    trained = [
        p
        for plugin in sorted(set(plugins))
        for p in (*model.model.projectors[plugin].parameters(), *model.model.hlora.parameters_of(plugin))
    ]
    model.model.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    ours, theirs = loss_and_grads(True), loss_and_grads(False)
    assert len(ours) > 2 and ours[0] > 0
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_image_features_fill_the_slots():
    model = random_model()
    ids, _, pixels = _loss_inputs(model, "Describe.", "Fine.")
    embeds = model.model.embed(ids, pixels, [COMPREHENSION])
    slots = (ids[0] == IMAGE_TOKEN_INDEX).nonzero().flatten()
    feats = model.model.vision.features(pixels, [-2])[-2]
    projected = model.model.projectors[COMPREHENSION](feats)[0]
    torch.testing.assert_close(embeds[0, slots], projected)
    text = (ids[0] != IMAGE_TOKEN_INDEX).nonzero().flatten()
    torch.testing.assert_close(embeds[0, text], model.model.llm.get_input_embeddings()(ids[0, text]))


def test_mixed_plugin_batch_equals_each_sample_alone():
    model = random_model()
    ids, _, _ = _loss_inputs(model, "Describe the image.", "ok")
    ids = ids.repeat(3, 1)  # same text, three different images
    pixels = model.preprocessor([_image(s) for s in (1, 2, 3)])
    plugins = [COMPREHENSION, GENERATION, COMPREHENSION]
    with torch.no_grad():
        batched = model.model(ids, plugins, pixel_values=pixels).logits
        alone = [model.model(ids[i : i + 1], [p], pixel_values=pixels[i : i + 1]).logits for i, p in enumerate(plugins)]
    for i in range(3):
        torch.testing.assert_close(batched[i], alone[i][0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone[0][0], model.model(ids[:1], [GENERATION], pixel_values=pixels[:1]).logits[0])


def test_training_generation_plugin_leaves_comprehension_bit_identical():
    model = random_model()
    model.model.train()
    ids, labels, pixels = _loss_inputs(model, "Reconstruct the image.", "Here it is.")
    with torch.no_grad():
        before = model.model(ids, COMPREHENSION, pixel_values=pixels).logits.clone()
    stage = StageConfig(
        tasks=(GENERATION,), trainable=(f"plugin:{GENERATION}", f"projector:{GENERATION}"), adapter_lr=1e-2, lr=1e-2,
        global_batch_size=1,
    )  # fmt: skip
    opt = torch.optim.AdamW(prepare_stage(model.model, stage))
    for _ in range(3):
        loss = model.model(ids, GENERATION, pixel_values=pixels, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model.model(ids, COMPREHENSION, pixel_values=pixels).logits
        gen_after = model.model(ids, GENERATION, pixel_values=pixels).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, gen_after)


def test_wrong_image_count_raises_clear_error():
    model = random_model()
    ids, _, pixels = _loss_inputs(model, "Compare.", "Same.", n_images=2)
    with pytest.raises(ImageSlotError, match="2 image slot.*but 1 image"):
        model.model(ids, COMPREHENSION, pixel_values=pixels[:1])
    with pytest.raises(ImageSlotError, match="but 0 image"):
        model.model(ids, COMPREHENSION)


def test_unsupported_image_mode_and_empty_prompt_raise():
    model = random_model()
    sixteen_bit = Image.fromarray(np.full((8, 8), 3000, dtype=np.uint16))
    with pytest.raises(ImageInputError, match="window it to 8-bit"):
        model.ask(sixteen_bit, "What is this?")
    with pytest.raises(PromptError, match="empty"):
        model.ask(_image(0), "   ")
    with pytest.raises(ValueError, match="unknown plugin"):
        model.model(torch.tensor([[1, 2]]), "segmentation")


def test_a_second_question_about_the_same_image_skips_the_vision_tower(monkeypatch):
    from healthgpt.api import HealthGPT

    model = HealthGPT.random("nano", seed=4)
    calls = []
    original = model.model.vision.features
    monkeypatch.setattr(model.model.vision, "features", lambda *a, **k: calls.append(1) or original(*a, **k))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    first = model.ask(image, "Is there a lesion?", max_new_tokens=6)
    assert len(calls) == 1 and model.ask(image, "Is there a lesion?", max_new_tokens=6) == first
    assert len(calls) == 1 and model.model.feature_cache.hits == 1
    other = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    model.ask(other, "Is there a lesion?", max_new_tokens=6)
    assert len(calls) == 2
    model.model.train()  # weights may change: the cache is emptied
    model.model.eval()
    model.ask(image, "Is there a lesion?", max_new_tokens=6)
    assert len(calls) == 3


def test_the_feature_cache_keeps_at_most_its_bound_and_evicts_the_oldest():
    from healthgpt.feature_cache import FeatureCache

    cache = FeatureCache(max_entries=2)
    pixels = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4)
    computed = []

    def compute(p, plugins):
        computed.append(len(p))
        return p * 2

    torch.testing.assert_close(cache.features(pixels, ["a"] * 3, compute), pixels * 2)
    assert len(cache) == 2 and computed == [3]
    torch.testing.assert_close(cache.features(pixels[1:], ["a", "a"], compute), pixels[1:] * 2)
    assert computed == [3]  # rows 1 and 2 were kept; row 0 was evicted
    cache.features(pixels[:1], ["a"], compute)
    assert computed == [3, 1]
