"""Hierarchical visual perception: padding, preprocessing, the two depths, one tower pass for both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionModel

from healthgpt.config import get_variant
from healthgpt.nano import random_vision
from healthgpt.vision import ImagePreprocessor, build_projector, pad_to_square, project_images


def test_pad_to_square_centres_on_the_mean_colour():
    image = Image.fromarray(np.full((30, 50, 3), 200, dtype=np.uint8))
    square = np.asarray(pad_to_square(image, (122, 116, 104)))
    assert square.shape == (50, 50, 3)
    assert (square[10:40] == 200).all()  # offset (50 - 30) // 2 = 10
    assert (square[:10] == (122, 116, 104)).all() and (square[40:] == (122, 116, 104)).all()


def test_preprocessor_background_is_int_of_mean_times_255():
    vision = get_variant("nano").vision
    pre = ImagePreprocessor.for_clip(vision.image_size, vision.image_mean, vision.image_std)
    assert pre.background == (122, 116, 104)
    pixels = pre([Image.new("L", (20, 60), 0)])  # grey input is converted to RGB
    assert pixels.shape == (1, 3, vision.image_size, vision.image_size)
    corner = pixels[0, :, 0, 0]
    expected = (torch.tensor([122, 116, 104]) / 255 - torch.tensor(vision.image_mean)) / torch.tensor(vision.image_std)
    torch.testing.assert_close(corner, expected.float(), atol=1e-6, rtol=0)


def test_a_long_thin_picture_is_shrunk_before_padding_and_small_ones_are_untouched():
    pre = ImagePreprocessor.for_clip(32, (0.5,) * 3, (0.5,) * 3)
    assert pre.bounded(Image.new("RGB", (9000, 10))).size == (128, 1)  # longer side 4 x 32, aspect kept
    for size in ((128, 40), (999, 999)):
        assert pre.bounded(Image.new("RGB", size)).size == size
    # What the model sees hardly changes: the same picture padded at full size, then processed (the old way).
    ramp = np.linspace(0, 255, 1000)[None, :, None] * np.ones((40, 1, 3))
    picture = Image.fromarray(ramp.astype(np.uint8))
    full = pre.processor(images=[pad_to_square(picture, pre.background)], return_tensors="np")["pixel_values"]
    difference = (pre([picture]) - torch.as_tensor(full)).abs()
    assert pre.bounded(picture).size == (128, 5) and difference.mean() < 0.01 and difference.max() < 0.2


def test_features_are_clip_hidden_states_at_each_depth_with_cls_dropped():
    encoder = random_vision(get_variant("nano").vision)
    pixels = torch.randn(2, 3, 112, 112)
    feats = encoder.features(pixels, [1, -2])
    with torch.no_grad():
        reference = CLIPVisionModel.forward(encoder.tower, pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats[1], reference[1][:, 1:])
    torch.testing.assert_close(feats[-2], reference[-2][:, 1:])
    assert feats[1].shape == (2, encoder.num_patches, encoder.hidden_size)


def test_tower_runs_once_for_images_of_both_plugins():
    encoder = random_vision(get_variant("nano").vision)
    calls = []
    encoder.tower.register_forward_hook(lambda *a: calls.append(1))
    projectors = {"comprehension": build_projector(32, 16), "generation": build_projector(32, 16)}
    layers = {"comprehension": -2, "generation": 1}
    pixels = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        out = project_images(encoder, projectors, layers, pixels, ["comprehension", "generation", "comprehension"])
        alone = project_images(encoder, projectors, layers, pixels[1:2], ["generation"])
    assert len(calls) == 2  # one pass for the mixed batch, one for the single image
    torch.testing.assert_close(out[1], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="3 images but 2 plugin"):
        project_images(encoder, projectors, layers, pixels, ["comprehension", "generation"])
