"""Where commands write, checked before any model loads, and how `--overwrite` replaces a filled output folder.

Generated images are written by `healthgpt.io.write_images`; every writer goes through `healthgpt.io.atomic`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ImageInputError

if TYPE_CHECKING:
    from ..io import MedicalImage


def check_output(
    path: Path, source: MedicalImage | None, *, overwrite: bool = False, inputs: Iterable[Path | None] = ()
) -> None:
    """Fail before any model work if `path` cannot hold the generated image of `source` (`check_image_output`): a
    `.png` holds one slice; `.nii`/`.nii.gz` take the geometry of a source with one, a folder (no suffix) becomes a
    DICOM series derived from a DICOM source."""
    check_image_output(path, overwrite=overwrite, inputs=inputs)
    slices = source.num_slices if source is not None else 1
    nifti = _is_nifti(path)
    if path.suffix.lower() == ".png":
        if slices > 1:
            raise ImageInputError(path, f"a PNG holds one slice, not {slices}", "write .nii.gz or a DICOM folder")
        return
    if source is None or (nifti and source.affine is None) or (not nifti and not source.datasets):
        needed = "a source with geometry (DICOM or NIfTI)" if nifti else "a DICOM source"
        raise ImageInputError(path, f"this output needs {needed}", "write .png, or generate from such a source")


def check_image_output(path: Path, *, overwrite: bool = False, inputs: Iterable[Path | None] = ()) -> None:
    """What `check_output` checks without the source: a supported suffix (.png, .nii, .nii.gz, none for a DICOM
    folder) and a writable target (`check_output_folder` for a folder, `io.atomic.check_target` for a file)."""
    from ..io.atomic import check_target  # healthgpt.io is imported only by commands that need it

    nifti = _is_nifti(path)
    if path.suffix and not nifti and path.suffix.lower() != ".png":
        raise ImageInputError(
            path, f"has the unsupported output suffix {path.suffix!r}", "write .png, .nii, .nii.gz or a folder name"
        )
    if nifti or path.suffix:
        check_target(path, overwrite=overwrite)
    else:
        check_output_folder(path, overwrite=overwrite, inputs=inputs)


def check_output_folder(path: Path, *, overwrite: bool = False, inputs: Iterable[Path | str | None] = ()) -> None:
    """Fail before any model work if the folder `path` cannot be written: `io.atomic.check_target`, and with
    `overwrite`, none of the command's `inputs` may lie inside the filled folder it would replace (`inputs` is
    iterated only then)."""
    from ..io.atomic import check_target

    check_target(path, directory=True, overwrite=overwrite)
    if not (overwrite and path.is_dir() and any(path.iterdir())):
        return
    for given in inputs:
        if given is not None and Path(given).resolve().is_relative_to(path.resolve()):
            raise ImageInputError(
                path, f"holds the input {given}, which replacing the folder would delete", "choose another folder"
            )


@contextmanager
def output_path(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Where to write the output `path`: itself, or with `overwrite` and a filled folder there, a new folder that
    replaces it once the block succeeds (`io.atomic.replacing`). Writers replace files atomically themselves."""
    from ..io.atomic import replacing

    if overwrite and path.is_dir():
        with replacing(path) as target:
            yield target
    else:
        yield path


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))
