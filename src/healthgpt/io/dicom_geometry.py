"""DICOM tags and slice geometry: tag look-up through functional groups, the voxel-to-RAS affine, slice order
and spacing, and resampling of unevenly spaced stacks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from healthgpt.errors import ImageInputError

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient LPS <-> RAS (its own inverse)
# A slice may sit this fraction of the mean gap off an even grid before the stack counts as unevenly spaced.
_GAP_TOLERANCE = 0.05


def attribute(ds: Dataset, frame: int, keyword: str) -> Any:
    """A tag of the dataset, else of the frame's or the shared functional group (enhanced multi-frame)."""
    if keyword in ds:
        return ds[keyword].value
    for name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(name)
        if not groups:
            continue
        for element in groups[min(frame, len(groups) - 1)]:
            if element.VR == "SQ" and element.value and keyword in element.value[0]:
                return element.value[0][keyword].value
    return None


def slice_affine(slices: list[tuple[Dataset, int]]) -> np.ndarray | None:
    """(slice, row, column) -> RAS mm from orientation, spacing and the first and last slice positions."""
    first, last = slices[0], slices[-1]
    orientation, spacing = (attribute(*first, k) for k in ("ImageOrientationPatient", "PixelSpacing"))
    origin = _position(*first)
    if orientation is None or spacing is None or origin is None:
        return None
    along_row, along_col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    if len(slices) > 1:
        step = (_position(*last) - origin) / (len(slices) - 1)
    else:
        thickness = attribute(*first, "SpacingBetweenSlices") or attribute(*first, "SliceThickness") or 1.0
        step = np.cross(along_row, along_col) * float(thickness)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = step, along_col * float(spacing[0]), along_row * float(spacing[1])
    lps[:3, 3] = origin
    return LPS @ lps if np.linalg.norm(step) > 0 else None


def slice_positions(slices: list[tuple[Dataset, int]]) -> np.ndarray | None:
    """Each slice's position (mm) along the slice normal, when the headers give every one."""
    orientation = attribute(*slices[0], "ImageOrientationPatient")
    points = [_position(ds, frame) for ds, frame in slices]
    if len(slices) < 3 or orientation is None or any(p is None for p in points):
        return None
    return np.array(points) @ _normal(orientation)


def _position(ds: Dataset, frame: int) -> np.ndarray | None:
    """Frame `frame`'s ImagePositionPatient (LPS mm); RT dose grids give frames as offsets along the normal."""
    origin = attribute(ds, frame, "ImagePositionPatient")
    if origin is None:
        return None
    offsets, orientation = ds.get("GridFrameOffsetVector"), ds.get("ImageOrientationPatient")
    if not offsets or orientation is None or int(ds.get("NumberOfFrames") or 1) == 1:
        return np.array(origin, float)
    # offsets are relative to the first frame, which lies at ImagePositionPatient (both DICOM forms of the vector)
    return np.array(origin, float) + _normal(orientation) * (float(offsets[frame]) - float(offsets[0]))


def _normal(orientation: Sequence[float]) -> np.ndarray:
    """The slice normal (LPS): row direction x column direction of ImageOrientationPatient."""
    return np.cross(np.array(orientation[:3], float), np.array(orientation[3:], float))


def evenly_spaced(positions: np.ndarray) -> bool:
    """True if every slice sits within `_GAP_TOLERANCE` of a gap (or 0.01 mm) of the even first-to-last grid."""
    grid = np.linspace(positions[0], positions[-1], len(positions))
    step = abs(positions[-1] - positions[0]) / (len(positions) - 1)
    return bool(np.max(np.abs(positions - grid)) <= max(_GAP_TOLERANCE * step, 0.01))


def resample_even(values: np.ndarray, positions: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stack linearly interpolated onto an even grid at the median gap, first to last slice, and its affine.

    Hand-written: scipy/skimage zoom assume even input spacing; this interpolates between the true positions.
    """
    gap = float(np.median(np.abs(np.diff(positions))))
    count = int(round(abs(positions[-1] - positions[0]) / gap)) + 1
    targets = np.linspace(positions[0], positions[-1], count)
    ascending = positions if positions[-1] > positions[0] else -positions
    wanted = targets if positions[-1] > positions[0] else -targets
    below = np.clip(np.searchsorted(ascending, wanted, side="right") - 1, 0, len(positions) - 2)
    weight = (wanted - ascending[below]) / (ascending[below + 1] - ascending[below])
    weight = weight.reshape(-1, *([1] * (values.ndim - 1))).astype(np.float32)
    resampled = (1 - weight) * values[below] + weight * values[below + 1]
    out = affine.copy()
    out[:3, 0] = affine[:3, 0] * (len(positions) - 1) / (count - 1)
    return resampled.astype(np.float32), out


def sort_slices(images: list[Dataset], folder: Path) -> list[Dataset]:
    """Slices in physical order: position along the slice normal, else InstanceNumber, else file name."""
    orientation = images[0].get("ImageOrientationPatient")
    if orientation is not None and all("ImagePositionPatient" in ds for ds in images):
        normal = _normal(orientation)
        keys = [float(np.dot(np.array(ds.ImagePositionPatient, float), normal)) for ds in images]
        if len(set(np.round(keys, 3))) < len(keys):
            raise ImageInputError(
                folder,
                "several images share one slice position (echoes, phases or time points)",
                "split the series so each folder holds one stack",
            )
    elif all("InstanceNumber" in ds for ds in images):
        keys = [int(ds.InstanceNumber) for ds in images]
    else:
        keys = list(range(len(images)))
    return [images[i] for i in np.argsort(keys, kind="stable")]
