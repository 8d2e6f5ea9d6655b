"""The full pre-training half of the nano recipe: budgets that fit minutes on 2 CPU cores meet the quality targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionModel

from healthgpt.config import COMPREHENSION, get_variant
from healthgpt.pretrain import evaluate_vqgan, linear_probe, pooled_features, pretrain_nano
from healthgpt.pretrain.clip import PixelCache
from healthgpt.pretrain.nano import phantom_cases, phantom_images
from healthgpt.vision import ImagePreprocessor, VisionEncoder
from healthgpt.vqgan import VQGAN


@pytest.mark.slow
def test_pretrain_nano_meets_its_quality_targets(tmp_path: Path) -> None:
    metrics = pretrain_nano(tmp_path, progress=False)  # VQGAN in a worker process, LM and CLIP here

    clip = metrics["clip"]
    assert clip["probe_accuracy"] >= 0.85  # 0.94 measured; the random tower gives 0.79
    assert clip["probe_accuracy"] > clip["untrained_probe_accuracy"] + 0.1
    assert clip["retrieval_accuracy"] > 4 * clip["retrieval_chance"]  # 14 held-out captions: chance 0.07, measured 0.67
    assert metrics["vqgan"]["psnr"] >= 22.0  # 23.3 dB measured; a random VQGAN gives about 7 dB
    lm = metrics["lm"]
    assert lm["perplexity"] * 100 < lm["untrained_perplexity"]  # about 1.3 vs the vocabulary size (512)

    # The saved parts reproduce what was measured on them.
    nano = get_variant("nano")
    held_out = phantom_images(phantom_cases(0, 1, metrics["budget"]["eval_cases"], nano.vq.image_size))
    assert evaluate_vqgan(VQGAN.load(tmp_path / "vqgan"), held_out[0])["psnr"] == pytest.approx(
        metrics["vqgan"]["psnr"], abs=1e-9
    )
    train = phantom_images(phantom_cases(0, 0, metrics["budget"]["train_cases"], nano.vq.image_size))
    vision = VisionEncoder(CLIPVisionModel.from_pretrained(tmp_path / "vision"))
    pre = ImagePreprocessor.from_pretrained(str(tmp_path / "vision"))
    layer = nano.plugins[COMPREHENSION].vision_layer
    with torch.no_grad():
        features = [pooled_features(vision, PixelCache(pre, images), layer) for images in (train[0], held_out[0])]
    assert linear_probe(features[0], train[2], features[1], held_out[2]) == pytest.approx(clip["probe_accuracy"])
