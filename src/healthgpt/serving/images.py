"""Images sent to the server: `data:` URIs and uploads (PNG/JPEG/DICOM/NIfTI, recognised by content) and the limits
checked before any pixel is decoded. File-system paths are never read; remote URLs are fetched by `remote`."""

from __future__ import annotations

import base64
import binascii
import io
import math
import zlib

import nibabel as nib
import pydicom
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError
from PIL import Image, UnidentifiedImageError

from ..errors import ImageInputError, ImageRejected
from ..io import load_image
from ..io.atomic import scratch_folder

_NIFTI_MAGIC = (b"n+1\0", b"ni1\0")  # at byte 344 of a NIfTI-1 header
_FORMATS = "PNG, JPEG, DICOM or NIfTI"


def is_remote(url: str) -> bool:
    """True for http(s) URLs."""
    return url.lower().startswith(("http://", "https://"))


def data_uri_bytes(url: str, name: str) -> bytes:
    """The bytes of a base64 `data:` URI; anything else that is not a remote URL (file://, paths) is refused."""
    if not url.startswith("data:"):
        if url.lower().startswith("file:") or not is_remote(url):
            raise ImageRejected(
                f"{name} is a file path or file:// URL; the server never reads files from a request: send the image "
                "inline as a data: URI (data:image/png;base64,...)"
            )
        raise ImageRejected(f"{name} is not a data: URI")
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageRejected(f"{name} must be a base64 data: URI such as data:image/png;base64,...")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageRejected(f"{name} is not valid base64 ({exc})") from None


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> Image.Image:
    """The RGB picture the model sees: rasters as they are, DICOM/NIfTI (middle slice of a volume) in their default
    display window. Pixel counts are checked from the headers first (blocking: run it off the event loop)."""
    if not data:
        raise ImageRejected(f"{name} is empty")
    suffix = _suffix(data)
    pixels = _pixel_count(data, suffix, name)
    if pixels > max_pixels:
        raise ImageRejected(
            f"{name} would need {pixels} pixels (all its slices, or the square it is padded to), more than the "
            f"server's limit of {max_pixels}"
        )
    with scratch_folder("healthgpt-upload") as folder:  # what a killed server left is removed at the next upload
        path = folder / f"upload{suffix}"
        path.write_bytes(data)
        try:
            return load_image(path).to_pil()
        except ImageInputError as exc:
            raise ImageRejected(f"{name} {exc.problem}; send a {_FORMATS} image") from None


def _suffix(data: bytes) -> str:
    """The file name ending `healthgpt.io.load_image` recognises, chosen from the content."""
    if data[128:132] == b"DICM":
        return ".dcm"
    if data[:2] == b"\x1f\x8b":
        return ".nii.gz"
    if data[344:348] in _NIFTI_MAGIC:
        return ".nii"
    return ""


def _pixel_count(data: bytes, suffix: str, name: str) -> int:
    """Pixels that decoding will allocate, from the header alone: all slices of a volume, or the square canvas the
    picture is padded to, whichever is more."""
    try:
        if suffix == ".dcm":
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            shape = (int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns))
        elif suffix:
            head = zlib.decompressobj(wbits=31).decompress(data, 348) if suffix == ".nii.gz" else data[:348]
            shape = nib.Nifti1Header.from_fileobj(io.BytesIO(head)).get_data_shape()[:3]  # a 4D series: one volume
        else:
            with Image.open(io.BytesIO(data)) as image:
                shape = (image.height, image.width)
        sides = shape[1:] if suffix == ".dcm" else shape  # frames of a DICOM are not a side of its picture
        return max(math.prod(int(n) for n in shape), max(int(n) for n in sides) ** 2)
    except Image.DecompressionBombError:
        raise ImageRejected(f"{name} has too many pixels to decode safely") from None
    except UnidentifiedImageError:
        raise ImageRejected(f"{name} is not a {_FORMATS} image (its content is not recognised)") from None
    except (AttributeError, ValueError, OSError, EOFError, zlib.error, HeaderDataError, WrapStructError) as exc:
        raise ImageRejected(f"{name} has an unreadable header ({type(exc).__name__}: {exc})") from None
