"""`MedicalImage`: physical-unit pixels plus the geometry and headers needed to write derived outputs.

Geometry convention: pixel arrays are (rows, columns) or, for volumes, (slices, rows, columns), with a
trailing 3 for colour. `affine` maps (slice, row, column) indices to RAS millimetres (as NIfTI does) and
is the one geometry every reader fills and every writer uses; a 2D image is slice 0 of its own affine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from PIL import Image
from pydicom import Dataset

from healthgpt.errors import ImageInputError
from healthgpt.io.windowing import DisplayWindow, WindowSpec, default_window, parse_window

# nibabel axis codes of (slice, row, column) for the radiological display of each plane:
# axial rows run anterior->posterior and columns patient right->left, as a DICOM viewer shows them.
PLANES: dict[str, tuple[str, str, str]] = {
    "axial": ("S", "P", "L"),
    "coronal": ("A", "I", "L"),
    "sagittal": ("R", "I", "P"),
}
# Integer axes name the axes of the RAS-canonical NIfTI array (x, y, z).
AXES: dict[int, str] = {0: "sagittal", 1: "coronal", 2: "axial"}

Plane = Literal["axial", "coronal", "sagittal"]
SliceIndex = int | Literal["all"] | None
Pixels = np.ndarray | Image.Image


@dataclass(frozen=True, eq=False)
class MedicalImage:
    """A 2D image or volume in physical units (HU for CT), with what it takes to render and derive from it."""

    array: np.ndarray  # float32 (H, W) or (S, H, W); colour adds a trailing 3 (values 0..255)
    path: Path | None = None
    modality: str = "OT"  # DICOM Modality; "OT" (other) when the file does not say
    pixel_spacing: tuple[float, float] | None = None  # (row, column) spacing in mm
    affine: np.ndarray | None = None  # 4x4, (slice, row, column) index -> RAS mm
    # source DICOM headers (pixel data dropped), one per slice of a series
    datasets: tuple[Dataset, ...] = field(default=(), repr=False)
    window: DisplayWindow | None = None  # display window chosen at load or stored in the file
    invert: bool = False  # MONOCHROME1: higher values display darker
    color: bool = False

    @property
    def name(self) -> str:
        """The source path for messages ("image" when built in memory)."""
        return str(self.path) if self.path is not None else "image"

    @property
    def is_volume(self) -> bool:
        """True for a stack of slices."""
        return self.array.ndim == (4 if self.color else 3)

    @property
    def num_slices(self) -> int:
        """Slices in a volume; 1 for a 2D image."""
        return self.array.shape[0] if self.is_volume else 1

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(rows, columns) of one slice."""
        start = int(self.is_volume)
        return self.array.shape[start], self.array.shape[start + 1]

    def slice(self, index: int) -> MedicalImage:
        """Slice `index` of a volume as a 2D image whose affine starts at that slice."""
        if not self.is_volume:
            raise ImageInputError(self.name, "is a 2D image, not a volume", "use the image itself")
        if not 0 <= index < self.num_slices:
            raise ImageInputError(
                self.name,
                f"slice index {index} is out of range for {self.num_slices} slices",
                f"use 0..{self.num_slices - 1}, None for the middle slice or 'all' for the volume",
            )
        aligned = len(self.datasets) == self.num_slices
        return replace(
            self,
            array=self.array[index],
            affine=None if self.affine is None else shifted_affine(self.affine, index),
            datasets=self.datasets[index : index + 1] if aligned else self.datasets,
        )

    def slices(self) -> Iterator[MedicalImage]:
        """Each slice of a volume in order; a 2D image yields itself."""
        if not self.is_volume:
            yield self
            return
        for index in range(self.num_slices):
            yield self.slice(index)

    def reoriented(self, plane: Plane) -> MedicalImage:
        """The volume resliced (flips and transposes only) so its slices are `plane` in radiological view."""
        if not self.is_volume:
            raise ImageInputError(self.name, "is a 2D image; an axis applies to volumes only", "leave axis=None")
        if self.affine is None:
            raise ImageInputError(self.name, "has no geometry to reslice by", "leave axis=None")
        ornt = ornt_transform(io_orientation(self.affine), axcodes2ornt(PLANES[plane]))
        affine = self.affine @ inv_ornt_aff(ornt, self.array.shape[:3])
        same_axis, flipped = ornt[0, 0] == 0, ornt[0, 1] < 0
        datasets = (self.datasets[::-1] if flipped else self.datasets) if same_axis else self.datasets[:1]
        return replace(
            self,
            array=apply_orientation(self.array, ornt),
            affine=affine,
            pixel_spacing=spacing_of(affine),
            datasets=datasets,
        )

    def grid_affine(self, rows: int, cols: int) -> np.ndarray | None:
        """This image's affine for the same field of view on a rows x cols grid (e.g. a 256x256 output)."""
        if self.affine is None:
            return None
        fr, fc = self.plane_shape[0] / rows, self.plane_shape[1] / cols
        # Output pixel j covers input pixels [j*f, (j+1)*f): its centre is input index (j + 0.5) * f - 0.5.
        resample = np.array([[1, 0, 0, 0], [0, fr, 0, (fr - 1) / 2], [0, 0, fc, (fc - 1) / 2], [0, 0, 0, 1]])
        return self.affine @ resample

    def grid_spacing(self, rows: int, cols: int) -> tuple[float, float] | None:
        """Pixel spacing (mm) of the same field of view on a rows x cols grid."""
        if self.pixel_spacing is None:
            return None
        height, width = self.plane_shape
        return self.pixel_spacing[0] * height / rows, self.pixel_spacing[1] * width / cols

    def with_window(self, window: WindowSpec) -> MedicalImage:
        """This image displayed with `window`: a preset name, "multi", "percentile", "C,W" or a window."""
        chosen = parse_window(window, self.name)
        if chosen is not None and self.color:
            raise ImageInputError(self.name, "is a colour image; windows apply to grey images", "pass no window")
        return self if chosen is None else replace(self, window=chosen)

    def to_pil(self, window: WindowSpec = None) -> Image.Image:
        """Render a 2D image as 8-bit RGB: `window`, else the image's own window, else the modality's."""
        if window is not None:
            return self.with_window(window).to_pil()
        if self.is_volume:
            raise ImageInputError(
                self.name,
                f"is a volume of {self.num_slices} slices",
                "render one slice: image.slice(i).to_pil() or loop over image.slices()",
            )
        if self.color:
            pixels = np.rint(np.clip(self.array, 0, 255)).astype(np.uint8)
        else:
            pixels = (self.window or default_window(self.modality)).apply(self.array)
            pixels = 255 - pixels if self.invert else pixels
        return Image.fromarray(pixels).convert("RGB")


def select(image: MedicalImage, slice_index: SliceIndex, axis: Plane | int | None) -> MedicalImage:
    """Reslice a volume to `axis` if given, then keep one slice (None: the middle one) or all of them."""
    if axis is not None:
        image = image.reoriented(_plane(axis, image.name))
    if slice_index == "all" or (not image.is_volume and slice_index in (None, 0)):
        return image
    if not image.is_volume or not isinstance(slice_index, int | None):
        raise ImageInputError(
            image.name,
            f"slice_index {slice_index!r} does not fit a {image.array.shape} image",
            "use None, 'all' or an index 0..slices-1 of a volume",
        )
    return image.slice(image.num_slices // 2 if slice_index is None else slice_index)


def spacing_of(affine: np.ndarray) -> tuple[float, float]:
    """(row, column) spacing in mm: the lengths of the affine's row and column steps."""
    row, col = np.linalg.norm(affine[:3, 1:3], axis=0)
    return float(row), float(col)


def as_slices(data: MedicalImage | Pixels | Sequence[Pixels], name: str | Path, gray: bool = False) -> list[np.ndarray]:
    """2D slices from a volume, a 3D array, one image or a list; colour PIL images turn grey if `gray`."""
    if isinstance(data, MedicalImage):
        data = data.array if data.is_volume else [data.array]
    elif isinstance(data, Image.Image) or (isinstance(data, np.ndarray) and data.ndim == 2):
        data = [data]
    slices = [_pil_array(item, gray) if isinstance(item, Image.Image) else np.asarray(item) for item in data]
    if not slices or len({s.shape for s in slices}) != 1 or slices[0].ndim not in (2, 3):
        raise ImageInputError(
            name,
            f"slices must be non-empty 2D images of one shape, got {[s.shape for s in slices]}",
            "pass a (S, H, W) array or a list of same-sized images",
        )
    return slices


def _pil_array(image: Image.Image, gray: bool) -> np.ndarray:
    if gray and image.mode not in ("1", "L", "I", "I;16", "F"):
        image = image.convert("L")
    return np.asarray(image)


def _plane(axis: Plane | int, name: str) -> Plane:
    plane = AXES.get(axis, axis) if isinstance(axis, int) else axis
    if plane not in PLANES:
        raise ImageInputError(
            name,
            f"unknown axis {axis!r}",
            f"use one of {', '.join(PLANES)} or 0, 1, 2 (the RAS x, y, z axes)",
        )
    return plane


def shifted_affine(affine: np.ndarray, index: int) -> np.ndarray:
    """The affine whose slice 0 is slice `index` of `affine`."""
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.array([index, 0, 0]) + affine[:3, 3]
    return out
