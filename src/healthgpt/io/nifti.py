"""NIfTI in (and the other volumes nibabel reads: ANALYZE, MGH, MINC, PAR/REC, AFNI; RAS-canonical, then radiological
display planes) and NIfTI out (keeping geometry, in both qform and sform) via nibabel."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.parrec import PARRECError
from nibabel.spatialimages import HeaderDataError, ImageDataError

from healthgpt.errors import ImageInputError
from healthgpt.io.atomic import atomic_target
from healthgpt.io.image import MedicalImage, Pixels, as_slices, spacing_of
from healthgpt.io.limits import check_allocation
from healthgpt.io.messages import one_line, warnings_logged

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Other volume formats nibabel reads, by (lower-case) name ending; a header's data file sits beside it.
NIBABEL_SUFFIXES = (".hdr", ".img", ".img.gz", ".mgh", ".mgz", ".mnc", ".par", ".rec", ".head", ".brik", ".brik.gz")
_READ_ERRORS = (ImageFileError, HeaderDataError, ImageDataError, PARRECError, OSError, EOFError, ValueError, zlib.error)


def read_nifti(path: Path, frame: int | None) -> MedicalImage:
    """A 3D volume (or volume `frame` of a 4D series, default 0), RAS-canonical, sliced axially by default."""
    with warnings_logged(path):
        return _read(path, frame)


def _read(path: Path, frame: int | None) -> MedicalImage:
    try:
        loaded = nib.load(path)
        if not isinstance(loaded, nib.spatialimages.SpatialImage) or loaded.affine is None:
            raise ImageInputError(
                path,
                f"is a {type(loaded).__name__.removesuffix('Image')} file (data on surfaces or grayordinates), "
                "not an image volume with a geometry",
                "pass a NIfTI volume, e.g. one written by wb_command -cifti-separate",
            )
        shape = loaded.shape[:3]
        check_allocation(path, shape, "its volume")
        check_allocation(path, (max(shape),) * 2, "a slice padded to a square")
        image = nib.as_closest_canonical(loaded)
        data = _frame(image, frame, path)
        values = np.asarray(data, dtype=np.float32)
    except ImageInputError:
        raise
    except FileNotFoundError as exc:
        raise ImageInputError(
            path,
            f"its data file {Path(exc.filename or '?').name} is missing",
            "keep the data file beside the header, under the same name",
        ) from exc
    except ModuleNotFoundError as exc:
        raise ImageInputError(path, f"reading it needs the {exc.name} package", f"pip install {exc.name}") from exc
    except _READ_ERRORS as exc:
        raise ImageInputError(
            path,
            f"is truncated or corrupt: nibabel cannot read it ({one_line(exc)})",
            "copy or export the file again",
        ) from exc
    volume = MedicalImage(array=values, path=path, affine=image.affine, pixel_spacing=spacing_of(image.affine))
    return volume.reoriented("axial")


def save_nifti(
    data: MedicalImage | Pixels | Sequence[Pixels],
    path: str | Path,
    geometry: MedicalImage | np.ndarray,
) -> Path:
    """Write a slice or (S, H, W) volume with the geometry of `geometry`, atomically; returns the path.

    `geometry` is the source image (its affine is rescaled to the output grid, e.g. a 256x256 generated
    slice) or a 4x4 affine of (slice, row, column) indices. Colour PIL images are stored as luminance.
    The file is written in RAS-canonical order, so it re-reads with the source's canonical affine.
    """
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ImageInputError(path, "is not a NIfTI file name", "end it with .nii or .nii.gz")
    volume = np.stack(as_slices(data, path, gray=True))
    affine = _affine_for(geometry, volume, path)
    if volume.dtype.kind == "f":
        volume = volume.astype(np.float32)
    image = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
    image.set_sform(image.affine, code="scanner")
    image.set_qform(image.affine, code="scanner")  # readers that use the qform only (some FSL tools) see it too
    image.header.set_xyzt_units("mm")
    with atomic_target(path) as tmp:
        nib.save(image, tmp)
    return path


def _frame(image: nib.spatialimages.SpatialImage, frame: int | None, path: Path) -> np.ndarray:
    """The 3D data to show: the volume itself, or one volume of a 4D series (read lazily)."""
    if len(image.shape) not in (3, 4):
        raise ImageInputError(
            path,
            f"has shape {image.shape}; only 3D and 4D NIfTI are images here",
            "squeeze or split the extra dimensions first",
        )
    frames = image.shape[3] if len(image.shape) == 4 else 1
    if frame is not None and not 0 <= frame < frames:
        raise ImageInputError(path, f"frame {frame} is out of range for {frames} volumes", f"use 0..{frames - 1}")
    return image.dataobj[..., frame or 0] if len(image.shape) == 4 else image.dataobj


def _affine_for(geometry: MedicalImage | np.ndarray, volume: np.ndarray, path: Path) -> np.ndarray:
    if isinstance(geometry, np.ndarray):
        affine = geometry
    else:
        if geometry.num_slices != volume.shape[0]:
            raise ImageInputError(
                path,
                f"got {volume.shape[0]} slices for a source of {geometry.num_slices}",
                "write one output slice per source slice",
            )
        affine = geometry.grid_affine(*volume.shape[1:3])
    if affine is None or np.shape(affine) != (4, 4):
        raise ImageInputError(
            path,
            "has no 4x4 affine to write with",
            "pass a source image loaded from NIfTI or DICOM with geometry, or a 4x4 affine",
        )
    return affine
