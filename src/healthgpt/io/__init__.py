"""Medical image I/O: PNG/JPEG/DICOM/NIfTI in physical units, display windows, geometry-keeping writes."""

from healthgpt.errors import ImageInputError
from healthgpt.io.dicom_write import SYNTHETIC_NOTE, save_dicom_series
from healthgpt.io.files import load_image, write_images, write_volume
from healthgpt.io.image import MedicalImage
from healthgpt.io.nifti import save_nifti
from healthgpt.io.raster import save_png
from healthgpt.io.windowing import (
    PRESETS,
    DisplayWindow,
    MultiWindow,
    PercentileWindow,
    Window,
    default_window,
    parse_window,
)

__all__ = [
    "PRESETS",
    "SYNTHETIC_NOTE",
    "DisplayWindow",
    "ImageInputError",
    "MedicalImage",
    "MultiWindow",
    "PercentileWindow",
    "Window",
    "default_window",
    "load_image",
    "parse_window",
    "save_dicom_series",
    "save_nifti",
    "save_png",
    "write_images",
    "write_volume",
]
