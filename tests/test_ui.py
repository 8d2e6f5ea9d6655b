"""The Gradio app: its handlers in-process (streamed answers, slices and windows, generated files, refusals, model
choice), and the whole app in headless Chromium (slow)."""

from __future__ import annotations

import dataclasses
import io
import shutil
import socket
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from healthgpt.api import HealthGPT
from healthgpt.config import get_variant
from healthgpt.evaluation.phantom_goals import held_out
from healthgpt.io import load_image, save_nifti
from healthgpt.serving.batcher import Batcher
from healthgpt.serving.ui import ANALYZE, GENERATE, NOTICE, _App, build_ui

CT = get_testdata_file("CT_small.dcm")
QUESTION = "Is there a lesion in this CT image?"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def models():
    """Two small models (a 4x4 code grid keeps generation quick), each behind its own running batcher."""
    nano = get_variant("nano")
    config = nano.replace(vq=dataclasses.replace(nano.vq, image_size=32))
    loaded = {"a": HealthGPT.random(config, seed=0), "b": HealthGPT.random(config, seed=5)}
    batchers = {name: Batcher(model, name=name).start() for name, model in loaded.items()}
    yield loaded, _App(batchers, timeout=120)
    for batcher in batchers.values():
        batcher.close()


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    values = np.random.default_rng(0).normal(40, 300, (5, 24, 20)).astype(np.float32)
    return save_nifti(values, tmp_path_factory.mktemp("nifti") / "ct.nii.gz", np.diag([2.0, 1.0, 1.0, 1.0]))


def _process(
    app: _App,
    task: str,
    path,
    *,
    model="a",
    preset="reconstruct",
    text=QUESTION,
    index=None,
    window=None,
    guidance=None,
):
    path = str(path) if path else None
    return list(app.process(task, model, path, index, window, preset, text, 8, 0.0, 1.0, None, guidance))


def test_answers_stream_piece_by_piece_to_the_models_answer(models):
    loaded, app = models
    expected = loaded["a"].ask(load_image(CT).to_pil(), QUESTION, max_new_tokens=8)
    texts = [answer for answer, _, _ in _process(app, ANALYZE, CT)]
    assert len(texts) > 2 and texts[-1] == expected
    assert all(expected.startswith(partial) for partial in texts)


def test_the_chosen_model_answers_without_reloading(models):
    loaded, app = models
    picture = load_image(CT).to_pil()
    answers = {name: _process(app, ANALYZE, CT, model=name)[-1][0] for name in ("a", "b")}
    assert answers == {name: loaded[name].ask(picture, QUESTION, max_new_tokens=8) for name in ("a", "b")}
    assert answers["a"] != answers["b"]


def test_a_volume_gets_a_slice_slider_and_window_choice(models, volume):
    _, app = models
    slices = load_image(volume, slice_index="all").num_slices
    preview, slider, window = app.on_upload(str(volume))
    assert slider["visible"] and (slider["maximum"], slider["value"]) == (slices - 1, slices // 2)
    assert window["visible"]
    middle = load_image(volume)  # the middle slice, default window, enlarged to a readable size in mm proportions
    assert_enlarged(preview, middle.to_pil(), middle.pixel_spacing)
    shown = app.on_view(str(volume), 0, "bone")
    first = load_image(volume, slice_index=0, window="bone")
    assert_enlarged(shown, first.to_pil(), first.pixel_spacing)
    preview, slider, window = app.on_upload(CT)
    assert not slider["visible"] and window["visible"]
    assert preview.size == (384, 384)  # the 128 px CT, square pixels: each pixel shown 3x3
    np.testing.assert_array_equal(np.asarray(preview)[::3, ::3], np.asarray(load_image(CT).to_pil()))


def assert_enlarged(shown: Image.Image, picture: Image.Image, spacing: tuple[float, float]) -> None:
    """`shown` is `picture` at 384 px on its longer side, in the proportions of its size in mm, with no new values."""
    height_mm, width_mm = picture.height * spacing[0], picture.width * spacing[1]
    assert max(shown.size) == 384
    assert shown.width / shown.height == pytest.approx(width_mm / height_mm, rel=0.02)
    assert set(np.unique(np.asarray(shown))) <= set(np.unique(np.asarray(picture)))


def test_generated_images_download_as_png_and_as_the_inputs_format(models, volume):
    loaded, app = models
    [(_, picture, files)] = _process(app, GENERATE, volume, preset="ct2mri", index=1, window="bone")
    source = load_image(volume, slice_index=1, window="bone").to_pil()
    expected = loaded["a"].generate_image(source, "ct2mri", progress=False).image
    assert picture.size == (384, 384)  # the 32 px image shown 12x larger
    assert np.abs(np.asarray(picture, dtype=int)[::12, ::12] - np.asarray(expected, dtype=int)).max() <= 1
    names = sorted(Path(f).name for f in files["value"])
    assert names == ["generated.nii.gz", "generated.png"]
    for f in files["value"]:
        if f.endswith(".png"):
            assert Image.open(f).size == (32, 32)
        else:
            assert load_image(f).array.shape == (32, 32)

    [(_, _, files)] = _process(app, GENERATE, CT)
    dicom = next(f for f in files["value"] if f.endswith(".dcm"))
    ds = pydicom.dcmread(dicom)
    assert (ds.Rows, ds.Columns) == (32, 32) and ds.PatientID == pydicom.dcmread(CT).PatientID


def test_generation_guides_at_the_models_own_scale_unless_the_form_sets_one(tmp_path):
    """The shipped nano told to guide at 3: with the guidance field empty the UI's image is the guided one; 1 gives
    the plain one; 0 is refused with the reason."""
    model = HealthGPT.from_pretrained("nano")
    model.config = model.config.replace(guidance_scale=3.0)
    path = tmp_path / "ct.png"
    held_out(1, seed=2, size=64)[0][0].rgb("ct").save(path)
    source = load_image(path).to_pil()
    guided, plain = (model.generate_image(source, "ct2mri", guidance_scale=s, progress=False).image for s in (3.0, 1.0))
    assert not np.array_equal(np.asarray(guided), np.asarray(plain))
    batcher = Batcher(model, name="guided").start()
    app = _App({"guided": batcher}, timeout=120)

    def shown(guidance: float | None) -> np.ndarray:
        [(_, picture, _)] = _process(app, GENERATE, path, model="guided", preset="ct2mri", guidance=guidance)
        return np.asarray(picture.convert("RGB"), dtype=int)[::6, ::6]  # the 64 px image shown 6x larger

    try:
        assert np.abs(shown(None) - np.asarray(guided, dtype=int)).max() <= 1
        assert np.abs(shown(1.0) - np.asarray(plain, dtype=int)).max() <= 1
        with pytest.raises(gr.Error, match="guidance_scale must be a finite number above 0"):
            shown(0.0)
    finally:
        batcher.close()


@pytest.mark.parametrize(
    ("path", "question", "message"),
    [(None, QUESTION, "upload an image to analyze"), (CT, "  ", "type a question about the image")],
)
def test_analysis_needs_an_image_and_a_question(models, path, question, message):
    _, app = models
    with pytest.raises(gr.Error, match=message):
        _process(app, ANALYZE, path, text=question)


def test_the_form_starts_empty_and_takes_any_file(models):
    _, app = models
    demo = build_ui(app.batchers)
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert not blocks["question"].value  # no prefilled question to answer without an image
    assert blocks["upload"].file_types is None  # .tif, .bmp and DICOM without an extension are not filtered out


def test_a_tiff_upload_and_an_extensionless_dicom_preview(models, tmp_path):
    _, app = models
    shutil.copy(CT, tmp_path / "IM000001")  # DICOM as scanners name it
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64)).save(tmp_path / "scan.tif")
    for path in (tmp_path / "IM000001", tmp_path / "scan.tif"):
        preview, _, window = app.on_upload(str(path))
        image = load_image(path)
        assert_enlarged(preview, image.to_pil(), image.pixel_spacing or (1.0, 1.0))
        assert window["visible"] == (path.suffix == "")  # windows for the DICOM's HU


@pytest.mark.parametrize(
    ("path", "preset", "message"),
    [(CT, "report_to_cxr", "give no input image"), (None, "ct2mri", "give an input image")],
)
def test_generation_refuses_inputs_its_task_cannot_use(models, path, preset, message):
    _, app = models
    with pytest.raises(gr.Error, match=message):
        _process(app, GENERATE, path, preset=preset, text="Normal chest.")


@pytest.mark.slow
def test_the_app_in_a_browser(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    model = HealthGPT.random("nano")
    expected = model.ask(load_image(CT).to_pil(), QUESTION, max_new_tokens=256)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Batcher(model, name="healthgpt-nano") as batcher:
        demo = build_ui({"healthgpt-nano": batcher})
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            with playwright.sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/")
                notice = page.locator("#notice")
                playwright.expect(notice).to_contain_text("not a diagnostic device", timeout=60_000)
                assert "Research tool" in NOTICE

                page.locator("#upload input[type=file]").set_input_files(CT)
                playwright.expect(page.locator("#preview img")).to_be_visible(timeout=60_000)
                page.locator("#question textarea").fill(QUESTION)
                page.locator("#process").click()
                answer = page.locator("#answer textarea")
                final = expected.replace("\r\n", "\n").replace("\r", "\n")
                seen = []
                deadline = time.monotonic() + 180
                while (value := answer.input_value()) != final and time.monotonic() < deadline:
                    if value and (not seen or seen[-1] != value):
                        seen.append(value)
                    time.sleep(0.05)
                assert value == final
                assert seen and all(final.startswith(v) for v in seen)  # the answer grew as it was streamed

                page.get_by_label(GENERATE).check()
                page.locator("#process").click()
                playwright.expect(page.locator("#generated img")).to_be_visible(timeout=180_000)
                playwright.expect(page.locator('#files a[href$="generated.dcm"]')).to_have_count(1, timeout=30_000)
                png = page.request.get(page.locator('#files a[href$="generated.png"]').get_attribute("href"))
                assert Image.open(io.BytesIO(png.body())).size == (64, 64)
                page.screenshot(path=str(tmp_path / "healthgpt-ui.png"), full_page=True)
                browser.close()
        finally:
            demo.close()
    assert Image.open(tmp_path / "healthgpt-ui.png").size[0] >= 1000
