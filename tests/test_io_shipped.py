"""Every data file pydicom, nibabel and scikit-image ship: it loads and renders, or fails with one error naming it."""

import subprocess
import sys
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pydicom.data
import pytest
import skimage
import tifffile
from pydicom.data import get_testdata_file

from healthgpt.io import ImageInputError, load_image

_CODE = {".py", ".pyc", ".pyi", ".so"}
ROOTS = {
    "pydicom": Path(pydicom.data.__file__).parent,
    "nibabel": Path(nibabel.__file__).parent,
    "skimage": Path(skimage.__file__).parent / "data",
}
SHIPPED = [
    pytest.param(path, id=f"{package}/{path.relative_to(root)}")
    for package, root in ROOTS.items()
    for path in sorted(root.rglob("*"))
    if path.is_file() and path.suffix not in _CODE and "__pycache__" not in path.parts
]
NIBABEL_DATA = ROOTS["nibabel"] / "tests" / "data"
SKIMAGE_DATA = ROOTS["skimage"]


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_file_loads_or_fails_naming_it(path):
    # No library warning escapes a read: each one pydicom or nibabel emits is logged, none shown (recorded here).
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ResourceWarning)  # nibabel's PAR/REC reader leaves a file to the GC
        try:
            image = load_image(path)
        except ImageInputError as exc:
            assert exc.path == path and str(exc).startswith(f"{path}: ") and "Fix: " in str(exc)
            assert "\n" not in str(exc)
            image = None
    assert [str(w.message) for w in shown] == []
    if image is None:
        return
    picture = image.to_pil()
    assert picture.mode == "RGB" and picture.size == image.plane_shape[::-1]
    assert np.isfinite(image.array).all() or np.isnan(image.array).any()  # values came through as numbers


# The CLI on a sample: the files the issue names (each a different reader or failure), in a subprocess.
CLI_SAMPLE = [
    get_testdata_file("badVR.dcm"),
    get_testdata_file("JPEG-lossy.dcm"),
    get_testdata_file("MR_small_padded.dcm"),
    str(NIBABEL_DATA / "row_major.dconn.nii"),
    str(NIBABEL_DATA / "analyze.hdr"),
    *[str(p) for p in [SKIMAGE_DATA / "multipage_rgb.tif"] if p.is_file()],  # shipped from scikit-image 0.26
]


@pytest.mark.parametrize("path", CLI_SAMPLE, ids=lambda p: Path(p).name)
def test_cli_info_on_shipped_files_exits_0_or_2_with_one_line(path, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "healthgpt.cli", "info", path], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    if out.returncode == 0:
        assert out.stderr == ""  # no pydicom warning on a successful read
    else:
        assert out.returncode == 2 and out.stderr.startswith(f"error: {path}: ") and out.stderr.count("\n") == 1


# --- what the files above used to get wrong ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nifti1.hdr", "nifti2.hdr", "analyze.hdr"])
def test_header_without_its_image_file_gets_one_message(name):
    with pytest.raises(ImageInputError, match=f"its data file {Path(name).stem}.img is missing"):
        load_image(NIBABEL_DATA / name)


def test_cifti_is_refused_as_not_a_volume():
    with pytest.raises(ImageInputError, match="is a Cifti2 file .*not an image volume"):
        load_image(NIBABEL_DATA / "row_major.dconn.nii")


def test_bad_vr_names_the_file_and_the_bad_value():
    path = get_testdata_file("badVR.dcm")
    with pytest.raises(ImageInputError, match="malformed DICOM header .*'1A'") as info:
        load_image(path)
    assert info.value.path == Path(path)


def test_undecodable_jpeg_says_why_in_full():
    with pytest.raises(ImageInputError, match="does not support 'JPEG Extended' for samples with 12-bit precision"):
        load_image(get_testdata_file("JPEG-lossy.dcm"))


def test_float64_planar_rgb_tiff_reads_each_page(tmp_path):
    path = SKIMAGE_DATA / "multipage_rgb.tif"
    if not path.is_file():  # older scikit-image releases do not ship it: write the same layout
        path = tmp_path / "multipage_rgb.tif"
        rng = np.random.default_rng(0)
        tifffile.imwrite(path, rng.random((2, 3, 10, 12)), photometric="rgb", planarconfig="separate")
    pages = tifffile.imread(path)  # (page, channel, row, column), 0..1
    for page in (0, 1):
        image = load_image(path, frame=page)
        assert image.color
        np.testing.assert_allclose(image.array, np.moveaxis(pages[page], 0, -1) * 255, rtol=1e-5)


def test_other_nibabel_volumes_read_like_nifti():
    mgz = nibabel.as_closest_canonical(nibabel.load(NIBABEL_DATA / "test.mgz"))
    volume = load_image(NIBABEL_DATA / "test.mgz", slice_index="all", axis=2)
    assert volume.array.shape == (mgz.shape[2], mgz.shape[1], mgz.shape[0])  # axial: (z, y, x), flipped for display
    np.testing.assert_allclose(np.sort(volume.array.ravel()), np.sort(mgz.get_fdata()[..., 0].ravel()))
