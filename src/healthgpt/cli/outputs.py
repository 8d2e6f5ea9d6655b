"""Where generated images may be written, checked before any model loads (`healthgpt.io.write_images` writes them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..io import MedicalImage


def check_output(path: Path, source: MedicalImage | None, *, overwrite: bool = False) -> None:
    """Fail before any model work if `path` cannot hold the result: a `.png` holds one slice; `.nii`/`.nii.gz` take
    the geometry of a source with one, a folder (no suffix) becomes a DICOM series derived from a DICOM source. The
    folder to write into must exist and be writable, a series folder be new or empty, and an existing file is kept
    unless `overwrite`."""
    from ..io import ImageInputError
    from ..io.atomic import check_target

    slices = source.num_slices if source is not None else 1
    nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    check_target(path, directory=not (nifti or path.suffix), overwrite=overwrite)
    if path.suffix.lower() == ".png":
        if slices > 1:
            raise ImageInputError(path, f"a PNG holds one slice, not {slices}", "write .nii.gz or a DICOM folder")
        return
    if not nifti and path.suffix:
        raise ImageInputError(
            path, f"has the unsupported output suffix {path.suffix!r}", "write .png, .nii, .nii.gz or a folder name"
        )
    if source is None or (nifti and source.affine is None) or (not nifti and not source.datasets):
        needed = "a source with geometry (DICOM or NIfTI)" if nifti else "a DICOM source"
        raise ImageInputError(path, f"this output needs {needed}", "write .png, or generate from such a source")
