"""Drawing the phantom world: a case's pose, contrast and lesions, and its CT/MRI slices rendered from them.

CT and MRI are different, non-affine mappings of the Shepp-Logan tissue classes (bone bright on CT and dark on
MRI, CSF dark on CT and bright on MRI, lesions dark-ish on CT and bright on MRI). Deterministic given the generator.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.data import shepp_logan_phantom
from skimage.transform import resize

Modality = Literal["CT", "MRI"]
ImageKey = Literal["ct", "mri", "ct_low_res", "mri_low_res"]

MODALITIES: tuple[Modality, ...] = ("CT", "MRI")
IMAGE_KEYS: tuple[ImageKey, ...] = ("ct", "mri", "ct_low_res", "mri_low_res")
COUNT_WORDS = ("zero", "one", "two", "three")
MIN_SIZE, MAX_SIZE = 32, 512
LOW_RES_FACTOR = 4
FOV_MM = 220.0

# Tissue classes, in the order of the fraction maps. Background and CSF are both 0.0 in Shepp-Logan; they are
# told apart by connectivity to the image border.
_SL_VALUES = {"bone": 1.0, "parenchyma": 0.2, "dense": 0.3, "faint_spots": 0.1, "bright_spots": 0.4}
_TISSUES = ("background", "bone", "parenchyma", "csf", "dense", "faint_spots", "bright_spots")
_LEVELS: dict[str, np.ndarray] = {
    "CT": np.array([0.0, 1.0, 0.45, 0.28, 0.6, 0.36, 0.75]),
    "MRI": np.array([0.0, 0.08, 0.42, 0.78, 0.25, 0.6, 0.15]),  # T2-like: tissue order changes
}
_LESION_LEVEL = {"CT": 0.1, "MRI": 1.0}
_CT_NOISE, _MRI_NOISE = 0.01, 0.02


@dataclass(frozen=True)
class Lesion:
    """A disc lesion in pixel coordinates of the rendered image (x = column, y = row)."""

    x: float
    y: float
    radius: float
    intensity: float  # blending strength in (0, 1]: how far the disc moves towards the lesion level
    side: Literal["left", "right"]


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic subject: geometry, contrast and lesions; images are rendered lazily and cached."""

    size: int
    lesions: tuple[Lesion, ...]
    angle: float  # degrees
    scale: float
    shift: tuple[float, float]  # (rows, columns) in pixels
    gain: float
    bias: tuple[float, float]  # MRI intensity inhomogeneity slopes along (rows, columns)
    noise_seed: int

    @property
    def has_lesion(self) -> bool:
        return bool(self.lesions)

    @property
    def count(self) -> int:
        return len(self.lesions)

    @property
    def side(self) -> Literal["none", "left", "right", "both"]:
        sides = {lesion.side for lesion in self.lesions}
        return "none" if not sides else "both" if len(sides) == 2 else sides.pop()

    @cached_property
    def fractions(self) -> np.ndarray:
        """(tissue classes, size, size) fractions of this case's warped phantom."""
        return _warp(_tissue_fractions(self.size), self.angle, self.scale, self.shift)

    def render(self, modality: Modality, *, lesions: bool = True) -> np.ndarray:
        """Render as uint8 (size, size); `lesions=False` gives the same case, same noise, without lesions."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        img = np.tensordot(_LEVELS[modality], self.fractions, axes=1)
        if lesions and self.lesions:
            alpha = _lesion_alpha(self.lesions, self.size)
            img = img * (1.0 - alpha) + alpha * _LESION_LEVEL[modality]
        noise = np.random.default_rng([self.noise_seed, MODALITIES.index(modality)])
        if modality == "CT":
            img = img * self.gain + noise.normal(0.0, _CT_NOISE, img.shape)
        else:
            rows, cols = np.mgrid[-1 : 1 : self.size * 1j, -1 : 1 : self.size * 1j]
            img = img * self.gain * (1.0 + self.bias[0] * rows + self.bias[1] * cols)
            real, imag = noise.normal(0.0, _MRI_NOISE, (2, *img.shape))
            img = np.hypot(img + real, imag)  # magnitude image: Rician noise
        return _to_uint8(img)

    @cached_property
    def ct(self) -> np.ndarray:
        return _frozen(self.render("CT"))

    @cached_property
    def mri(self) -> np.ndarray:
        return _frozen(self.render("MRI"))

    @cached_property
    def ct_low_res(self) -> np.ndarray:
        return _frozen(degrade(self.ct))

    @cached_property
    def mri_low_res(self) -> np.ndarray:
        return _frozen(degrade(self.mri))

    def image(self, key: ImageKey) -> np.ndarray:
        """The cached uint8 image named by `key` ("ct", "mri", "ct_low_res", "mri_low_res")."""
        if key not in IMAGE_KEYS:
            raise ValueError(f"image key must be one of {IMAGE_KEYS}, got {key!r}")
        return getattr(self, key)

    def rgb(self, key: ImageKey = "ct") -> Image.Image:
        """The image as an RGB PIL image (what vision towers expect)."""
        return Image.fromarray(self.image(key)).convert("RGB")


def degrade(image: np.ndarray, factor: int = LOW_RES_FACTOR) -> np.ndarray:
    """Downsample by `factor` (anti-aliased) and upsample back bicubically: the super-resolution input."""
    small_shape = tuple(max(1, n // factor) for n in image.shape)
    small = resize(image / 255.0, small_shape, order=1, anti_aliasing=True)
    return _to_uint8(resize(small, image.shape, order=3, mode="symmetric"))


def sample_case(rng: np.random.Generator, size: int = 64, p_lesion: float = 0.5, max_lesions: int = 3) -> PhantomCase:
    """Draw a case: small random pose and contrast, and with probability `p_lesion` 1..max_lesions lesions."""
    if not (isinstance(size, int) and MIN_SIZE <= size <= MAX_SIZE):
        raise ValueError(f"size must be an int in {MIN_SIZE}..{MAX_SIZE}, got {size!r}")
    if not 0.0 <= p_lesion <= 1.0:
        raise ValueError(f"p_lesion must be in [0, 1], got {p_lesion}")
    if not 1 <= max_lesions < len(COUNT_WORDS):
        raise ValueError(f"max_lesions must be in 1..{len(COUNT_WORDS) - 1}, got {max_lesions}")
    angle = float(rng.uniform(-5.0, 5.0))
    scale = float(rng.uniform(0.9, 1.0))  # the skull keeps a margin from the border at the largest shift
    shift = (float(rng.uniform(-0.02, 0.02) * size), float(rng.uniform(-0.02, 0.02) * size))
    gain = float(rng.uniform(0.94, 1.06))
    bias = (float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.12, 0.12)))
    noise_seed = int(rng.integers(2**63))
    count = int(rng.integers(1, max_lesions + 1)) if rng.random() < p_lesion else 0
    fractions = _warp(_tissue_fractions(size), angle, scale, shift)
    lesions = place_lesions(rng, fractions, count)
    return PhantomCase(size, lesions, angle, scale, shift, gain, bias, noise_seed)


@functools.cache
def _phantom_labels() -> np.ndarray:
    """Tissue class index per pixel of the 400x400 Shepp-Logan phantom (computed once per process)."""
    values = np.round(shepp_logan_phantom(), 1)
    labels = np.full(values.shape, _TISSUES.index("csf"), dtype=np.int8)
    for name, value in _SL_VALUES.items():
        labels[values == value] = _TISSUES.index(name)
    zero_regions, _ = ndimage.label(values == 0.0)
    labels[zero_regions == zero_regions[0, 0]] = _TISSUES.index("background")
    return labels


@functools.cache
def _tissue_fractions(size: int) -> np.ndarray:
    """(classes, size, size) anti-aliased tissue fractions of the canonical phantom at `size` (read-only)."""
    onehot = (_phantom_labels()[..., None] == np.arange(len(_TISSUES))).astype(np.float64)
    fractions = resize(onehot, (size, size, len(_TISSUES)), order=1, anti_aliasing=True)
    fractions /= fractions.sum(axis=-1, keepdims=True)
    return _frozen(np.ascontiguousarray(fractions.transpose(2, 0, 1)))


def _warp(fractions: np.ndarray, angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """Rotate by `angle` degrees and scale about the centre, then shift; outside the phantom is background."""
    size = fractions.shape[-1]
    centre = np.full(2, (size - 1) / 2)
    cos, sin = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    matrix = np.array([[cos, sin], [-sin, cos]]) / scale  # inverse map: output (row, col) -> input (row, col)
    offset = centre - matrix @ (centre + np.asarray(shift))
    return np.stack(
        [
            ndimage.affine_transform(f, matrix, offset, order=1, mode="constant", cval=float(k == 0))
            for k, f in enumerate(fractions)
        ]
    )


def place_lesions(
    rng: np.random.Generator, fractions: np.ndarray, count: int, existing: Sequence[Lesion] = ()
) -> tuple[Lesion, ...]:
    """Place `count` non-overlapping discs fully inside the skull, each wholly on one side of the midline and clear
    of the `existing` ones (which are not returned)."""
    size = fractions.shape[-1]
    depth = ndimage.distance_transform_edt(fractions[_TISSUES.index("parenchyma") :].sum(axis=0) > 0.99)
    rows, cols = np.indices(depth.shape)
    midline = (size - 1) / 2
    gap = 1.0 + max(1.0, 0.05 * size)  # between disc edges, so that lesions stay countable blobs
    lesions: list[Lesion] = list(existing)
    for _ in range(count):
        radius = max(1.5, float(rng.uniform(0.04, 0.08)) * size)
        while True:  # shrink the disc until it fits (only needed at small sizes)
            free = (depth >= radius + 1.0) & (np.abs(cols - midline) >= radius + 0.5)
            for other in lesions:
                free &= np.hypot(rows - other.y, cols - other.x) >= radius + other.radius + gap
            candidates = np.flatnonzero(free)
            if candidates.size or radius <= 1.0:
                break
            radius = max(1.0, 0.8 * radius)
        if candidates.size == 0:
            raise RuntimeError(f"no room for lesion {len(lesions) - len(existing) + 1} of {count} at size {size}")
        y, x = divmod(int(candidates[rng.integers(candidates.size)]), size)
        side: Literal["left", "right"] = "left" if x < midline else "right"
        lesions.append(Lesion(float(x), float(y), radius, float(rng.uniform(0.7, 1.0)), side))
    return tuple(lesions[len(existing) :])


def _lesion_alpha(lesions: Sequence[Lesion], size: int) -> np.ndarray:
    """Per-pixel blend weight towards the lesion level: anti-aliased discs scaled by their intensity."""
    rows, cols = np.indices((size, size))
    alpha = np.zeros((size, size))
    for lesion in lesions:
        disc = np.clip(lesion.radius + 0.5 - np.hypot(rows - lesion.y, cols - lesion.x), 0.0, 1.0)
        alpha = np.maximum(alpha, disc * lesion.intensity)
    return alpha


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array
