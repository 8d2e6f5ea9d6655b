"""Chest radiograph phantoms for the report-to-image task: a frontal chest film with cardiomegaly, a pleural
effusion on either side, both or neither; its report; and a reader that recovers the findings from pixels.

Sides are the patient's, shown as radiographs are (the patient's left on the image's right), so "left pleural
effusion" fills the costophrenic angle on the right of the picture and the heart bulges to the picture's right.
The reader measures what a radiologist does: the cardiothoracic ratio (widest heart run over the inner thoracic
width, enlarged above 0.5) and the opacity of each lung base against its upper zone. Deterministic given the
generator; no library draws these, hence by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage

from .world import MAX_SIZE, MIN_SIZE

Effusion = Literal["none", "left", "right"]
EFFUSIONS: tuple[Effusion, ...] = ("none", "left", "right")
CTR_LIMIT = 0.5  # a cardiothoracic ratio above this is cardiomegaly

# Intensities of the film in [0, 1]: air black, lungs dark, soft tissue grey, heart, fluid and bone bright.
_AIR, _SOFT, _LUNG, _FLUID, _HEART, _SPINE = 0.02, 0.42, 0.12, 0.55, 0.62, 0.75
_LUNG_X, _LUNG_Y, _LUNG_A, _LUNG_B = 0.175, 0.50, 0.145, 0.28  # lung centres at 0.5 -+ _LUNG_X; semi-axes
_THORAX = 2 * (_LUNG_X + _LUNG_A)  # inner thoracic width, as a fraction of the image at scale 1
_HEART_X, _HEART_Y, _HEART_B = 0.53, 0.60, 0.11  # heart centre (towards the patient's left) and half height
# the costophrenic angles, where an effusion collects, lateral to the heart (columns as offsets from the midline)
_BASE_ROWS, _BASE_COLUMNS = (0.70, 0.74), (0.19, 0.26)
_UPPER_ROWS = (0.32, 0.47)
_HEART_ROWS = (0.57, 0.63)


@dataclass(frozen=True)
class ChestCase:
    """One synthetic chest film: findings and pose; `ctr` is the true cardiothoracic ratio."""

    size: int
    ctr: float
    effusion: Effusion
    scale: float
    shift: tuple[float, float]  # (rows, columns), fractions of the image
    gain: float
    noise_seed: int

    @property
    def cardiomegaly(self) -> bool:
        return self.ctr > CTR_LIMIT

    def render(self) -> np.ndarray:
        """The film as uint8 (size, size)."""
        n = self.size
        rows, cols = (np.mgrid[0:n, 0:n] + 0.5) / n
        y = (rows - 0.5 - self.shift[0]) / self.scale + 0.5  # canonical coordinates of each pixel
        x = (cols - 0.5 - self.shift[1]) / self.scale + 0.5
        film = np.full((n, n), _AIR)
        film[((x - 0.5) / 0.47) ** 2 + ((y - 0.58) / 0.52) ** 2 <= 1] = _SOFT
        for side in (-1, 1):  # image left, image right
            lung = ((x - 0.5 - side * _LUNG_X) / _LUNG_A) ** 2 + ((y - _LUNG_Y) / _LUNG_B) ** 2 <= 1
            film[lung] = _LUNG
            if self.effusion == ("right" if side < 0 else "left"):  # the patient's right is on the image's left
                lateral = np.abs(x - 0.5 - side * _LUNG_X) / _LUNG_A * (np.sign(x - 0.5) == side)
                film[lung & (y >= _BASE_ROWS[0] - 0.01 - 0.04 * lateral)] = _FLUID  # a meniscus rising laterally
        film[(np.abs(x - 0.5) < 0.06) & (y > 0.08) & (y < 0.62)] = _SOFT  # mediastinum
        half_width = self.ctr * _THORAX / 2
        film[((x - _HEART_X) / half_width) ** 2 + ((y - _HEART_Y) / _HEART_B) ** 2 <= 1] = _HEART
        film[(np.abs(x - 0.5) < 0.03) & (y > 0.05) & (y < 0.95)] = _SPINE
        film = ndimage.gaussian_filter(film, sigma=0.6) * self.gain
        film += np.random.default_rng(self.noise_seed).normal(0.0, 0.015, film.shape)
        return np.clip(np.round(film * 255.0), 0, 255).astype(np.uint8)

    def rgb(self) -> Image.Image:
        return Image.fromarray(self.render()).convert("RGB")


def sample_chest(rng: np.random.Generator, size: int = 64) -> ChestCase:
    """Draw a film: cardiomegaly with probability 1/2 (ratio 0.56-0.66, else 0.38-0.46), an effusion on the
    patient's left or right each with probability 1/4, small pose and exposure changes."""
    if not (isinstance(size, int) and MIN_SIZE <= size <= MAX_SIZE):
        raise ValueError(f"size must be an int in {MIN_SIZE}..{MAX_SIZE}, got {size!r}")
    enlarged = rng.random() < 0.5
    ctr = float(rng.uniform(0.56, 0.66) if enlarged else rng.uniform(0.38, 0.46))
    effusion = EFFUSIONS[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    scale = float(rng.uniform(0.95, 1.03))
    shift = (float(rng.uniform(-0.015, 0.015)), float(rng.uniform(-0.015, 0.015)))
    return ChestCase(size, ctr, effusion, scale, shift, float(rng.uniform(0.94, 1.06)), int(rng.integers(2**63)))


_NORMAL = ("No acute cardiopulmonary abnormality.", "The heart size is normal. The lungs are clear.")
_ENLARGED = ("Cardiomegaly.", "The cardiac silhouette is enlarged.")
_FLUID_WORDS = ("Small {side} pleural effusion.", "There is a {side} pleural effusion.")


def chest_report(case: ChestCase, rng: np.random.Generator) -> str:
    """A short report of the film's findings (one of two wordings for each)."""
    parts = []
    if case.cardiomegaly:
        parts.append(_ENLARGED[int(rng.integers(2))])
    if case.effusion != "none":
        parts.append(_FLUID_WORDS[int(rng.integers(2))].format(side=case.effusion))
    return " ".join(parts) if parts else _NORMAL[int(rng.integers(2))]


@dataclass(frozen=True)
class ChestReading:
    """Findings read from a film's pixels."""

    ctr: float
    effusion: Effusion

    @property
    def cardiomegaly(self) -> bool:
        return self.ctr > CTR_LIMIT

    def matches(self, case: ChestCase) -> bool:
        """Whether the reading has the case's findings (cardiomegaly or not, and the effusion side)."""
        return self.cardiomegaly == case.cardiomegaly and self.effusion == case.effusion


def read_chest(image: np.ndarray | Image.Image) -> ChestReading:
    """The cardiothoracic ratio and effusion side of a film (PIL or array, any square size)."""
    film = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image, dtype=np.float64) / 255.0
    if film.ndim == 3:
        film = film.mean(axis=-1)
    n = film.shape[0]
    band = slice(*(round(r * n) for r in _HEART_ROWS))
    centre = round(_HEART_X * n)
    widths = [_run_width(row > (_LUNG + _HEART) / 2, centre) for row in film[band]]
    lungs = np.flatnonzero(film[round(_LUNG_Y * n), round(0.1 * n) : round(0.9 * n)] < (_LUNG + _SOFT) / 2)
    thorax = lungs[-1] - lungs[0] + 1 if lungs.size else 0
    ctr = float(np.max(widths)) / max(thorax, 1)
    base, upper = slice(*(round(r * n) for r in _BASE_ROWS)), slice(*(round(r * n) for r in _UPPER_ROWS))
    opaque = []
    for side in (-1, 1):
        lateral = slice(*sorted(round((0.5 + side * f) * n) for f in _BASE_COLUMNS))
        opaque.append(film[base, lateral].mean() - film[upper, lateral].mean() > (_FLUID - _LUNG) / 2)
    effusion: Effusion = "none" if opaque[0] == opaque[1] else "right" if opaque[0] else "left"
    return ChestReading(ctr, effusion)


def _run_width(mask: np.ndarray, through: int) -> int:
    """Length of the run of True in the 1-D `mask` that holds index `through` (0 if it is False there)."""
    runs, _ = ndimage.label(mask)
    return int((runs == runs[through]).sum()) if runs[through] else 0
