"""DICOM in (files, multi-frame, series folders) via pydicom; writing a derived series is `dicom_write`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import UID

from healthgpt.errors import ImageInputError
from healthgpt.io.dicom_geometry import (
    attribute,
    evenly_spaced,
    resample_even,
    slice_affine,
    slice_positions,
    sort_slices,
)
from healthgpt.io.image import MedicalImage, spacing_of
from healthgpt.io.limits import check_allocation, check_picture
from healthgpt.io.messages import one_line, warnings_logged
from healthgpt.io.windowing import Window

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
UnevenSlices = Literal["error", "resample"]
log = logging.getLogger(__name__)


def read_dicom(path: Path, frame: int | None, uneven: UnevenSlices = "error") -> MedicalImage:
    """One DICOM file: a 2D image, or a stack of frames (`frame` picks one) in physical units."""
    with _reading(path):
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception as exc:  # pydicom raises many types on malformed bytes
            raise ImageInputError(
                path, f"is not a readable DICOM file ({one_line(exc)})", "check that the file is complete DICOM"
            ) from exc
        _require_pixels(ds, path)
        frames = int(ds.get("NumberOfFrames") or 1)
        if frame is not None and not 0 <= frame < frames:
            raise ImageInputError(path, f"frame {frame} is out of range for {frames} frames", f"use 0..{frames - 1}")
        picked = [frame] if frame is not None else list(range(frames))
        pixels = _decode(ds, path, frame if frames > 1 else None)
        if len(picked) == 1:
            values = _values(ds, pixels, picked[0])
        else:
            values = np.stack([_values(ds, p, i) for i, p in zip(picked, pixels, strict=True)])
        return _image(path, values, [(ds, i) for i in picked], (ds,), uneven)


def read_dicom_series(folder: Path, uneven: UnevenSlices = "error") -> MedicalImage:
    """A folder holding one series: slices sorted along the slice normal into a (S, H, W) volume."""
    with _reading(folder):
        return _read_series(folder, uneven)


def _read_series(folder: Path, uneven: UnevenSlices) -> MedicalImage:
    datasets = [ds for ds in map(_try_read, sorted(folder.iterdir())) if ds is not None]
    images = [ds for ds in datasets if any(k in ds for k in _PIXEL_KEYWORDS)]
    if not images:
        raise ImageInputError(
            folder,
            "contains no DICOM images",
            "point to a folder holding the .dcm files of one series, or to one file",
        )
    series = {ds.get("SeriesInstanceUID") for ds in images}
    if len(series) > 1:
        raise ImageInputError(folder, f"holds {len(series)} DICOM series", "move each series to its own folder")
    for ds in datasets:  # a member of the series without pixels was cut short
        if ds.get("SeriesInstanceUID") in series:
            _require_pixels(ds, Path(ds.filename))
    images = sort_slices(images, folder)
    if len({(ds.Rows, ds.Columns, int(ds.get("NumberOfFrames") or 1)) for ds in images}) != 1:
        raise ImageInputError(
            folder, "its images differ in size or frame count", "keep one stack of single-frame slices"
        )
    check_allocation(folder, (len(images), images[0].Rows, images[0].Columns), "its volume")
    values = np.stack([_values(ds, _decode(ds, Path(ds.filename), None), 0) for ds in images])
    return _image(folder, values, [(ds, 0) for ds in images], tuple(images), uneven)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Keep pydicom's warnings off stderr (logged at debug level) and name the file in malformed-header errors."""
    with warnings_logged(path):
        try:
            yield
        except ImageInputError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:  # a tag with a bad value
            raise ImageInputError(
                path,
                f"has a malformed DICOM header ({one_line(exc)})",
                "repair the header (e.g. with dcmodify) or export the file again",
            ) from exc


def _try_read(path: Path) -> Dataset | None:
    """The dataset of a DICOM file in a series folder; None for hidden and non-DICOM files."""
    if path.name.startswith(".") or not path.is_file():
        return None
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError):
        return None


def _require_pixels(ds: Dataset, path: Path) -> None:
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise ImageInputError(
            path,
            "has no pixel data (a non-image object such as a report, or a file cut short)",
            "load an image file of the series",
        )
    check_picture(path, int(ds.get("Columns") or 0), int(ds.get("Rows") or 0), int(ds.get("NumberOfFrames") or 1))
    element = ds.get_item(next(k for k in _PIXEL_KEYWORDS if k in ds))
    declared = getattr(element, "length", None)  # pydicom reads to the end of a file shorter than declared
    if declared is not None and declared != 0xFFFFFFFF and element.value is not None and declared > len(element.value):
        raise ImageInputError(
            path,
            f"is truncated or corrupt: its pixel data declares {declared} bytes, the file holds {len(element.value)}",
            "copy or export the file again",
        )


def _decode(ds: Dataset, path: Path, index: int | None) -> np.ndarray:
    """Stored pixel values (one frame if `index`), mapping decoder failures to a message with the fix."""
    try:
        return pixel_array(ds, index=index)
    except Exception as exc:  # decoder plugins raise many types
        raise _decode_error(ds, path, exc) from exc


def _decode_error(ds: Dataset, path: Path, exc: Exception) -> ImageInputError:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    detail = one_line(exc)
    if syntax is None or not UID(syntax).is_compressed:
        return ImageInputError(
            path,
            f"is truncated or corrupt: its pixel data cannot be read ({detail})",
            "copy or export the file again",
        )
    syntax = UID(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is not None and not decoder.is_available:
        return ImageInputError(
            path,
            f"its pixel data is compressed as {syntax.name} and no installed plugin decodes it",
            "pip install one of: " + "; ".join(decoder.missing_dependencies),
        )
    return ImageInputError(
        path,
        f"its {syntax.name} pixel data cannot be decoded ({detail})",
        "install pylibjpeg with pylibjpeg-libjpeg / pylibjpeg-openjpeg, or convert the file "
        "to an uncompressed transfer syntax (e.g. gdcmconv --raw)",
    )


def _values(ds: Dataset, pixels: np.ndarray, frame: int) -> np.ndarray:
    """Physical values (modality LUT / rescale applied) of grey pixels, or 0..255 RGB of colour pixels."""
    if _is_grey(ds):
        return np.asarray(apply_modality_lut(pixels, _rescale_source(ds, frame)), dtype=np.float32)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        top = np.iinfo(rgb.dtype).max
    else:  # RGB, or YBR already converted to RGB by pydicom
        rgb, top = pixels, 2 ** int(ds.BitsStored) - 1
    return rgb.astype(np.float32) * np.float32(255.0 / top)


def _is_grey(ds: Dataset) -> bool:
    return ds.get("SamplesPerPixel", 1) == 1 and ds.get("PhotometricInterpretation") != "PALETTE COLOR"


def _rescale_source(ds: Dataset, frame: int) -> Dataset:
    """The dataset holding the rescale tags: the file, or its functional groups (enhanced multi-frame)."""
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        return ds
    rescale = Dataset()
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if (value := attribute(ds, frame, keyword)) is not None:
            setattr(rescale, keyword, value)
    return rescale


def _image(
    path: Path,
    values: np.ndarray,
    slices: list[tuple[Dataset, int]],
    datasets: tuple[Dataset, ...],
    uneven: UnevenSlices,
) -> MedicalImage:
    """The MedicalImage of decoded values, with geometry, window and headers (pixel data dropped)."""
    head, frame = slices[0]
    affine = slice_affine(slices)
    positions = slice_positions(slices) if affine is not None else None
    if positions is not None and affine is not None and not evenly_spaced(positions):
        gaps = ", ".join(f"{g:g}" for g in dict.fromkeys(np.round(np.diff(positions), 2)))
        if uneven != "resample":
            raise ImageInputError(
                path,
                f"its {len(positions)} slices are unevenly spaced (gaps of {gaps} mm), so no single slice "
                "spacing places them right",
                "resample to an even grid with --uneven-slices resample (uneven_slices='resample' in Python), "
                "or load the evenly spaced part of the series on its own",
            )
        values, affine = resample_even(values, positions, affine)
        datasets = datasets[:1]  # the source headers no longer map one-to-one onto slices
        log.warning(
            "%s: slices unevenly spaced (gaps of %s mm); resampled to %d slices %.4g mm apart",
            path,
            gaps,
            len(values),
            np.linalg.norm(affine[:3, 0]),
        )
    spacing = attribute(head, frame, "PixelSpacing") or attribute(head, frame, "ImagerPixelSpacing")
    center, width = (_first(attribute(head, frame, k)) for k in ("WindowCenter", "WindowWidth"))
    for ds in datasets:
        for keyword in _PIXEL_KEYWORDS:
            ds.pop(keyword, None)
    return MedicalImage(
        array=values,
        path=path,
        modality=str(head.get("Modality") or "OT"),
        pixel_spacing=spacing_of(affine) if affine is not None else _pair(spacing),
        affine=affine,
        datasets=datasets,
        color=not _is_grey(head),
        window=Window(center, width) if center is not None and width and width > 0 else None,
        invert=head.get("PhotometricInterpretation") == "MONOCHROME1",
    )


def _first(value: Any) -> float | None:
    """The first of a multi-valued tag (e.g. several stored windows), as a float."""
    if value is None or value == "":
        return None
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _pair(value: Any) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))
