"""Generation scoring: pairing by stem, codes decoded by the caller, means over pairs, the paper table."""

import math
import sys
import types

import numpy as np
import pytest
from PIL import Image

from healthgpt.evaluation import generation_table, score_image_pairs


def _save(path, value, size=(4, 4), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


@pytest.fixture
def fake_metrics(monkeypatch):
    """A stand-in `healthgpt.metrics` whose MSE is exact and whose calls are recorded."""
    calls = []

    def image_metrics(pred, target, data_range=255.0, percent=True):
        calls.append((pred.dtype, pred.shape, data_range, percent))
        return {"mse": float(np.mean((pred - target) ** 2)), "ssim": 50.0}

    monkeypatch.setitem(sys.modules, "healthgpt.metrics", types.SimpleNamespace(image_metrics=image_metrics))
    return calls


def test_pairs_by_stem_decodes_codes_and_averages(tmp_path, fake_metrics):
    out, tgt = tmp_path / "out", tmp_path / "tgt"
    _save(tgt / "case1.png", 100)
    _save(tgt / "case2.png", 50)
    _save(out / "case1.png", (110, 110, 110), mode="RGB")  # RGB output is compared in grey: MSE 10^2
    out.mkdir(exist_ok=True)
    np.save(out / "case2.npy", np.full(16, 5, dtype=np.int64))  # codes -> 5*10 = 50: MSE 0
    _save(out / "extra.png", 0)

    def decode(codes):
        return (codes.reshape(4, 4) * 10).astype(np.uint8)

    res = score_image_pairs(out, tgt, decode=decode, lpips=lambda a, b: 0.125)
    assert res["n"] == 2 and res["unpaired_outputs"] == 1
    assert res["per_image"]["case1"] == {"mse": 100.0, "ssim": 50.0, "lpips": 12.5}
    assert res["per_image"]["case2"]["mse"] == 0.0
    assert (res["mse"], res["ssim"], res["lpips"]) == (50.0, 50.0, 12.5)
    assert fake_metrics[0] == (np.float64, (4, 4), 255.0, True)


def test_text_codes_missing_outputs_and_shape_mismatch(tmp_path, fake_metrics):
    out, tgt = tmp_path / "out", tmp_path / "tgt"
    _save(tgt / "a.png", 20)
    out.mkdir()
    (out / "a.txt").write_text(", ".join(["2"] * 16))
    res = score_image_pairs(out, tgt, decode=lambda c: (c.reshape(4, 4) * 10).astype(np.uint8))
    assert res["mse"] == 0.0
    with pytest.raises(ValueError, match="decode"):
        score_image_pairs(out, tgt)
    _save(tgt / "b.png", 20)
    with pytest.raises(FileNotFoundError, match="1 targets have no output"):
        score_image_pairs(out, tgt, decode=lambda c: c)
    _save(out / "b.png", 20, size=(8, 8))
    with pytest.raises(ValueError, match="shape"):
        score_image_pairs(out, tgt, decode=lambda c: (c.reshape(4, 4) * 10).astype(np.uint8))


def test_generation_table():
    results = {
        "CT→MRI brain": {"n": 3, "ssim": 79.381, "psnr": 33.034, "mse": 33.48},
        "SR": {"n": 2, "ssim": 78.19, "psnr": 32.76, "mse": 34.47, "lpips": 12.02},
    }
    assert generation_table(results) == (
        "| task | n | SSIM | PSNR | MSE | LPIPS |\n"
        "|---|---|---|---|---|---|\n"
        "| CT→MRI brain | 3 | 79.38 | 33.03 | 33.48 | – |\n"
        "| SR | 2 | 78.19 | 32.76 | 34.47 | 12.02 |\n"
    )


def test_with_the_real_image_metrics(tmp_path):
    pytest.importorskip("healthgpt.metrics")
    out, tgt = tmp_path / "out", tmp_path / "tgt"
    _save(tgt / "x.png", 100, size=(16, 16))
    _save(out / "x.png", 110, size=(16, 16))
    _save(tgt / "y.png", 60, size=(16, 16))
    _save(out / "y.png", 60, size=(16, 16))
    res = score_image_pairs(out, tgt)
    assert res["per_image"]["x"]["mse"] == pytest.approx(100.0)
    assert res["per_image"]["x"]["psnr"] == pytest.approx(10 * math.log10(255**2 / 100))
    assert res["per_image"]["y"]["ssim"] == pytest.approx(100.0)
    assert res["mse"] == pytest.approx(50.0)
