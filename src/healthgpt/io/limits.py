"""The pixel limit on what an image will allocate, checked from headers before any pixel is decoded.

One bound for every reader: PIL's `Image.MAX_IMAGE_PIXELS` (read at call time, so raising PIL's limit raises ours;
None turns it off). It applies to what will be allocated, not to what the file declares per frame: all frames of a
multi-frame file, all voxels of a volume, and the square canvas a picture is padded to before the model sees it
(a 20000 x 1 PNG is 101 bytes but a 20000 x 20000 canvas)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from healthgpt.errors import ImageInputError


def max_pixels() -> int | None:
    """The current limit (PIL's), or None when PIL's check is turned off."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else int(limit)


def check_allocation(path: str | Path, shape: tuple[int, ...], what: str) -> None:
    """Refuse `shape` (frames/slices x rows x columns) if it holds more pixels than the limit."""
    count = math.prod(int(n) for n in shape)
    limit = max_pixels()
    if limit is not None and count > limit:
        raise ImageInputError(
            path,
            f"{what} would hold {count:,} pixels ({' x '.join(map(str, shape))}), more than the limit of {limit:,}",
            "crop or downsample it, or raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine",
        )


def check_picture(path: str | Path, width: int, height: int, frames: int = 1) -> None:
    """Refuse a picture whose frames, or whose square canvas (the longer side squared, as the model pads it), hold
    more pixels than the limit."""
    check_allocation(path, (frames, height, width), "its decoded frames")
    side = max(width, height)
    check_allocation(path, (side, side), f"the square canvas a {width} x {height} picture is padded to")
