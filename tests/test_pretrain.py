"""Pre-training functions with tiny budgets: each improves its objective, is seeded, leaves the global RNG alone,
and what it saves reloads to identical outputs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from healthgpt.api import HealthGPT
from healthgpt.config import VQConfig, get_variant
from healthgpt.data.phantoms import caption, phantom_corpus, sample_case
from healthgpt.model import build_model
from healthgpt.nano import CHAT_TOKENS, random_llm, random_vision
from healthgpt.pretrain import (
    NanoBudget,
    evaluate_vqgan,
    linear_probe,
    perplexity,
    pooled_features,
    pretrain_clip,
    pretrain_lm,
    pretrain_nano,
    retrieval_accuracy,
    train_tokenizer,
    train_vqgan,
)
from healthgpt.pretrain._common import batch_indices
from healthgpt.pretrain.clip import PixelCache, sincos_positions, tower_from_scratch
from healthgpt.pretrain.nano import METRICS_FILE, phantom_cases, phantom_conversations, torch_threads
from healthgpt.pretrain.vqgan import PREVIEW_FILE
from healthgpt.templates import get_template
from healthgpt.vision import ImagePreprocessor, VisionEncoder
from healthgpt.vqgan import VQGAN

NANO = get_variant("nano")


pytestmark = pytest.mark.usefixtures("one_thread")


def phantoms(n: int, seed: int = 0, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [case.rgb(key) for case in (sample_case(rng, size) for _ in range(n)) for key in ("ct", "mri")]


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ shared


def test_batch_indices_cover_each_epoch_once_and_are_seeded() -> None:
    batches = list(batch_indices(10, 4, 5, torch.Generator().manual_seed(0)))
    flat = torch.cat(batches)
    assert [len(b) for b in batches] == [4] * 5
    assert sorted(flat[:10].tolist()) == list(range(10))  # the first epoch, then the second begins
    again = torch.cat(list(batch_indices(10, 4, 5, torch.Generator().manual_seed(0))))
    assert torch.equal(flat, again)


# ------------------------------------------------------------------------------------------------ vqgan


def test_train_vqgan_improves_reconstruction_and_saves_a_reloadable_model(tmp_path: Path) -> None:
    images = phantoms(2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        before = evaluate_vqgan(VQGAN.from_config(NANO.vq).eval(), images)["psnr"]
    rng_state = torch.random.get_rng_state()
    model = train_vqgan(images, vq=NANO.vq, steps=15, batch_size=4, lr=3e-3, seed=0, out_dir=tmp_path, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG is untouched
    after = evaluate_vqgan(model, images)["psnr"]
    assert after > before + 6.0, (before, after)  # about 7 dB before, 16 after
    assert not model.training
    reloaded = VQGAN.load(tmp_path)
    x = model.preprocess(images)
    assert torch.equal(reloaded.encode(x), model.encode(x))
    assert torch.equal(reloaded.decode(model.encode(x)), model.decode(model.encode(x)))
    preview = Image.open(tmp_path / PREVIEW_FILE)
    assert preview.size == (4 * 64, 2 * 64)  # inputs above their reconstructions (the first 8 at most)


def test_train_vqgan_reads_a_folder_is_seeded_and_fine_tunes_in_place(tmp_path: Path) -> None:
    for i, image in enumerate(phantoms(2)):
        image.resize((80, 72)).save(tmp_path / f"slice_{i}.png")  # resized to the model's size on the fly
    (tmp_path / "notes.txt").write_text("not an image")
    runs = [train_vqgan(tmp_path, vq=NANO.vq, steps=2, batch_size=2, seed=1, progress=False) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(state(runs[0]).values(), state(runs[1]).values(), strict=True))
    start = state(runs[0])
    tuned = train_vqgan(tmp_path, vq=runs[0], steps=2, batch_size=2, seed=2, progress=False)
    assert tuned is runs[0]
    assert not torch.equal(tuned.state_dict()["decoder.conv_out.weight"], start["decoder.conv_out.weight"])


def test_train_vqgan_with_a_nearest_neighbour_quantizer() -> None:
    vq = VQConfig(
        num_codes=32,
        embed_dim=8,
        z_channels=8,
        ch=8,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        image_size=32,
        quantizer="vq",
    )
    images = phantoms(4, size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        before = evaluate_vqgan(VQGAN.from_config(vq).eval(), images)["psnr"]
    after = evaluate_vqgan(train_vqgan(images, vq=vq, steps=30, batch_size=4, lr=3e-3, progress=False), images)["psnr"]
    assert after > before + 3.0, (before, after)


def test_train_vqgan_widens_its_threads_at_the_given_step_and_restores_them(monkeypatch) -> None:
    seen: list[tuple[int, int]] = []  # (optimizer steps taken so far, torch threads of the next one)
    steps = {"n": 0}
    step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        seen.append((steps["n"], torch.get_num_threads()))
        steps["n"] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    before = torch.get_num_threads()
    with torch_threads(1):
        train_vqgan(phantoms(1), vq=NANO.vq, steps=4, batch_size=2, threads_from=(2, 2), progress=False)
        assert torch.get_num_threads() == 1
    assert seen == [(0, 1), (1, 1), (2, 2), (3, 2)] and torch.get_num_threads() == before


def test_train_vqgan_refuses_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no image files"):
        train_vqgan(tmp_path, vq=NANO.vq, steps=1, progress=False)


# ------------------------------------------------------------------------------------------------ language


def test_train_tokenizer_keeps_the_chat_tokens_whole() -> None:
    tokenizer = train_tokenizer(phantom_corpus(np.random.default_rng(0), 500), 400, "phi3_instruct")
    assert len(tokenizer) <= 400
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    for token in CHAT_TOKENS["phi3_instruct"]:
        assert tokenizer.tokenize(token) == [token]
    prompt = get_template("phi3_instruct").render([{"role": "user", "content": "Is there a lesion?"}])
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert tokenizer.decode(ids) == prompt
    assert tokenizer.convert_tokens_to_ids("<|user|>") in ids


def test_pretrain_lm_lowers_held_out_perplexity_and_round_trips(tmp_path: Path) -> None:
    train_rng, held_rng = np.random.default_rng(0), np.random.default_rng(1)
    corpus = [*phantom_corpus(train_rng, 400), *phantom_conversations(train_rng, 400)]
    held_out = [*phantom_corpus(held_rng, 60), *phantom_conversations(held_rng, 60)]
    tokenizer = train_tokenizer([d for d in corpus if isinstance(d, str)], NANO.llm.vocab_rows)
    llm = random_llm(NANO.llm, len(tokenizer), seed=0)
    before = perplexity(llm, tokenizer, held_out, seq_len=64)
    rng_state = torch.random.get_rng_state()
    pretrain_lm(llm, tokenizer, corpus, steps=40, batch_size=8, seq_len=64, lr=3e-3, seed=0, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    after = perplexity(llm, tokenizer, held_out, seq_len=64)
    assert after < before / 10, (before, after)  # about vocabulary-sized before (uniform guessing)

    llm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    prompt = get_template("phi3_instruct").render([{"role": "user", "content": "Is there a lesion in this CT image?"}])
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    assert loaded_tokenizer.encode(prompt, add_special_tokens=False) == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, llm(ids).logits, rtol=0, atol=0)


def test_pretrain_lm_is_seeded_and_needs_a_template_for_conversations() -> None:
    corpus = phantom_corpus(np.random.default_rng(0), 200)
    tokenizer = train_tokenizer(corpus, 300)
    runs = []
    for _ in range(2):
        llm = random_llm(NANO.llm, len(tokenizer), seed=0)
        runs.append(state(pretrain_lm(llm, tokenizer, corpus, steps=3, batch_size=4, seq_len=32, progress=False)))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    chats = phantom_conversations(np.random.default_rng(0), 4)
    with pytest.raises(ValueError, match="template"):
        pretrain_lm(random_llm(NANO.llm, len(tokenizer)), tokenizer, chats, template=None, steps=1, progress=False)


# ------------------------------------------------------------------------------------------------ clip


def clip_data(n: int, seed: int) -> tuple[list[Image.Image], list[str], torch.Tensor]:
    rng = np.random.default_rng(seed)
    cases = [sample_case(rng) for _ in range(n)]
    images = [case.rgb(key) for case in cases for key in ("ct", "mri")]
    captions = [caption(case, m) for case in cases for m in ("CT", "MRI")]
    return images, captions, torch.tensor([case.has_lesion for case in cases for _ in range(2)], dtype=torch.long)


def nano_preprocessor() -> ImagePreprocessor:
    v = NANO.vision
    return ImagePreprocessor.for_clip(v.image_size, v.image_mean, v.image_std)


def test_pixel_cache_matches_the_model_preprocessing() -> None:
    pre = nano_preprocessor()
    images = [*phantoms(2), Image.new("RGB", (50, 30), (10, 200, 30)), Image.new("L", (40, 90), 77)]
    cache = PixelCache(pre, images)
    assert cache.data.dtype == torch.uint8
    torch.testing.assert_close(cache.pixels(slice(None)), pre(images), rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.pixels(torch.tensor([3, 0])), pre([images[3], images[0]]), rtol=0, atol=1e-5)


def test_pretrain_clip_learns_captions_and_saves_a_loadable_tower(tmp_path: Path) -> None:
    images, captions, _ = clip_data(64, seed=0)
    pixels = PixelCache(nano_preprocessor(), images)
    everything = torch.arange(len(captions))
    untrained = pretrain_clip(NANO.vision, pixels, captions, steps=1, lr=0.0, seed=0, progress=False)  # the init
    rng_state = torch.random.get_rng_state()
    model = pretrain_clip(NANO.vision, pixels, captions, steps=60, batch_size=32, lr=5e-3, seed=0, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    with torch.no_grad():
        before, after = (m.loss(pixels.pixels(everything), captions).item() for m in (untrained, model))
    assert after < before - 0.5, (before, after)  # 5.1 -> 4.1 nats (the floor is the targets' entropy, not 0)
    chance = 1 / len(set(captions))
    assert retrieval_accuracy(model, pixels, captions) > 3 * chance  # 0.31 on these training pairs
    assert not any(p.requires_grad for p in model.vision.parameters())  # frozen again for HealthGPT

    model.vision.tower.save_pretrained(tmp_path)
    model.preprocessor.processor.save_pretrained(tmp_path)
    loaded = VisionEncoder(CLIPVisionModel.from_pretrained(tmp_path))
    x = ImagePreprocessor.from_pretrained(str(tmp_path))(images[:3])
    torch.testing.assert_close(x, model.preprocessor(images[:3]), rtol=0, atol=0)
    expected, got = model.vision.features(x, [-2, 1]), loaded.features(x, [-2, 1])
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_pretrain_clip_checks_pairs_and_fine_tunes_a_given_tower() -> None:
    images, captions, _ = clip_data(4, seed=0)
    vision = random_vision(NANO.vision)
    with pytest.raises(ValueError, match="one caption per image"):
        pretrain_clip(vision, images, captions[:-1], steps=1, progress=False)
    before = state(vision)
    model = pretrain_clip(vision, images, captions, steps=2, batch_size=4, progress=False)
    assert model.vision is vision
    assert any(not torch.equal(before[k], v) for k, v in vision.state_dict().items())


def test_sincos_positions_code_each_patch_row_and_column_by_the_formula() -> None:
    grid, dim = 5, 12
    codes = sincos_positions(grid, dim)
    assert codes.shape == (grid * grid, dim) and codes.dtype == torch.float32
    for patch in range(grid * grid):
        row, col = divmod(patch, grid)
        expected = [
            wave(position / 10000 ** (k / 3))
            for position in (row, col)
            for wave in (math.sin, math.cos)
            for k in range(3)
        ]
        torch.testing.assert_close(codes[patch], torch.tensor(expected), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        sincos_positions(2, 6)


def test_tower_from_scratch_is_the_random_tower_with_sincos_patch_positions_that_tell_columns_apart() -> None:
    plain, tower = random_vision(NANO.vision, seed=3), tower_from_scratch(NANO.vision, seed=3)
    grid = NANO.vision.image_size // NANO.vision.patch_size
    for name, value in tower.state_dict().items():
        if name.endswith("position_embedding.weight"):
            assert torch.equal(value[0], plain.state_dict()[name][0])  # the CLS row is the random one
            assert torch.equal(value[1:], sincos_positions(grid, NANO.vision.hidden_size))
        else:
            assert torch.equal(value, plain.state_dict()[name]), name
    # Why: whether a patch lies in the image's left or right half, read linearly from its own first-layer feature.
    pixels = PixelCache(nano_preprocessor(), phantoms(4)).pixels(slice(None))  # 4 CT and 4 MRI renders
    right = (torch.arange(grid * grid) % grid >= grid // 2).long().repeat(len(pixels))
    accuracy = {}
    for name, vision in (("random", plain), ("sincos", tower)):
        patches = vision.features(pixels, [1])[1].reshape(-1, NANO.vision.hidden_size)
        half = len(patches) // 2
        accuracy[name] = linear_probe(patches[:half], right[:half], patches[half:], right[half:])
    assert accuracy["sincos"] >= 0.99 and accuracy["random"] < 0.9, accuracy  # measured 1.0 and 0.70


def test_linear_probe_separates_separable_data_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = (x[:, 3] + 0.5 * x[:, 7] > 0).long()
    assert linear_probe(x[:300], y[:300], x[300:], y[300:]) >= 0.95
    noise = torch.randint(0, 2, (400,), generator=g)
    assert linear_probe(x[:300], noise[:300], x[300:], noise[300:]) < 0.7


def test_pooled_features_mean_the_patches_of_the_requested_layer() -> None:
    vision = random_vision(NANO.vision)
    pixels = PixelCache(nano_preprocessor(), phantoms(2))
    feats = pooled_features(vision, pixels, layer=-2, batch_size=3)
    expected = vision.features(pixels.pixels(slice(None)), [-2])[-2].mean(dim=1)
    torch.testing.assert_close(feats, expected)
    assert feats.shape == (4, NANO.vision.hidden_size)


# ------------------------------------------------------------------------------------------------ the nano recipe

TINY = NanoBudget(
    train_cases=6,
    eval_cases=4,
    vqgan_steps=2,
    vqgan_batch=4,
    corpus_sentences=150,
    lm_steps=2,
    lm_batch=4,
    lm_seq_len=32,
    clip_steps=2,
    clip_batch=8,
)


def test_pretrain_nano_writes_the_folders_healthgpt_starts_from(tmp_path: Path) -> None:
    metrics = pretrain_nano(tmp_path, budget=TINY, progress=False, parallel=False)  # the slow test runs parallel
    assert json.loads((tmp_path / METRICS_FILE).read_text()) == metrics
    assert set(metrics["seconds"]) == {"vqgan", "lm", "clip", "total"}
    assert set(metrics["cpu_seconds"]) == {"vqgan", "lm", "clip"}
    assert metrics["lm"]["untrained_perplexity"] > metrics["lm"]["vocab_size"] / 2  # random model: near uniform

    llm, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tmp_path / "llm"),
        AutoTokenizer.from_pretrained(tmp_path / "llm"),
    )
    vision = VisionEncoder(CLIPVisionModel.from_pretrained(tmp_path / "vision"))
    preprocessor = ImagePreprocessor.from_pretrained(str(tmp_path / "vision"))
    vqgan = VQGAN.load(tmp_path / "vqgan")
    stops = tokenizer.convert_tokens_to_ids(list(get_template(NANO.template).stop_strings))
    assert set(llm.generation_config.eos_token_id) == set(stops)
    # The saved VQGAN reproduces the reported held-out PSNR.
    held_out = [case.rgb(key) for case in phantom_cases(0, 1, TINY.eval_cases, 64) for key in ("ct", "mri")]
    assert evaluate_vqgan(vqgan, held_out)["psnr"] == pytest.approx(metrics["vqgan"]["psnr"], abs=1e-9)
    # HealthGPT builds on the saved parts and answers.
    model = HealthGPT(build_model(NANO, llm, vision, tokenizer), tokenizer, NANO, preprocessor, vqgan=vqgan)
    answer = model.ask(held_out[0], "Is there a lesion in this CT image?", max_new_tokens=4)
    assert isinstance(answer, str)


def test_pretrain_nano_gives_the_same_models_with_the_vqgan_in_a_worker_process(tmp_path: Path) -> None:
    budget = dataclasses.replace(TINY, vqgan_widen_at=1)  # its last step on two threads, in both runs
    runs = {p: pretrain_nano(tmp_path / str(p), budget=budget, progress=False, parallel=p) for p in (False, True)}
    for metrics in runs.values():
        del metrics["seconds"], metrics["cpu_seconds"]
    assert runs[False] == runs[True]
    for name in ("vqgan/vqgan.safetensors", "llm/model.safetensors", "vision/model.safetensors"):
        assert (tmp_path / "False" / name).read_bytes() == (tmp_path / "True" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "True" / "vqgan").iterdir()) == [
        PREVIEW_FILE,
        "vqgan.json",
        "vqgan.safetensors",
    ]
