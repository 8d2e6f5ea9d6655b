"""Weight-only quantization of the base LLM (torchao int8/int4 on CPU): what is quantized, what stays full precision,
memory against the stored layouts, answers against the full-precision model, clear errors where no kernel exists."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _models import with_random_adapters
from conftest import tiny_config
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file
from safetensors.torch import load_file

from healthgpt.api import HealthGPT
from healthgpt.checkpoints import embedded_bundle
from healthgpt.config import COMPREHENSION, HealthGPTConfig, get_variant
from healthgpt.data.phantoms import iter_records, make_dataset
from healthgpt.generation import SamplingParams, generate
from healthgpt.hlora import HLoRALinear
from healthgpt.io import load_image
from healthgpt.model import expand_image_slots
from healthgpt.quantize import (
    QuantizationError,
    base_linears,
    estimate_memory,
    format_memory,
    is_quantized,
    memory_by_part,
    quantize_base,
    quantized_linear_bytes,
)
from healthgpt.serving.server import create_app
from healthgpt.serving.ui import _models_line
from healthgpt.training.loop import build_healthgpt, export_model, run_stage
from healthgpt.training.stages import RecipeError, load_recipe

pytest.importorskip("torchao", reason="int8/int4 need torchao: pip install 'healthgpt[quant]'")

MODES = ("int8", "int4")
# (greedy agreement, last-step logits cosine) required of models with random weights, whose logits are near ties:
# int8 meets the 95% / 0.99 there too; int4 meets it on the trained nano model, but on random weights its
# 4-bit rounding flips near-tie argmaxes (measured: small config 94% / 0.980, published fixture 85% / 0.987). No
# int4 setting torchao offers closes that: groups of 32 or HQQ scales stay under 95% on the fixture. Random noise on
# the weights shows why: the fixture keeps 95% / 0.99 only near 1% relative weight error, and int4 rounds with 9-10%
# (exactly that rounding: test_int4_rounds_each_group_to_16_levels_between_its_min_and_max).
RANDOM_WEIGHTS_BOUNDS = {"int8": (0.95, 0.99), "int4": (0.80, 0.975)}


def small_config() -> HealthGPTConfig:
    """nano's architecture with a wider LLM (128 hidden, 256 MLP), so int4 uses 128-wide groups too."""
    nano = get_variant("nano")
    return nano.replace(name="small", llm=dataclasses.replace(nano.llm, hidden_size=128, intermediate_size=256))


def phantom_questions(n_cases: int = 4) -> list[tuple[Image.Image, str]]:
    """(image, question) pairs of held-out phantom cases: presence, side and count, CT and MRI."""
    rows = iter_records(n_cases, seed=1, split="test", tasks=("presence", "side", "count"))
    return [
        (Image.fromarray(pixels[record["image"]]).convert("RGB"), record["conversations"][0]["value"].split("\n")[-1])
        for record, pixels in rows
    ]


def agreement(full: HealthGPT, quantized: HealthGPT, items, max_new_tokens: int = 12) -> tuple[float, float]:
    """(share of positions where the quantized model's argmax is the full model's greedy token, the lowest cosine of
    the two models' logits at the last step of a reply), teacher-forced on the full model's greedy replies."""
    requests = [full.build_request([{"role": "user", "content": q}], [im] if im else []) for im, q in items]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    replies = generate(full.model, requests, params, stop_ids=full.stop_ids, pad_id=full.pad_id)
    agree = total = 0
    cosines = []
    for request, reply in zip(requests, replies, strict=True):
        prompt = expand_image_slots(request.input_ids, full.model.num_patches)
        ids = torch.tensor([prompt + list(reply)], device=full.device)
        pixels = None if request.pixel_values is None else request.pixel_values.to(full.device)
        with torch.inference_mode():
            rows = [
                m.model(ids, COMPREHENSION, pixel_values=pixels).logits[0, len(prompt) - 1 : -1].float().cpu()
                for m in (full, quantized)
            ]
        agree += int((rows[1].argmax(-1) == torch.tensor(reply)).sum())
        total += len(reply)
        cosines.append(F.cosine_similarity(rows[0][-1], rows[1][-1], dim=0).item())
    return agree / total, min(cosines)


@pytest.fixture(scope="module")
def nano_full() -> HealthGPT:
    return HealthGPT.from_pretrained("nano")


@pytest.mark.parametrize("mode", MODES)
def test_nano_quantized_answers_like_full_precision(nano_full: HealthGPT, mode: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="healthgpt"):
        quantized = HealthGPT.from_pretrained("nano", quantize=mode)
    assert quantized.quantization == mode
    logged = format_memory(memory_by_part(quantized.model, quantized.vqgan))
    assert f"memory by part: {logged}" in caplog.messages and logged.startswith("base ")
    linears = base_linears(quantized.model)
    assert linears and all(is_quantized(linear.weight) for linear in linears.values())
    # plugins, projectors, embeddings, head and vision stay plain full-precision tensors
    kept = [p for name, p in quantized.model.named_parameters() if ".base_layer." not in name]
    assert kept and not any(is_quantized(p) for p in kept) and {p.dtype for p in kept} == {torch.float32}
    items = phantom_questions()
    share, cosine = agreement(nano_full, quantized, items)
    assert share >= 0.95 and cosine >= 0.99, (share, cosine)
    image, question = items[0]
    assert quantized.ask(image, question, max_new_tokens=4) == nano_full.ask(image, question, max_new_tokens=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels (tinygemm int4, bitsandbytes nf4)")
@pytest.mark.parametrize("mode", (*MODES, "nf4"))
def test_nano_on_cuda_quantized_answers_like_full_precision(mode: str) -> None:
    if mode == "nf4":
        pytest.importorskip("bitsandbytes")
    full = HealthGPT.from_pretrained("nano", dtype="bfloat16", device="cuda")
    quantized = HealthGPT.from_pretrained("nano", dtype="bfloat16", device="cuda", quantize=mode)
    assert all(is_quantized(lin.weight) for lin in base_linears(quantized.model).values())
    share, cosine = agreement(full, quantized, phantom_questions())
    assert share >= 0.95 and cosine >= 0.99, (share, cosine)


@pytest.mark.parametrize("mode", MODES)
def test_random_small_config_quantized_answers_like_full_precision(mode: str) -> None:
    full = with_random_adapters(HealthGPT.random(small_config(), seed=3))
    quantized = with_random_adapters(HealthGPT.random(small_config(), seed=3, quantize=mode))
    assert all(is_quantized(linear.weight) for linear in base_linears(quantized.model).values())
    share, cosine = agreement(full, quantized, phantom_questions(2) + [(None, "Describe the scan.")])
    least_share, least_cosine = RANDOM_WEIGHTS_BOUNDS[mode]
    assert share >= least_share and cosine >= least_cosine, (share, cosine)
    assert isinstance(quantized.ask(None, "Is there a lesion?", max_new_tokens=3), str)


@pytest.mark.parametrize("config", ("nano", "small"))
def test_int4_rounds_each_group_to_16_levels_between_its_min_and_max(config: str) -> None:
    """Each int4 linear computes with its weight rounded, per row and per group (the largest of 128/64/32 dividing
    the width), to 16 even steps from the group's min to its max, recomputed here from the full-precision weight."""
    group_of_width = {64: 64, 128: 128, 256: 128}
    cfg = get_variant("nano") if config == "nano" else small_config()
    full = base_linears(HealthGPT.random(cfg, seed=2).model)
    quantized = base_linears(HealthGPT.random(cfg, seed=2, quantize="int4").model)
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(0))
    for path, linear in quantized.items():
        weight = full[path].weight.detach()
        groups = weight.reshape(weight.shape[0], -1, group_of_width[weight.shape[1]])
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        step = (high - low) / 15
        rounded = (((groups - low) / step).round().clamp(0, 15) * step + low).reshape(weight.shape)
        inputs = x[..., : weight.shape[1]]
        with torch.inference_mode():
            torch.testing.assert_close(linear(inputs), inputs @ rounded.T, atol=1e-5, rtol=1e-5)
        error = (rounded - weight).norm() / weight.norm()
        assert 0.05 < error < 0.12, (path, error)  # what 4 bits cost on random weights


@pytest.mark.parametrize("mode", MODES)
def test_qwen2_base_with_biased_projections_quantizes_and_answers(mode: str) -> None:
    """XL32's architecture: q/k/v carry biases, which stay full precision beside the quantized weights."""
    full = HealthGPT.random(tiny_config("qwen2"), seed=1)
    quantized = HealthGPT.random(tiny_config("qwen2"), seed=1, quantize=mode)
    linears = base_linears(quantized.model)
    biased = [lin for lin in linears.values() if lin.bias is not None]
    assert biased and all(is_quantized(lin.weight) and not is_quantized(lin.bias) for lin in biased)
    share, cosine = agreement(full, quantized, phantom_questions(2))
    assert cosine >= 0.99 and (mode == "int4" or share >= 0.95), (share, cosine)
    assert isinstance(quantized.ask(None, "Is there a lesion?", max_new_tokens=3), str)


@pytest.mark.parametrize("mode", MODES)
def test_published_fixture_prompt_quantized_agrees(published, mode: str) -> None:
    kwargs = dict(
        base_model=published / "tiny_phi3",
        vision_tower=published / "tiny_clip",
        plugin_files={COMPREHENSION: published / "case_a_m3_com" / "com_hlora_weights.bin"},
        dtype="float32",
    )
    full = HealthGPT.from_pretrained("m3", **kwargs)
    quantized = HealthGPT.from_pretrained("m3", quantize=mode, **kwargs)
    question = json.loads((published / "case_a_m3_com" / "outputs.json").read_text())["question"]
    items = [(Image.open(published / "input_image.png").convert("RGB"), question), (None, question)]
    share, cosine = agreement(full, quantized, items, max_new_tokens=16)
    least_share, least_cosine = RANDOM_WEIGHTS_BOUNDS[mode]
    assert share >= least_share and cosine >= least_cosine, (share, cosine)


@pytest.mark.parametrize("mode", (None, *MODES))
def test_memory_by_part_matches_the_stored_layouts_and_the_config_estimate(mode: str | None) -> None:
    model = HealthGPT.random("nano", quantize=mode)
    measured = memory_by_part(model.model, model.vqgan)
    full = memory_by_part(HealthGPT.random("nano").model, model.vqgan)
    assert measured == estimate_memory(model.config, torch.float32, mode)
    assert {k: v for k, v in measured.items() if k != "base"} == {k: v for k, v in full.items() if k != "base"}
    # base = full-precision base minus each linear's fp32 weight plus its quantized size, summed independently
    linears = base_linears(model.model).values()
    saved = sum(
        lin.in_features * lin.out_features * 4
        - quantized_linear_bytes(lin.out_features, lin.in_features, mode, torch.float32)
        for lin in linears
    )
    assert measured["base"] == full["base"] - saved
    assert (saved > 0) == (mode is not None)
    if mode is not None:  # the stored inner tensors, counted directly
        weight = next(iter(linears)).weight
        inner = [getattr(weight, name) for name in weight.__tensor_flatten__()[0]]
        assert sum(t.nbytes for t in inner) == quantized_linear_bytes(
            weight.shape[0], weight.shape[1], mode, torch.float32
        )


def test_nf4_without_a_kernel_and_bad_modes_are_clear_errors() -> None:
    with pytest.raises(QuantizationError, match="nf4 needs bitsandbytes' 4-bit kernels, which run on CUDA only"):
        HealthGPT.from_pretrained("nano", quantize="nf4")
    with pytest.raises(QuantizationError, match="quantize must be one of int8, int4, nf4"):
        HealthGPT.from_pretrained("nano", quantize="int3")
    model = HealthGPT.random("nano", quantize="int8")
    with pytest.raises(ValueError, match="choose device and dtype when loading"):
        model.to(dtype="bfloat16")
    with pytest.raises(ValueError, match="choose device and dtype when loading"):
        model.to("meta")
    with pytest.raises(QuantizationError, match="is already quantized"):
        quantize_base(model.model, "int4")
    assert all(isinstance(m, HLoRALinear) for m in model.model.hlora.layers.values())


STAGE = "stage3_comprehension"


def test_stage3_over_an_int8_base_learns_saves_only_what_it_trained_and_exports_full_precision(tmp_path) -> None:
    make_dataset(tmp_path / "phantoms", 4, seed=1, size=64, test_fraction=0.0)
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "model.quantize=int8",
        f"{STAGE}.data=[{tmp_path / 'phantoms' / 'train.json'}]",
        f"{STAGE}.init_from=[]",
        f"{STAGE}.global_batch_size=4",
        f"{STAGE}.adapter_lr=2e-3",
        f"{STAGE}.lr=2e-3",
        f"{STAGE}.max_steps=6",
    ]
    recipe = load_recipe(None, overrides)
    hg = build_healthgpt(recipe)
    result = run_stage(recipe, STAGE, healthgpt=hg)

    losses = [row["loss"] for row in json.loads(result.metrics_file.read_text())["history"]]
    assert losses[-1] < losses[0], losses
    assert hg.quantization == "int8" and all(is_quantized(lin.weight) for lin in base_linears(hg.model).values())
    saved = load_file(result.output / "weights.safetensors")
    trained = {n for n, p in hg.model.named_parameters() if p.requires_grad}
    projector = list(hg.model.projectors[COMPREHENSION].parameters())
    expected = len(hg.model.hlora.parameters_of(COMPREHENSION)) + len(projector)
    assert set(saved) == trained and len(saved) == expected
    assert not any("base_layer" in k or "embed_tokens" in k or "lm_head" in k for k in saved)
    assert all(v.dtype == torch.float32 for v in saved.values())

    bundle = export_model(None, tmp_path / "bundle", stages=(STAGE,), overrides=overrides, include_base=True)
    full = HealthGPT.from_pretrained(bundle)
    assert full.quantization is None and not any(is_quantized(p) for p in full.model.parameters())
    reloaded = HealthGPT.from_pretrained(bundle, quantize="int8")
    ids = torch.tensor([reloaded.build_request([{"role": "user", "content": "Is there a lesion?"}]).input_ids])
    with torch.inference_mode():
        logits = [m.model(ids, COMPREHENSION).logits for m in (hg, reloaded, full)]
    torch.testing.assert_close(logits[1], logits[0])  # the same int8 base under the same trained plugin
    assert F.cosine_similarity(logits[2].flatten(), logits[0].flatten(), dim=0) > 0.99


def test_training_over_int4_is_refused_with_the_reason() -> None:
    with pytest.raises(RecipeError, match="int4 kernels have no backward"):
        load_recipe(None, ["output_dir=unused", "model.quantize=int4"])


# ----- command line, server, UI ------------------------------------------------------------------------------------
def healthgpt(*args: object, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUTF8": "1", "COLUMNS": "200", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "healthgpt.cli", *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_cli_quantize_answers_quietly_and_refuses_nf4_and_unknown_modes_in_one_line(tmp_path) -> None:
    question, ct = "Is there a lesion in this CT image?", get_testdata_file("CT_small.dcm")
    done = healthgpt(
        "ask", ct, question, "--quantize", "int4", "--dtype", "bfloat16", "--max-new-tokens", "6", cwd=tmp_path
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr  # no torchao/pytree chatter
    model = HealthGPT.from_pretrained("nano", quantize="int4", dtype="bfloat16")
    assert done.stdout == model.ask(load_image(ct).to_pil(), question, max_new_tokens=6) + "\n"
    for mode, message in (("nf4", "error: nf4 needs bitsandbytes' 4-bit kernels"), ("int3", "error: --quantize int3")):
        refused = healthgpt("ask", ct, question, "--quantize", mode, cwd=tmp_path)
        assert refused.returncode == 2 and refused.stdout == ""
        assert len(refused.stderr.splitlines()) == 1 and refused.stderr.startswith(message), refused.stderr


def test_cli_info_prints_memory_by_part_for_each_mode(tmp_path) -> None:
    folder = embedded_bundle("nano")
    facts = json.loads(healthgpt("info", folder, "--json", cwd=tmp_path).stdout)["config"]["memory"]
    config = HealthGPTConfig.load(folder / "config.json")
    for mode in (None, "int8", "int4", "nf4"):
        parts = estimate_memory(config, torch.float32, mode)
        assert facts[mode or "none"] == parts | {"total": sum(parts.values())}
    assert facts["int4"]["base"] < facts["int8"]["base"] < facts["none"]["base"]
    assert facts["int4"]["plugins"] == facts["none"]["plugins"]


def test_server_model_card_and_ui_show_the_quantization_and_memory() -> None:
    model = HealthGPT.random("nano", quantize="int8")
    with TestClient(create_app({"nano-int8": model})) as client:
        card = client.get("/v1/models/nano-int8").json()
    assert card["quantization"] == "int8" and card["memory_bytes"] == memory_by_part(model.model, model.vqgan)
    line = _models_line({"nano-int8": SimpleNamespace(model=model)})
    assert line.startswith("- **nano-int8**: base LLM int8, base ") and "plugins" in line and "vqgan" in line


def test_an_int8_model_on_the_compiled_engine_answers_as_it_does_eagerly():
    """Quantization composes with the compiled static-cache decode step (torchao's tensors trace under compile)."""
    model = HealthGPT.from_pretrained("nano", quantize="int8", enforce_eager=True)
    questions = ["Is there a lesion in this image?", "How many lesions are there?"]
    eager = [model.ask(None, q, max_new_tokens=12) for q in questions]
    model.enforce_eager = False
    assert [model.ask(None, q, max_new_tokens=12) for q in questions] == eager
