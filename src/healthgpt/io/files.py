"""`load_image`, `write_volume` and `write_images`: pick the reader or writer from the file's content and name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from healthgpt.errors import ImageInputError
from healthgpt.io.dicom import UnevenSlices, read_dicom, read_dicom_series
from healthgpt.io.dicom_write import save_dicom_series
from healthgpt.io.image import MedicalImage, Pixels, Plane, SliceIndex, select
from healthgpt.io.nifti import NIBABEL_SUFFIXES, NIFTI_SUFFIXES, read_nifti, save_nifti
from healthgpt.io.raster import read_raster, save_png
from healthgpt.io.windowing import WindowSpec, parse_window

if TYPE_CHECKING:
    from PIL import Image

# (offset, magic) of NIfTI-1 (byte 344) and NIfTI-2 (byte 4) headers, single file or header of a pair
_NIFTI_MAGIC = ((344, b"n+1\0"), (344, b"ni1\0"), (4, b"n+2\0"), (4, b"ni2\0"))


def load_image(
    path: str | Path,
    *,
    window: WindowSpec = None,
    slice_index: SliceIndex = None,
    axis: Plane | int | None = None,
    frame: int | None = None,
    uneven_slices: UnevenSlices = "error",
) -> MedicalImage:
    """Read PNG/JPEG/TIFF/BMP, DICOM (file or series folder), NIfTI or another nibabel volume into physical units.

    Volumes (NIfTI, series folders, multi-frame DICOM) give their middle slice unless `slice_index` is an
    index or "all"; the frames of one file without geometry (a cine or colour multi-frame DICOM) give the
    first. `axis` ("axial", "coronal", "sagittal" or RAS axis 0-2) reslices a volume; by default NIfTI is
    sliced axially and DICOM along its own stack. `frame` picks the volume of a 4D NIfTI (default 0), the
    frame of a multi-frame DICOM or the page of a multi-page image. A DICOM stack with uneven slice gaps is
    refused, or with `uneven_slices="resample"` linearly resampled to an even grid at its median gap (logging
    a warning that names the gaps). `window` sets the display window used by `to_pil()`; without it, the
    file's own DICOM window, else CT soft tissue, else percentiles.
    """
    path = Path(path)
    parse_window(window, path)  # fail on a bad window before decoding anything
    image = _read(path, frame, uneven_slices)
    if slice_index is None and axis is None and image.is_volume and image.affine is None and path.is_file():
        slice_index = 0  # the frames of one file without geometry are a sequence (cine, colour), not a volume
    image = select(image, slice_index, axis).with_window(window)
    if not np.isfinite(image.array).any():  # windowing would show noise or one grey; the model would answer anyway
        raise ImageInputError(
            path, "holds no finite pixel value (all NaN or infinite)", "pick another slice or frame, or export it again"
        )
    return image


def write_volume(
    slices: MedicalImage | Pixels | Sequence[Pixels],
    source: MedicalImage,
    path: str | Path,
    *,
    description: str = "healthgpt synthetic",
    modality: str | None = None,
) -> Path:
    """Write slices with the source's geometry: NIfTI for .nii/.nii.gz, a DICOM series for a folder name (its
    Modality `modality`, default the source's)."""
    path = Path(path)
    if path.name.endswith(NIFTI_SUFFIXES):
        return save_nifti(slices, path, source)
    if not path.suffix:
        return save_dicom_series(slices, source, path, description=description, modality=modality)
    raise ImageInputError(
        path,
        f"has the unsupported output suffix {path.suffix!r}",
        "end it with .nii or .nii.gz, or give a folder name (no suffix) for a DICOM series",
    )


def write_images(
    images: Sequence[Image.Image], source: MedicalImage | None, path: str | Path, modality: str | None = None
) -> Path:
    """Write generated slices by `path`'s suffix (atomically): a PNG of the first, or a volume with the source's
    geometry (`write_volume`: a DICOM series of Modality `modality`, default the source's)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        return save_png(images[0], path)
    if source is None:
        raise ImageInputError(path, "a volume output needs a source with geometry", "write .png instead")
    return write_volume(list(images), source, path, modality=modality)


def _read(path: Path, frame: int | None, uneven: UnevenSlices) -> MedicalImage:
    if path.is_dir():
        if frame is not None:
            raise ImageInputError(
                path,
                "frame applies to one multi-frame file, not a series folder",
                "use slice_index to pick a slice",
            )
        return read_dicom_series(path, uneven)
    if not path.exists():
        raise ImageInputError(path, "does not exist", f"check the path (relative paths start at {Path.cwd()})")
    with path.open("rb") as file:
        head = file.read(348)
    if not head:
        raise ImageInputError(path, "is empty (0 bytes)", "copy or export the file again")
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        return read_dicom(path, frame, uneven)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES + NIBABEL_SUFFIXES) or any(head[i : i + 4] == m for i, m in _NIFTI_MAGIC):
        return read_nifti(path, frame)
    return read_raster(path, frame)
