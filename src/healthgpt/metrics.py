"""Image quality metrics as the paper reports them: SSIM (x100), PSNR (dB), MSE, and optional LPIPS.

SSIM, PSNR and MSE come from scikit-image with its defaults (7x7 uniform window, sample covariance);
intensities lie in [0, data_range] (8-bit images: data_range 255, so MSE is on the 0..255 scale).
LPIPS runs only from weights already on disk; nothing here downloads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from healthgpt.errors import HealthGPTError

PIL_MODES = ("L", "RGB", "I;16", "I", "F")  # single-band or RGB modes whose values are intensities
SSIM_MIN_SIDE = 7  # scikit-image's default SSIM window
# lpips network name -> torchvision weights enum of its backbone (the file torchvision would download)
LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}

ImageLike = Image.Image | np.ndarray


class MetricInputError(HealthGPTError):
    """Images that cannot be compared: different sizes or channels, unsupported modes, out-of-range values."""


class MetricUnavailable(HealthGPTError):
    """A metric whose package or weights are not available locally (LPIPS)."""


def _as_array(image: ImageLike, name: str, data_range: float) -> np.ndarray:
    """(H, W) or (H, W, 3) float64 intensities of a PIL image or array, checked to lie in [0, data_range]."""
    if isinstance(image, Image.Image):
        if image.mode not in PIL_MODES:
            raise MetricInputError(f"{name}: PIL mode {image.mode!r} unsupported; convert to 'RGB' or 'L'")
        image = np.asarray(image)
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 and not (array.ndim == 3 and array.shape[-1] == 3):
        raise MetricInputError(f"{name}: expected an (H, W) or (H, W, 3) image, got shape {array.shape}")
    low, high = float(array.min()), float(array.max())
    if not (0.0 <= low and high <= data_range):
        raise MetricInputError(
            f"{name}: values span [{low:g}, {high:g}] but intensities must lie in "
            f"[0, data_range={data_range:g}]; rescale the image or pass the matching data_range"
        )
    return array


def _pair(pred: ImageLike, target: ImageLike, data_range: float) -> tuple[np.ndarray, np.ndarray]:
    if data_range <= 0:
        raise MetricInputError(f"data_range must be positive, got {data_range}")
    a, b = _as_array(pred, "pred", data_range), _as_array(target, "target", data_range)
    if a.shape != b.shape:
        raise MetricInputError(
            f"pred has shape {a.shape} but target has {b.shape}; resize pred to the target's size and use "
            "the same colour mode for both"
        )
    if min(a.shape[:2]) < SSIM_MIN_SIDE:
        side = SSIM_MIN_SIDE
        raise MetricInputError(f"images of {a.shape[:2]} are smaller than the {side}x{side} SSIM window")
    return a, b


def image_metrics(
    pred: ImageLike, target: ImageLike, *, data_range: float = 255.0, percent: bool = True
) -> dict[str, float]:
    """{"ssim", "psnr", "mse"} of `pred` against `target`: SSIM x100 when `percent` (channel mean for RGB),
    PSNR in dB (inf for identical images), MSE in the units of [0, data_range]."""
    a, b = _pair(pred, target, data_range)
    ssim = structural_similarity(a, b, data_range=data_range, channel_axis=-1 if a.ndim == 3 else None)
    with np.errstate(divide="ignore"):  # identical images: PSNR is +inf, not a warning
        psnr = peak_signal_noise_ratio(b, a, data_range=data_range)
    scale = 100.0 if percent else 1.0
    return {"ssim": float(ssim) * scale, "psnr": float(psnr), "mse": float(mean_squared_error(a, b))}


def aggregate(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over per-image rows (as the paper's tables report); all rows need the same keys."""
    if not rows:
        raise MetricInputError("aggregate needs at least one row of metrics")
    keys = set(rows[0])
    for i, row in enumerate(rows):
        if set(row) != keys:
            raise MetricInputError(f"row {i} has metrics {sorted(row)} but row 0 has {sorted(keys)}")
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


class LPIPS:
    """LPIPS distance (lower is closer) from the `lpips` package, built only when its backbone weights are
    already in the torch hub cache: torchvision would otherwise download them."""

    def __init__(self, net: str = "alex") -> None:
        if net not in LPIPS_BACKBONES:
            raise MetricInputError(f"LPIPS net must be one of {', '.join(LPIPS_BACKBONES)}, got {net!r}")
        try:
            import lpips
            import torch
            import torchvision
        except ImportError as e:
            raise MetricUnavailable(f"LPIPS needs the `lpips` and `torchvision` packages ({e})") from e
        weights = getattr(torchvision.models, LPIPS_BACKBONES[net]).IMAGENET1K_V1
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        if not os.path.isfile(path):
            raise MetricUnavailable(f"LPIPS ({net}) needs its backbone weights at {path}; put the file there")
        self._torch = torch
        self._model = lpips.LPIPS(net=net, verbose=False).eval()

    def __call__(self, pred: ImageLike, target: ImageLike, *, data_range: float = 255.0) -> float:
        a, b = _pair(pred, target, data_range)
        with self._torch.no_grad():
            return float(self._model(self._tensor(a, data_range), self._tensor(b, data_range)))

    def _tensor(self, array: np.ndarray, data_range: float) -> Any:
        """(1, 3, H, W) float32 in [-1, 1], the range lpips expects; grayscale repeated to three channels."""
        rgb = np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array
        return self._torch.from_numpy(rgb / data_range * 2 - 1).float().permute(2, 0, 1)[None]
