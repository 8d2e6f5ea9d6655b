"""PNG / JPEG / TIFF / BMP in and PNG out via PIL (tifffile for TIFF layouts PIL lacks, e.g. float or planar
colour), with decompression bombs turned into a clear error."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from healthgpt.errors import ImageInputError
from healthgpt.io.atomic import atomic_target
from healthgpt.io.image import MedicalImage
from healthgpt.io.limits import check_picture
from healthgpt.io.messages import one_line
from healthgpt.io.windowing import Window

_HIGH_DEPTH_GREY = ("I;16", "I;16B", "I;16L", "I", "F")  # kept as values; shown with a percentile window
_EIGHT_BIT_GREY = ("1", "L", "LA")
_IDENTITY_8BIT = Window(127.5, 255)  # maps 0..255 onto itself
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF


def read_raster(path: Path, frame: int | None) -> MedicalImage:
    """A raster image (page `frame` of a multi-page file); pixel limit (`io.limits`) checked before decoding."""
    try:
        # PIL only warns between one and two times its limit; make that an error too. Not thread-safe,
        # like every use of warnings filters, but PIL offers no per-call limit.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _seek(image, frame, path)
                check_picture(path, image.width, image.height)  # from the header, before decoding
                image.load()
                return _image(image, path)
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(
            path,
            f"is too large to decode safely ({one_line(exc)})",
            "if the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS before loading",
        ) from exc
    except UnidentifiedImageError as exc:
        with path.open("rb") as file:
            if file.read(4) in _TIFF_MAGIC:
                return _read_tiff(path, frame)
        raise ImageInputError(
            path,
            "is not a recognised image",
            "pass a PNG, JPEG, TIFF, BMP, DICOM (.dcm) or NIfTI (.nii, .nii.gz) file",
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(
            path, f"is truncated or corrupt: PIL cannot decode it ({one_line(exc)})", "copy or export the file again"
        ) from exc


def save_png(image: MedicalImage | Image.Image | np.ndarray, path: str | Path) -> Path:
    """Write a PNG atomically: a MedicalImage is rendered with its window; arrays must be uint8/uint16."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ImageInputError(path, "is not a .png file name", "end the name with .png")
    if isinstance(image, MedicalImage):
        image = image.to_pil()
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, path)
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _seek(image: Image.Image, frame: int | None, path: Path) -> None:
    _check_frame(frame, getattr(image, "n_frames", 1), path)
    image.seek(frame or 0)


def _check_frame(frame: int | None, frames: int, path: Path) -> None:
    if frame is not None and not 0 <= frame < frames:
        raise ImageInputError(path, f"frame {frame} is out of range for {frames} frames", f"use 0..{frames - 1}")


def _read_tiff(path: Path, frame: int | None) -> MedicalImage:
    """Page `frame` of a TIFF that PIL cannot decode, via tifffile: grey keeps its values, colour maps to 0..255."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            _check_frame(frame, len(tiff.pages), path)
            page = tiff.pages[frame or 0]
            pixels = page.asarray()
            photometric = page.photometric
    except ImageInputError:
        raise
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        raise ImageInputError(
            path,
            f"is truncated or corrupt: tifffile cannot decode it ({one_line(exc)})",
            "copy or export the file again",
        ) from exc
    if pixels.ndim == 3 and photometric == tifffile.PHOTOMETRIC.RGB and pixels.shape[0] in (3, 4):
        pixels = np.moveaxis(pixels, 0, -1)  # planar (separate) RGB: channels first on disk
    if pixels.ndim == 2:
        return MedicalImage(pixels.astype(np.float32), path)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ImageInputError(path, f"has a TIFF page of shape {pixels.shape}", "save it as grey or RGB pages")
    rgb = pixels[..., :3].astype(np.float32)
    if pixels.dtype.kind == "f":
        top = 1.0 if rgb.max() <= 1 else 255.0  # float colour: 0..1, else taken as 0..255
    else:
        top = float(np.iinfo(pixels.dtype).max)
    return MedicalImage(np.clip(rgb * np.float32(255 / top), 0, 255), path, color=True)


def _image(image: Image.Image, path: Path) -> MedicalImage:
    """Grey images keep their values (8-bit ones shown as they are); everything else becomes RGB."""
    if image.mode in _HIGH_DEPTH_GREY:
        return MedicalImage(np.asarray(image, dtype=np.float32), path)
    if image.mode in _EIGHT_BIT_GREY:
        return MedicalImage(np.asarray(image.convert("L"), dtype=np.float32), path, window=_IDENTITY_8BIT)
    return MedicalImage(np.asarray(image.convert("RGB"), dtype=np.float32), path, color=True)


def _array_to_pil(array: np.ndarray, path: Path) -> Image.Image:
    grey, rgb = array.ndim == 2, array.ndim == 3 and array.shape[2] == 3
    if (array.dtype == np.uint8 and (grey or rgb)) or (array.dtype == np.uint16 and grey):
        return Image.fromarray(array)
    raise ImageInputError(
        path,
        f"cannot store a {array.dtype} array of shape {array.shape} as PNG",
        "pass uint8 (H, W) / (H, W, 3) or uint16 (H, W), e.g. MedicalImage.to_pil()",
    )
