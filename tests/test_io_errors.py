"""Bad input and bad output targets: one ImageInputError naming the file, and nothing partial left behind."""

import gzip
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless

from healthgpt.io import ImageInputError, load_image, save_dicom_series, save_nifti, save_png, write_volume
from healthgpt.io.messages import warnings_logged

CT = get_testdata_file("CT_small.dcm")
NIFTI = os.path.join(data_path, "anatomical.nii")
Case = Callable[[Path], tuple[Callable[[], object], Path]]


def ct_copy(path: Path, **tags: object) -> Path:
    """CT_small saved to `path` with `tags` set (a value of None deletes the tag)."""
    ds = pydicom.dcmread(CT)
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` grey pixels but carries no data (PIL reads the size only)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def file_with(name: str, data: bytes) -> Case:
    def case(tmp: Path):
        (tmp / name).write_bytes(data)
        return lambda: load_image(tmp / name), tmp / name

    return case


def truncated_png(tmp: Path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp / "full.png")
    data = (tmp / "full.png").read_bytes()
    (tmp / "cut.png").write_bytes(data[: len(data) // 2])
    return lambda: load_image(tmp / "cut.png"), tmp / "cut.png"


def truncated_dicom(tmp: Path):
    (tmp / "cut.dcm").write_bytes(Path(CT).read_bytes()[:20000])  # cut inside the pixel data
    return lambda: load_image(tmp / "cut.dcm"), tmp / "cut.dcm"


def truncated_nifti(tmp: Path):
    (tmp / "cut.nii.gz").write_bytes(gzip.compress(Path(NIFTI).read_bytes())[:3000])
    return lambda: load_image(tmp / "cut.nii.gz"), tmp / "cut.nii.gz"


def no_pixel_data(tmp: Path):
    path = ct_copy(tmp / "header.dcm", PixelData=None)
    return lambda: load_image(path), path


def jpeg_ls_without_plugin(tmp: Path):
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS plugin is installed here")
    path = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    return lambda: load_image(path), path


def folder_without_dicom(tmp: Path):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "readme.txt").write_text("no images here")
    return lambda: load_image(tmp / "notes"), tmp / "notes"


def folder_with_two_series(tmp: Path):
    (tmp / "mixed").mkdir()
    ct_copy(tmp / "mixed" / "a.dcm")
    ct_copy(tmp / "mixed" / "b.dcm", SeriesInstanceUID=pydicom.uid.generate_uid())
    return lambda: load_image(tmp / "mixed"), tmp / "mixed"


def series_with_shared_positions(tmp: Path):
    (tmp / "echoes").mkdir()
    for echo in (1, 2):
        ct_copy(tmp / "echoes" / f"e{echo}.dcm", SOPInstanceUID=pydicom.uid.generate_uid(), EchoNumbers=echo)
    return lambda: load_image(tmp / "echoes"), tmp / "echoes"


def colour_png_with_window(tmp: Path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp / "photo.png")
    return lambda: load_image(tmp / "photo.png", window="lung"), tmp / "photo.png"


def load_with(path: str, **options: object) -> Case:
    return lambda tmp: (lambda: load_image(path, **options), Path(path))


def png_to_missing_folder(tmp: Path):
    target = tmp / "no_such_folder" / "out.png"
    return lambda: save_png(np.zeros((4, 4), np.uint8), target), target


def png_of_float_array(tmp: Path):
    return lambda: save_png(np.zeros((4, 4), np.float32), tmp / "out.png"), tmp / "out.png"


def series_into_filled_folder(tmp: Path):
    (tmp / "taken").mkdir()
    (tmp / "taken" / "old.dcm").write_bytes(b"keep me")
    return lambda: save_dicom_series(np.zeros((8, 8), np.uint8), load_image(CT), tmp / "taken"), tmp / "taken"


def series_with_wrong_slice_count(tmp: Path):
    slices = [np.zeros((8, 8), np.uint8)] * 2
    return lambda: save_dicom_series(slices, load_image(CT), tmp / "out"), tmp / "out"


def series_from_nifti_source(tmp: Path):
    return lambda: save_dicom_series(np.zeros((8, 8), np.uint8), load_image(NIFTI), tmp / "out"), tmp / "out"


def series_with_nan(tmp: Path):
    values = np.full((8, 8), np.nan, np.float32)
    return lambda: save_dicom_series(values, load_image(CT), tmp / "out"), tmp / "out"


def volume_with_unknown_suffix(tmp: Path):
    return lambda: write_volume(np.zeros((1, 8, 8)), load_image(CT), tmp / "out.mha"), tmp / "out.mha"


def nifti_without_geometry(tmp: Path):
    Image.new("L", (8, 8)).save(tmp / "plain.png")
    return lambda: save_nifti(np.zeros((8, 8)), tmp / "out.nii", load_image(tmp / "plain.png")), tmp / "out.nii"


def nifti_declaring(shape: tuple[int, ...], data_bytes: int) -> Case:
    """A NIfTI file whose header declares `shape` float32 voxels but which holds `data_bytes` of them."""

    def case(tmp: Path):
        header = nib.Nifti1Header()
        header.set_data_shape(shape)
        header.set_data_dtype(np.float32)
        header["vox_offset"] = 352
        (tmp / "declared.nii").write_bytes(header.binaryblock + bytes(4) + bytes(data_bytes))
        return lambda: load_image(tmp / "declared.nii"), tmp / "declared.nii"

    return case


def dicom_declaring_more_pixels(tmp: Path) -> tuple[Callable[[], object], Path]:
    """CT_small with its pixel-data length field set to 0x7ffffff0 (pydicom reads to the end and warns)."""
    data = bytearray(Path(CT).read_bytes())
    at = data.rfind(b"\xe0\x7f\x10\x00OW")  # (7FE0,0010) OW, 2 reserved bytes, then a 4-byte length
    data[at + 8 : at + 12] = struct.pack("<I", 0x7FFFFFF0)
    (tmp / "long.dcm").write_bytes(data)
    return lambda: load_image(tmp / "long.dcm"), tmp / "long.dcm"


def _saved(path: Path, values: np.ndarray) -> tuple[Callable[[], object], Path]:
    """`values` written as float32 NIfTI or float TIFF, and the call that loads it."""
    if path.suffix == ".nii":
        nib.save(nib.Nifti1Image(values.astype(np.float32), np.eye(4)), path)
    else:
        Image.fromarray(values.astype(np.float32), mode="F").save(path)
    return lambda: load_image(path), path


CASES: list[tuple[str, Case, str]] = [
    ("missing file", lambda tmp: (lambda: load_image(tmp / "nope.dcm"), tmp / "nope.dcm"), "does not exist"),
    ("empty file", file_with("empty.png", b""), "is empty"),
    ("text named .png", file_with("note.png", b"just text, not pixels"), "not a recognised image"),
    ("truncated png", truncated_png, "truncated or corrupt"),
    ("truncated dicom", truncated_dicom, "truncated or corrupt"),
    ("truncated nifti", truncated_nifti, "truncated or corrupt"),
    ("dicom without pixels", no_pixel_data, "has no pixel data"),
    ("jpeg-ls without plugin", jpeg_ls_without_plugin, "pip install one of: "),
    ("decompression bomb", file_with("bomb.png", png_header(50_000, 50_000)), "too large to decode safely"),
    ("folder without dicom", folder_without_dicom, "contains no DICOM images"),
    ("two series in a folder", folder_with_two_series, "holds 2 DICOM series"),
    ("slices at one position", series_with_shared_positions, "share one slice position"),
    ("slice index out of range", load_with(NIFTI, slice_index=99), "slice index 99 is out of range"),
    ("unknown axis", load_with(NIFTI, axis="oblique"), "unknown axis 'oblique'"),
    ("axis on a 2D image", load_with(CT, axis="coronal"), "is a 2D image"),
    ("frame out of range", load_with(get_testdata_file("rtdose.dcm"), frame=15), "frame 15 is out of range"),
    ("unknown window preset", load_with(CT, window="lungs"), "unknown window 'lungs'"),
    ("window on a colour image", colour_png_with_window, "is a colour image"),
    (
        "volume rendered whole",
        lambda tmp: (lambda: load_image(NIFTI, slice_index="all").to_pil(), Path(NIFTI)),
        "is a volume of 25 slices",
    ),
    ("zero window width", load_with(CT, window="40,0"), "has width 0.0"),
    ("png into missing folder", png_to_missing_folder, "folder to write into does not exist"),
    ("png of float array", png_of_float_array, "cannot store a float32 array"),
    ("series into filled folder", series_into_filled_folder, "already exists and is not empty"),
    ("wrong slice count", series_with_wrong_slice_count, "got 2 slices for a source of 1"),
    ("series without dicom source", series_from_nifti_source, "has no DICOM header"),
    ("nan values", series_with_nan, "slice 1 has NaN or infinite values"),
    ("unknown output suffix", volume_with_unknown_suffix, "unsupported output suffix '.mha'"),
    ("nifti without geometry", nifti_without_geometry, "has no 4x4 affine"),
    (
        "extreme aspect ratio",
        file_with("wide.png", png_header(20_000, 1)),
        "the square canvas a 20000 x 1 picture is padded to would hold 400,000,000 pixels",
    ),
    ("nifti declaring a huge volume", nifti_declaring((4000, 4000, 100), 64), "its volume would hold 1,600,000,000"),
    ("nifti shorter than its header", nifti_declaring((64, 64, 64), 100), "Expected 1048576 bytes, got 100"),
    ("dicom pixel length past the end", dicom_declaring_more_pixels, "pixel data declares 2147483632 bytes"),
    ("all-nan nifti", lambda tmp: _saved(tmp / "nan.nii", np.full((3, 8, 8), np.nan)), "holds no finite pixel value"),
    ("all-inf float tiff", lambda tmp: _saved(tmp / "inf.tiff", np.full((8, 8), np.inf)), "no finite pixel value"),
    (
        "dicom declaring 10^6 frames",
        lambda tmp: (lambda path: (lambda: load_image(path), path))(ct_copy(tmp / "frames.dcm", NumberOfFrames=10**6)),
        "its decoded frames would hold 16,384,000,000 pixels",
    ),
]


def snapshot(folder: Path) -> dict[Path, bytes | None]:
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(("make", "fragment"), [pytest.param(m, f, id=i) for i, m, f in CASES])
def test_bad_input_raises_named_error_and_writes_nothing(tmp_path, make, fragment):
    call, named = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ImageInputError) as info:
        call()
    message = str(info.value)
    assert str(named) in message and fragment in message and "Fix: " in message
    assert isinstance(info.value, ValueError) and info.value.path == named
    assert snapshot(tmp_path) == before


def test_a_20000_by_1_png_is_refused_before_its_square_canvas_is_allocated(tmp_path):
    """~100 bytes on disk; padded to a square it would be 20000 x 20000 (1.2 GB as RGB, 4.8 GB as CLIP input).
    Both the file reader and the preprocessor (for pictures given to the API) refuse it; the process grows < 200 MB."""
    Image.new("L", (20_000, 1), 7).save(tmp_path / "wide.png")
    code = f"""
import resource
from PIL import Image
from healthgpt.errors import ImageInputError
from healthgpt.io import load_image
from healthgpt.vision import ImagePreprocessor

preprocess = ImagePreprocessor.for_clip(32, (0.5,) * 3, (0.5,) * 3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
refused = 0
for call in (lambda: load_image({str(tmp_path / "wide.png")!r}), lambda: preprocess([Image.new("L", (20000, 1))])):
    try:
        call()
    except ImageInputError as exc:
        refused += "padded to would hold 400,000,000 pixels" in str(exc)
print(refused, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    refused, grown_mb = map(int, done.stdout.split())
    assert refused == 2 and grown_mb < 200


def test_error_survives_pickling():
    error = ImageInputError("/data/x.dcm", "has no pixel data", "load an image file")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.path == Path("/data/x.dcm")


def test_library_warnings_go_to_the_log_of_the_reading_thread_even_when_threads_overlap(recwarn, caplog):
    """Thread A starts reading, B starts, A finishes, then B's library warns (the server reads uploads in a thread
    pool). `warnings.catch_warnings` would hand B's warning back to whoever printed before A began, and leave A's
    filters installed when B finished; `warnings_logged` logs it as B's, one line, and restores everything."""
    filters, shown = list(warnings.filters), warnings.showwarning
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def read_a() -> None:
        with warnings_logged(Path("a.dcm")):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def read_b() -> None:
        a_in.wait(10)
        with warnings_logged(Path("b.dcm")):
            b_in.set()
            a_out.wait(10)
            warnings.warn(
                "The pixel data is 32778 bytes long\nwith 10 bytes of excess padding", UserWarning, stacklevel=1
            )

    caplog.set_level(logging.DEBUG, logger="healthgpt.io.messages")
    threads = [threading.Thread(target=read_a), threading.Thread(target=read_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [r.getMessage() for r in caplog.records] == [
        "b.dcm: The pixel data is 32778 bytes long with 10 bytes of excess padding"
    ]
    assert len(recwarn) == 0  # not shown the ordinary way (pytest records what would be printed)
    assert warnings.filters == filters and warnings.showwarning is shown
    warnings.warn("outside any read", UserWarning, stacklevel=1)  # other warnings show as before
    assert [str(w.message) for w in recwarn] == ["outside any read"]
