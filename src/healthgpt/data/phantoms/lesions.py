"""Whether a generated phantom keeps its lesions, and whether it invents new ones: the measure of issue 17.

A lesion counts as recalled when, in the generated image, the mean intensity of its disc differs from the ring around
it by at least half of that difference in the true target (same sign). False lesions are tested the same way at
decoy positions: spots inside the skull, clear of the true lesions, where a lesion would fit; a decoy counts as a
false lesion when the generated image's contrast there has moved from the true target's by at least half of what a
real lesion at that spot would add (the case rendered with the decoy gives that). No library offers this, hence by
hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import Lesion, Modality, PhantomCase, place_lesions

RING_WIDTH = 2.0  # pixels of surround between 1 and 3 pixels outside a disc's edge
DECOYS = 3  # decoy positions per case for the false-lesion rate


@dataclass(frozen=True)
class LesionCheck:
    """Per-image outcome: which true lesions were recalled and which decoy spots show a false lesion."""

    recalled: tuple[bool, ...]
    false: tuple[bool, ...]


def as_gray(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """A (size, size) float array of `image` (PIL or array, RGB averaged); a different size is an error."""
    array = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if array.ndim == 3:
        array = array.mean(axis=-1)
    if array.shape != (size, size):
        raise ValueError(f"image is {array.shape[1]}x{array.shape[0]} but the case is {size}x{size}: resize it first")
    return array


def lesion_contrast(image: np.ndarray, lesion: Lesion, others: Sequence[Lesion] = ()) -> float:
    """Mean intensity of `lesion`'s disc minus that of the ring 1..3 pixels outside its edge (pixels within a pixel
    of another lesion in `others` left out of the ring)."""
    rows, cols = np.indices(image.shape)
    distance = np.hypot(rows - lesion.y, cols - lesion.x)
    disc = distance <= max(lesion.radius, 0.75)  # at least the centre pixel
    ring = (distance > lesion.radius + 1.0) & (distance <= lesion.radius + 1.0 + RING_WIDTH)
    for other in others:
        ring &= np.hypot(rows - other.y, cols - other.x) > other.radius + 1.0
    return float(image[disc].mean() - image[ring].mean())


def kept(generated: np.ndarray, truth: np.ndarray, lesion: Lesion, others: Sequence[Lesion] = ()) -> bool:
    """Whether `generated` shows at least half of `truth`'s disc-to-ring contrast at `lesion`, with the same sign."""
    expected = lesion_contrast(truth, lesion, others)
    return bool(np.sign(expected) * lesion_contrast(generated, lesion, others) >= 0.5 * abs(expected))


def invented(
    generated: np.ndarray, truth: np.ndarray, with_spot: np.ndarray, spot: Lesion, others: Sequence[Lesion] = ()
) -> bool:
    """Whether `generated` shows a lesion at `spot` where `truth` has none: its contrast there moved from `truth`'s
    towards that of `with_spot` (the truth with a lesion at `spot`) by at least half the way."""
    before, lesion = lesion_contrast(truth, spot, others), lesion_contrast(with_spot, spot, others)
    return bool(
        np.sign(lesion - before) * (lesion_contrast(generated, spot, others) - before) >= 0.5 * abs(lesion - before)
    )


def decoys(case: PhantomCase, n: int = DECOYS) -> tuple[Lesion, ...]:
    """`n` lesion positions in `case` clear of its lesions (deterministic per case)."""
    rng = np.random.default_rng([case.noise_seed, 0x4445])  # "DE": apart from the case's other streams
    return place_lesions(rng, case.fractions, n, existing=case.lesions)


def check_lesions(
    generated: np.ndarray | Image.Image, case: PhantomCase, modality: Modality, truth: np.ndarray | None = None
) -> LesionCheck:
    """Recall of `case`'s lesions and false lesions at its decoys in `generated`, against `truth` (by default the
    case rendered in `modality`, the target of conversion and reconstruction)."""
    image = as_gray(generated, case.size)
    target = as_gray(case.image("ct" if modality == "CT" else "mri") if truth is None else truth, case.size)
    recalled = tuple(kept(image, target, lesion, case.lesions) for lesion in case.lesions)
    spots = decoys(case)
    with_spots = as_gray(dataclasses.replace(case, lesions=case.lesions + spots).render(modality), case.size)
    false = tuple(invented(image, target, with_spots, spot, case.lesions + spots) for spot in spots)
    return LesionCheck(recalled, false)


def lesion_rates(checks: Sequence[LesionCheck]) -> dict[str, float]:
    """{"lesion_recall", "false_lesions"}: recalled lesions over all lesions, false decoys over all decoys (nan when
    there is nothing to count)."""
    recalled = [r for check in checks for r in check.recalled]
    false = [f for check in checks for f in check.false]
    return {
        "lesion_recall": float(np.mean(recalled)) if recalled else float("nan"),
        "false_lesions": float(np.mean(false)) if false else float("nan"),
    }
