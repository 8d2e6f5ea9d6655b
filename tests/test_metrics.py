"""Image metrics against independent computations: formulas, numpy, closed-form SSIM cases, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from healthgpt.metrics import LPIPS, MetricInputError, MetricUnavailable, aggregate, image_metrics


def rgb(seed: int, size: tuple[int, int] = (24, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_psnr_and_mse_match_their_formulas() -> None:
    a, b = rgb(0), rgb(1)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    m = image_metrics(a, b)
    assert m["mse"] == pytest.approx(mse, rel=1e-12)
    assert m["psnr"] == pytest.approx(10 * math.log10(255.0**2 / mse), rel=1e-12)
    unit = image_metrics(a / 255.0, b / 255.0, data_range=1.0)  # same images in [0, 1]: MSE / 255^2
    assert unit["psnr"] == pytest.approx(m["psnr"], rel=1e-9)
    assert unit["mse"] == pytest.approx(mse / 255.0**2, rel=1e-9)


def test_identical_images_are_perfect() -> None:
    a = rgb(2)
    assert image_metrics(a, a) == {"ssim": 100.0, "psnr": math.inf, "mse": 0.0}


def test_ssim_of_constant_images_has_its_closed_form() -> None:
    # Constant images: zero variances, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * L)^2.
    a, b, c1 = 100.0, 120.0, (0.01 * 255) ** 2
    m = image_metrics(np.full((16, 16), a), np.full((16, 16), b), percent=False)
    assert m["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_is_symmetric_and_rgb_is_the_channel_mean() -> None:
    a, b = rgb(3), rgb(4)
    ab, ba = image_metrics(a, b)["ssim"], image_metrics(b, a)["ssim"]
    assert ab == pytest.approx(ba, rel=1e-12) and 0 < abs(ab) < 100
    per_channel = [image_metrics(a[..., c], b[..., c])["ssim"] for c in range(3)]
    assert ab == pytest.approx(np.mean(per_channel), rel=1e-9)


def test_pil_and_numpy_inputs_agree_for_gray_and_rgb() -> None:
    a, b = rgb(5), rgb(6)
    assert image_metrics(Image.fromarray(a), Image.fromarray(b)) == image_metrics(a, b)
    ga, gb = Image.fromarray(a).convert("L"), Image.fromarray(b).convert("L")
    assert image_metrics(ga, gb) == image_metrics(np.asarray(ga)[..., None], np.asarray(gb))


def test_mismatched_or_invalid_inputs_raise_clear_errors() -> None:
    with pytest.raises(MetricInputError, match=r"pred has shape \(24, 32, 3\) but target has \(32, 32, 3\)"):
        image_metrics(rgb(0), rgb(1, size=(32, 32)))
    with pytest.raises(MetricInputError, match="same colour mode"):
        image_metrics(rgb(0), rgb(1)[..., 0])
    with pytest.raises(MetricInputError, match=r"pred: values span \[-1, 1\].*data_range=255"):
        image_metrics(np.linspace(-1, 1, 24 * 32).reshape(24, 32), np.zeros((24, 32)))
    with pytest.raises(MetricInputError, match="'RGBA' unsupported"):
        image_metrics(Image.new("RGBA", (8, 8)), Image.new("RGBA", (8, 8)))
    with pytest.raises(MetricInputError, match="smaller than the 7x7 SSIM window"):
        image_metrics(np.zeros((5, 9)), np.zeros((5, 9)))


def test_aggregate_averages_rows_with_the_same_metrics() -> None:
    rows = [image_metrics(rgb(i), rgb(i + 10)) for i in range(3)]
    mean = aggregate(rows)
    assert mean["psnr"] == pytest.approx(sum(r["psnr"] for r in rows) / 3, rel=1e-12)
    assert set(mean) == {"ssim", "psnr", "mse"}
    with pytest.raises(MetricInputError, match="row 1 has metrics"):
        aggregate([{"ssim": 1.0}, {"psnr": 2.0}])
    with pytest.raises(MetricInputError, match="at least one row"):
        aggregate([])


def test_lpips_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: no backbone weights on disk
    with pytest.raises(MetricUnavailable, match="LPIPS"):
        LPIPS("alex")
    with pytest.raises(MetricInputError, match="one of alex, vgg, squeeze"):
        LPIPS("resnet")
