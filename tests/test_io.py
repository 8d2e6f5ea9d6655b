"""healthgpt.io against independent references: pydicom's LUTs, nibabel's canonical data, round trips."""

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from PIL import Image
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from healthgpt.io import (
    PRESETS,
    SYNTHETIC_NOTE,
    ImageInputError,
    MedicalImage,
    load_image,
    save_dicom_series,
    save_nifti,
    save_png,
    write_volume,
)

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
ANATOMICAL = os.path.join(data_path, "anatomical.nii")  # LAS on disk
STANDARD = os.path.join(data_path, "standard.nii.gz")  # RAS on disk
EXAMPLE4D = os.path.join(data_path, "example4d.nii.gz")


def formula(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The window written out: clip to [C - W/2, C + W/2], scale to 0..255, round."""
    low = center - width / 2
    return np.rint(np.clip((values.astype(np.float64) - low) / width, 0, 1) * 255).astype(np.uint8)


def grey(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image)
    assert image.mode == "RGB" and (pixels == pixels[..., :1]).all()
    return pixels[..., 0]


def write_ct_series(folder: Path, positions: list[float], numbers: list[int]) -> list[np.ndarray]:
    """CT_small copies at z `positions` with InstanceNumbers `numbers`, each with own pixels; returns HU."""
    folder.mkdir()
    hu = []
    for i, (z, number) in enumerate(zip(positions, numbers, strict=True)):
        ds = pydicom.dcmread(CT)
        pixels = ds.pixel_array + np.int16(100 * i)
        ds.PixelData = pixels.tobytes()
        ds.ImagePositionPatient = [-158.135803, -179.035797, z]
        ds.InstanceNumber = number
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"file{i}.dcm")
        hu.append(apply_modality_lut(pixels, ds))
    return hu


# --- reading ---------------------------------------------------------------------------------------------


def test_ct_hounsfield_units_match_pydicom_modality_lut():
    ds = pydicom.dcmread(CT)
    image = load_image(CT)
    assert image.modality == "CT" and image.pixel_spacing == (0.661468, 0.661468)
    np.testing.assert_array_equal(image.array, apply_modality_lut(ds.pixel_array, ds))
    assert image.array.min() < 0 <= ds.pixel_array.min()  # HU, not the raw stored values
    assert "PixelData" not in image.datasets[0] and image.datasets[0].PatientID == ds.PatientID


@pytest.mark.parametrize("window", [*PRESETS, "35.5,120"])
def test_window_matches_pydicom_linear_exact_voi(window):
    center, width = (PRESETS[window].center, PRESETS[window].width) if window in PRESETS else (35.5, 120)
    hu = load_image(CT).array
    voi = Dataset()  # pydicom's own VOI LUT on the HU values, 8-bit output range
    voi.PhotometricInterpretation, voi.BitsStored, voi.PixelRepresentation = "MONOCHROME2", 8, 0
    voi.WindowCenter, voi.WindowWidth, voi.VOILUTFunction = center, width, "LINEAR_EXACT"
    reference = apply_voi_lut(hu.astype(np.float64), voi)
    rendered = grey(load_image(CT, window=window).to_pil())
    np.testing.assert_array_equal(rendered, formula(hu, center, width))
    # pydicom agrees except at exact half-grey ties, where its float rounding may land on the other side
    differ = rendered != np.rint(reference)
    assert np.abs(rendered - reference).max() <= 0.5 + 1e-9
    np.testing.assert_allclose(reference[differ] % 1, 0.5, atol=1e-9)


def test_multi_window_puts_lung_mediastinum_bone_in_rgb():
    hu = load_image(CT).array
    rgb = np.asarray(load_image(CT, window="multi").to_pil())
    for channel, (center, width) in enumerate([(-600, 1500), (50, 350), (400, 1800)]):
        np.testing.assert_array_equal(rgb[..., channel], formula(hu, center, width))


def test_default_windows_stored_then_modality(tmp_path):
    ct, mr = load_image(CT), load_image(MR)
    np.testing.assert_array_equal(grey(ct.to_pil()), formula(ct.array, 40, 400))  # CT, no stored window
    np.testing.assert_array_equal(grey(mr.to_pil()), formula(mr.array, 600, 1600))  # the file's own window
    ds = pydicom.dcmread(MR)
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "mr.dcm")
    low, high = np.percentile(mr.array, [0.5, 99.5])
    expected = formula(mr.array, (low + high) / 2, high - low)
    np.testing.assert_array_equal(grey(load_image(tmp_path / "mr.dcm").to_pil()), expected)


def test_monochrome1_renders_inverted(tmp_path):
    ds = pydicom.dcmread(CT)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    image = load_image(tmp_path / "m1.dcm", window="bone")
    np.testing.assert_array_equal(image.array, load_image(CT).array)  # values stay HU
    np.testing.assert_array_equal(grey(image.to_pil()), 255 - formula(image.array, 400, 1800))


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_compressed_mr_equals_uncompressed(name):
    np.testing.assert_array_equal(load_image(get_testdata_file(name)).array, load_image(MR).array)


def test_multiframe_frames_and_volume():
    ds = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    frames = ds.pixel_array
    path = get_testdata_file("rtdose.dcm")
    np.testing.assert_array_equal(load_image(path, frame=3).array, frames[3])
    np.testing.assert_array_equal(load_image(path).array, frames[len(frames) // 2])  # middle frame by default
    assert load_image(path, slice_index="all").array.shape == frames.shape


def test_enhanced_multiframe_rescale_from_functional_groups(tmp_path):
    ds = pydicom.dcmread(CT)
    del ds.RescaleSlope, ds.RescaleIntercept
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 2, -1000
    group = Dataset()
    group.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [group]
    ds.save_as(tmp_path / "enhanced.dcm")
    np.testing.assert_array_equal(load_image(tmp_path / "enhanced.dcm").array, ds.pixel_array * 2.0 - 1000)


def test_series_folder_loads_in_physical_order(tmp_path):
    positions, numbers = [-60.0, -75.0, -45.0, -90.0, -30.0], [2, 5, 1, 4, 3]  # numbers disagree
    hu = write_ct_series(tmp_path / "series", positions, numbers)
    volume = load_image(tmp_path / "series", slice_index="all")
    order = np.argsort(positions)
    np.testing.assert_array_equal(volume.array, np.stack([hu[i] for i in order]))
    assert [float(ds.ImagePositionPatient[2]) for ds in volume.datasets] == sorted(positions)
    np.testing.assert_allclose(volume.affine[:3, 0], [0, 0, 15])  # the affine steps along z by the gap, in RAS
    np.testing.assert_array_equal(load_image(tmp_path / "series").array, hu[order[2]])  # middle by default


def test_series_without_positions_falls_back_to_instance_number(tmp_path):
    hu = write_ct_series(tmp_path / "series", [0.0, 0.0, 0.0], [3, 1, 2])
    for path in (tmp_path / "series").iterdir():
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    volume = load_image(tmp_path / "series", slice_index="all")
    np.testing.assert_array_equal(volume.array, np.stack([hu[1], hu[2], hu[0]]))
    assert volume.affine is None


def test_nifti_axial_slice_is_radiological_view_of_canonical_data():
    canonical = nib.as_closest_canonical(nib.load(ANATOMICAL))
    data = canonical.get_fdata()
    k = data.shape[2] // 2
    image = load_image(ANATOMICAL)
    # rows run anterior -> posterior, columns patient right -> left
    np.testing.assert_array_equal(image.array, data[::-1, ::-1, k].T)
    nx, ny = data.shape[:2]
    for r, c in [(0, 0), (5, 7)]:
        voxel = [nx - 1 - c, ny - 1 - r, k, 1]
        np.testing.assert_allclose(image.affine @ [0, r, c, 1], canonical.affine @ voxel)


@pytest.mark.parametrize("axis", ["coronal", 1])
def test_nifti_coronal_slice(axis):
    data = nib.as_closest_canonical(nib.load(ANATOMICAL)).get_fdata()
    volume = load_image(ANATOMICAL, axis=axis, slice_index="all")
    assert volume.num_slices == data.shape[1]
    np.testing.assert_array_equal(volume.slice(4).array, data[::-1, 4, ::-1].T)


def test_nifti_4d_frame_choice():
    data = nib.as_closest_canonical(nib.load(EXAMPLE4D)).get_fdata()
    image = load_image(EXAMPLE4D, frame=1, slice_index=10)
    np.testing.assert_array_equal(image.array, data[::-1, ::-1, 10, 1].T)


def test_raster_png_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for name, pixels in [("g8.png", grey8), ("g16.png", grey16), ("rgb.png", rgb)]:
        Image.fromarray(pixels).save(tmp_path / name)
        np.testing.assert_array_equal(load_image(tmp_path / name).array, pixels)
    assert (grey(load_image(tmp_path / "g8.png").to_pil()) == grey8).all()  # 8-bit grey shows as stored
    assert (np.asarray(load_image(tmp_path / "rgb.png").to_pil()) == rgb).all()


# --- writing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [ANATOMICAL, STANDARD])
def test_nifti_round_trip_keeps_affine_and_data(tmp_path, source):
    volume = load_image(source, slice_index="all")
    out = save_nifti(volume, tmp_path / "out.nii.gz", volume)
    canonical = nib.as_closest_canonical(nib.load(source))
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, canonical.affine)
    np.testing.assert_array_equal(written.get_fdata(), canonical.get_fdata())
    if source == STANDARD:  # already RAS on disk: the file's own affine
        np.testing.assert_allclose(written.affine, nib.load(source).affine)


def test_nifti_of_generated_slice_scales_in_plane_affine(tmp_path):
    source = load_image(ANATOMICAL)  # 41 x 33 axial slice, 2 mm pixels
    out = save_nifti(Image.new("RGB", (256, 256), (9, 9, 9)), tmp_path / "gen.nii", source)
    written = nib.load(out)
    assert written.shape == (256, 256, 1) and np.all(written.get_fdata() == 9)
    rows, cols = source.plane_shape
    zooms = sorted(written.header.get_zooms()[:2])
    np.testing.assert_allclose(zooms, sorted([2 * cols / 256, 2 * rows / 256]))
    # the outer corner of the field of view stays where it was
    corner = source.affine @ [0, -0.5, -0.5, 1]
    gen_axial = load_image(out)
    np.testing.assert_allclose(gen_axial.affine @ [0, -0.5, -0.5, 1], corner, atol=1e-5)


def test_dicom_series_of_generated_image_keeps_identity(tmp_path):
    source = load_image(CT)
    head = pydicom.dcmread(CT)
    generated = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    picture = Image.fromarray(generated)
    out = save_dicom_series([picture], source, tmp_path / "gen", description="synth CT", modality="OT")
    (path,) = sorted(out.iterdir())
    ds = pydicom.dcmread(path)
    assert ds.PatientID == head.PatientID and ds.StudyInstanceUID == head.StudyInstanceUID
    assert ds.SeriesInstanceUID != head.SeriesInstanceUID and ds.SOPInstanceUID != head.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.ImageComments == SYNTHETIC_NOTE
    assert ds.SeriesDescription == "synth CT"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == head.SOPInstanceUID
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PhotometricInterpretation) == (256, 256, 8, "RGB")
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [0.661468 * 128 / 256] * 2)
    np.testing.assert_array_equal(ds.pixel_array, generated)
    # as a CT (the source's modality) the colour picture is stored grey, as its luminance
    (path,) = sorted(save_dicom_series([picture], source, tmp_path / "ct").iterdir())
    ct = pydicom.dcmread(path)
    assert (ct.Modality, ct.PhotometricInterpretation) == ("CT", "MONOCHROME2")
    assert ct.SOPClassUID == pydicom.uid.CTImageStorage
    np.testing.assert_array_equal(apply_modality_lut(ct.pixel_array, ct), np.asarray(picture.convert("L")))


def test_dicom_16bit_values_round_trip(tmp_path):
    source = load_image(CT)
    scaled = source.array * 0.37 + 0.1  # not integers: stored with a rescale slope
    for name, values, tolerance in [("hu", source.array, 0), ("scaled", scaled, np.ptp(scaled) / 65535)]:
        (path,) = sorted(save_dicom_series(values, source, tmp_path / name).iterdir())
        ds = pydicom.dcmread(path)
        assert ds.BitsAllocated == 16
        np.testing.assert_allclose(apply_modality_lut(ds.pixel_array, ds), values, atol=tolerance, rtol=0)


def test_dicom_8bit_grey_odd_size(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (255, 127), dtype=np.uint8)
    (path,) = sorted(save_dicom_series(pixels, load_image(CT), tmp_path / "odd", modality="OT").iterdir())
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
    assert (ds.Modality, ds.SOPClassUID) == ("OT", pydicom.uid.SecondaryCaptureImageStorage)
    np.testing.assert_array_equal(ds.pixel_array, pixels)


def test_processed_series_volume_round_trips_through_dicom_and_nifti(tmp_path):
    write_ct_series(tmp_path / "series", [-60.0, -75.0, -45.0], [1, 2, 3])
    volume = load_image(tmp_path / "series", slice_index="all")
    processed = volume.array - 10
    dicom_out = write_volume(processed, volume, tmp_path / "processed")
    reread = load_image(dicom_out, slice_index="all")
    np.testing.assert_array_equal(reread.array, processed)
    np.testing.assert_allclose(reread.affine, volume.affine, atol=1e-4)
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in dicom_out.iterdir()}
    assert len(uids) == 3 and not uids & {ds.SOPInstanceUID for ds in volume.datasets}
    nifti_path = write_volume(processed, volume, tmp_path / "processed.nii.gz")
    nifti = nib.load(nifti_path)
    assert nifti.shape == (128, 128, 3)  # RAS order: x, y, z
    np.testing.assert_allclose(nifti.affine @ [0, 0, 0, 1], volume.affine @ [0, 127, 127, 1], atol=1e-4)
    # DICOM and NIfTI share one display convention: the NIfTI reads back as the DICOM volume did
    np.testing.assert_array_equal(load_image(nifti_path, slice_index="all").array, processed)


def test_dicom_volume_reslices_by_plane(tmp_path):
    write_ct_series(tmp_path / "series", [-60.0, -75.0, -45.0], [1, 2, 3])
    volume = load_image(tmp_path / "series", slice_index="all")
    axial = load_image(tmp_path / "series", slice_index="all", axis="axial")
    np.testing.assert_array_equal(axial.array, volume.array)  # an axial series is already in axial view
    coronal = load_image(tmp_path / "series", slice_index="all", axis="coronal")
    # coronal view: slices run posterior -> anterior (rows of the axial image reversed), rows superior first
    np.testing.assert_array_equal(coronal.array, volume.array[::-1, ::-1, :].transpose(1, 0, 2))
    # so coronal voxel (s, r, c) is axial voxel (S - 1 - r, 127 - s, c)
    np.testing.assert_allclose(coronal.affine @ [2, 1, 3, 1], volume.affine @ [3 - 1 - 1, 127 - 2, 3, 1])


def test_save_png_renders_medical_image(tmp_path):
    image = load_image(CT, window="lung")
    out = save_png(image, tmp_path / "ct.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(image.to_pil()))


def test_failed_writes_leave_nothing(tmp_path, monkeypatch):
    calls = []

    def fail_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    original = Dataset.save_as
    write_ct_series(tmp_path / "series", [0.0, 5.0, 10.0], [1, 2, 3])
    source = load_image(tmp_path / "series", slice_index="all")
    before = set(tmp_path.iterdir())
    monkeypatch.setattr(Dataset, "save_as", fail_second)
    with pytest.raises(OSError, match="disk full"):
        save_dicom_series(source.array, source, tmp_path / "out")
    monkeypatch.setattr(nib, "save", lambda *a: (Path(a[1]).write_bytes(b"partial"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        save_nifti(source, tmp_path / "out.nii.gz", source)
    assert set(tmp_path.iterdir()) == before


def test_slices_iterates_volume_with_matching_geometry(tmp_path):
    write_ct_series(tmp_path / "series", [0.0, 5.0], [1, 2])
    volume = load_image(tmp_path / "series", slice_index="all")
    slices = list(volume.slices())
    assert [s.datasets[0].InstanceNumber for s in slices] == [1, 2]
    np.testing.assert_allclose(slices[1].affine @ [0, 3, 4, 1], volume.affine @ [1, 3, 4, 1])
    assert isinstance(slices[0], MedicalImage) and not slices[0].is_volume


# --- slice spacing, derived series, NIfTI header ----------------------------------------------------------


def test_uneven_series_is_refused_naming_the_gaps(tmp_path):
    write_ct_series(tmp_path / "series", [0.0, 5.0, 6.0, 7.0], [1, 2, 3, 4])
    with pytest.raises(ImageInputError) as info:
        load_image(tmp_path / "series")
    assert str(tmp_path / "series") in str(info.value) and "gaps of 5, 1 mm" in str(info.value)
    assert "--uneven-slices resample" in str(info.value)


def test_uneven_series_resamples_linearly_and_places_slices_right(tmp_path, caplog):
    positions = [0.0, 4.0, 5.0, 6.0]  # gaps 4, 1, 1: median 1 -> 7 slices at z = 0..6
    hu = write_ct_series(tmp_path / "series", positions, [1, 2, 3, 4])
    with caplog.at_level("WARNING", logger="healthgpt.io.dicom"):
        volume = load_image(tmp_path / "series", slice_index="all", uneven_slices="resample")
    assert "gaps of 4, 1 mm" in caplog.text and "resampled to 7 slices 1 mm apart" in caplog.text
    # z = k: between slices at 0 and 4 for k < 4, then the slices themselves
    expected = [hu[0] + (hu[1] - hu[0]) * k / 4 for k in range(4)] + [hu[1], hu[2], hu[3]]
    np.testing.assert_allclose(volume.array, np.stack(expected), rtol=0, atol=1e-3)
    np.testing.assert_allclose(volume.affine[:3, 0], [0, 0, 1])
    out = write_volume(volume.array, volume, tmp_path / "even.nii.gz")
    nifti = nib.load(out)
    for k in range(7):  # every written slice sits at its true height
        np.testing.assert_allclose((nifti.affine @ [0, 0, k, 1])[2], k, atol=1e-4)


def test_pydicom_series_with_uneven_gaps():
    folder = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "77654033" / "CT2"
    heights = sorted(float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in folder.iterdir())
    with pytest.raises(ImageInputError, match="4 slices are unevenly spaced"):
        load_image(folder, slice_index="all")
    volume = load_image(folder, slice_index="all", uneven_slices="resample")
    first, last = volume.affine @ [0, 0, 0, 1], volume.affine @ [volume.num_slices - 1, 0, 0, 1]
    np.testing.assert_allclose([first[2], last[2]], [heights[0], heights[-1]], atol=1e-3)


def test_rtdose_frames_are_placed_by_grid_frame_offsets():
    ds = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    volume = load_image(get_testdata_file("rtdose.dcm"), slice_index="all")
    for k in (0, 7, 14):  # LPS z = ImagePositionPatient z + offset; RAS keeps z
        z = float(ds.ImagePositionPatient[2]) + float(ds.GridFrameOffsetVector[k])
        np.testing.assert_allclose((volume.affine @ [k, 0, 0, 1])[2], z, atol=1e-4)


def test_frames_without_geometry_start_at_the_first():
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    rgb = pydicom.dcmread(path).pixel_array
    np.testing.assert_allclose(load_image(path).array, rgb[0], atol=1e-3)  # what --frame's help says: 0
    np.testing.assert_allclose(load_image(path, frame=1).array, rgb[1], atol=1e-3)


@pytest.mark.parametrize(
    ("target", "storage"),
    [
        ("MR", pydicom.uid.MRImageStorage),
        ("CT", pydicom.uid.CTImageStorage),
        ("US", pydicom.uid.SecondaryCaptureImageStorage),
    ],
)
def test_derived_grey_series_takes_the_target_modality(tmp_path, target, storage):
    grey_pixels = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    picture = Image.fromarray(grey_pixels).convert("RGB")  # what generation returns: grey drawn as RGB
    (path,) = sorted(save_dicom_series([picture], load_image(CT), tmp_path / "gen", modality=target).iterdir())
    ds = pydicom.dcmread(path)
    assert (ds.Modality, ds.SOPClassUID, ds.PhotometricInterpretation) == (target, storage, "MONOCHROME2")
    assert ds.SamplesPerPixel == 1 and ds.BitsAllocated == (8 if target == "US" else 16)
    np.testing.assert_array_equal(apply_modality_lut(ds.pixel_array, ds), grey_pixels)
    if target != "US":
        assert ds.RescaleType == "US"  # display values, not Hounsfield units
        assert load_image(path).modality == target


def test_nifti_output_sets_qform_and_sform(tmp_path):
    source = load_image(CT)
    out = save_nifti(source.array, tmp_path / "ct.nii.gz", source)
    header = nib.load(out).header
    assert int(header["qform_code"]) == int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), header.get_sform(), atol=1e-4)
    np.testing.assert_allclose(nib.load(out).affine @ [0, 0, 0, 1], source.affine @ [0, 127, 127, 1], atol=1e-3)
