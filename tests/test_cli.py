"""The `healthgpt` command line as users run it: the installed entry point in a subprocess, on the nano model.

Outputs are checked against the Python API on the same nano model (same seed, greedy), so the CLI is shown to be a
thin layer: same answers, same images, geometry kept by the writers. Bad input must give one `error:` line, exit
code 2 and no output file.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import typer
from _cli import CT, ENTRY, ENV, files_under, healthgpt, read_rows
from nibabel.testing import data_path
from PIL import Image
from pydicom.pixels import apply_modality_lut

from healthgpt import HealthGPT, load_image
from healthgpt.cli import app

NIFTI = Path(data_path) / "example4d.nii.gz"
UNEVEN = str(Path(CT).parent / "dicomdirtests" / "77654033" / "CT2")  # pydicom's series with gaps 202.5, 1.3, 1.2
TOKENS = ["--max-new-tokens", "8"]
COMMANDS = ["ask", "chat", "generate", "batch", "convert", "info", "demo", "serve", "ui", "train", "export"]
COMMANDS += ["tokenize-images", "train-vqgan", "eval", "compare", "score-images"]


@pytest.fixture(scope="module")
def nano() -> HealthGPT:
    """What `--model nano` loads: the embedded model trained on phantoms."""
    return HealthGPT.from_pretrained("nano")


@pytest.fixture(scope="module")
def ct_picture() -> Image.Image:
    return load_image(CT).to_pil()


# ----- help and import cost ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option(command: str, tmp_path: Path) -> None:
    out = healthgpt(command, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        if param.param_type_name == "option":
            assert param.help, f"{command} {param.opts[0]} has no help"
            assert param.opts[0] in out.stdout
        else:
            assert param.help, f"{command} argument {param.name} has no help"


def test_top_level_help_lists_commands_without_loading_torch(tmp_path: Path) -> None:
    out = healthgpt("--help", cwd=tmp_path)
    assert out.returncode == 0 and all(c in out.stdout for c in COMMANDS)
    code = "import sys, healthgpt.cli; assert not {'torch', 'transformers'} & set(sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0


# ----- bad input: one line, exit code 2, nothing written -----------------------------------------------------------
BAD_INPUTS = [
    pytest.param(["ask", "missing.png", "Why?"], "missing.png: does not exist", id="missing image"),
    pytest.param(["ask", "empty.png", "Why?"], "empty.png: is empty (0 bytes)", id="empty file"),
    pytest.param(["ask", "notes.png", "Why?"], "notes.png: is not a recognised image", id="not an image"),
    pytest.param(["ask", "truncated.png", "Why?"], "truncated.png: is truncated or corrupt", id="truncated png"),
    pytest.param(["ask", "bomb.png", "Why?"], "bomb.png: is too large to decode safely", id="decompression bomb"),
    pytest.param(["ask", "truncated.dcm", "Why?"], "truncated.dcm: is truncated or corrupt", id="truncated dicom"),
    pytest.param(["ask", "no_pixels.dcm", "Why?"], "no_pixels.dcm: has no pixel data", id="dicom without pixels"),
    pytest.param(["ask", "long.dcm", "Why?"], "long.dcm: is truncated or corrupt: its pixel", id="dicom length"),
    pytest.param(["ask", "nan.nii", "Why?"], "nan.nii: holds no finite pixel value", id="all-nan image"),
    pytest.param(["ask", "wide.png", "Why?"], "wide.png: the square canvas a 20000 x 1 picture", id="20000x1 png"),
    pytest.param(["ask", "short.nii", "Why?"], "short.nii: is truncated or corrupt", id="nifti short of its header"),
    pytest.param(["ask", "ct.dcm", "  "], "question 1 is empty", id="empty question"),
    pytest.param(["ask", "ct.dcm", "Why?", "--window", "sunset"], "unknown window 'sunset'", id="unknown window"),
    pytest.param(["ask", NIFTI, "Why?", "--slice", "99"], "slice index 99 is out of range", id="slice out of range"),
    pytest.param(
        ["ask", "ct.dcm", "Why?", "--model", "nano", "--plugin-file", "comprehension"],
        "use PLUGIN=PATH",
        id="plugin spec without path",
    ),
    pytest.param(
        ["ask", "ct.dcm", "Why?", "--model", "m3", "--plugin-file", "comprehension=gone/com_hlora_weights.bin"],
        "--plugin-file comprehension=gone/com_hlora_weights.bin: no such file",
        id="missing weight file",
    ),
    pytest.param(
        ["ask", "ct.dcm", "Why?", "--model", "./bundles/gone"],
        "--model ./bundles/gone: no such folder",
        id="missing bundle folder",
    ),
    pytest.param(
        ["generate", "ct.dcm", "-o", "out.png", "--task", "ct2mri", "--instruction", "Make it MRI."],
        "give --task or --instruction, not both",
        id="task and instruction",
    ),
    pytest.param(["generate", "-o", "cxr.png", "--task", "report_to_cxr"], "report (--text;", id="report without text"),
    pytest.param(
        ["ask", "ct.dcm", "Why?", "--device", "cuda"],
        "--device cuda: torch",
        id="cuda without a GPU",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU"),
    ),
    pytest.param(
        ["generate", "-o", "mri.png", "--task", "ct2mri"],
        "transforms an image: give an input image",
        id="task without image",
    ),
    pytest.param(["generate", "ct.dcm", "-o", "out.jpg"], "unsupported output suffix '.jpg'", id="unknown suffix"),
    pytest.param(["generate", "good.png", "-o", "series"], "this output needs a DICOM source", id="dicom from png"),
    pytest.param(["generate", "good.png", "-o", "out.nii.gz"], "needs a source with geometry", id="nifti from png"),
    pytest.param(["generate", NIFTI, "-o", "v.png", "--all-slices"], "a PNG holds one slice", id="volume into png"),
    pytest.param(["generate", NIFTI, "-o", "v.nii", "--all-slices", "--slice", "3"], "exclude each other", id="slices"),
    pytest.param(["batch", "rows.jsonl", "out.jsonl"], "rows.jsonl:2: not valid JSON", id="batch bad json"),
    pytest.param(["batch", "twice.jsonl", "out.jsonl"], "id 1 appears twice", id="batch duplicate id"),
    pytest.param(["batch", "one.jsonl", "notes.txt"], "notes.txt:1: not a result line", id="batch foreign output"),
    pytest.param(["info", "gone.nii.gz"], "gone.nii.gz: does not exist", id="info missing file"),
    pytest.param(["info", UNEVEN], "4 slices are unevenly spaced (gaps of 202.5, 1.25 mm)", id="uneven slice gaps"),
    pytest.param(
        ["ask", "ct.dcm", "word " * 1500],
        "but the model's context is 1024 tokens",
        id="question over the context",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad_files: Path, args: list, message: str) -> None:
    before = files_under(bad_files)
    out = healthgpt(*args, cwd=bad_files)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""
    assert files_under(bad_files) == before


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_in(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    key = sorted(k for k in state if state[k].is_floating_point())[0]
    state[key][0] = float("nan")
    save_file(state, path)


@pytest.fixture(scope="module")
def pristine_bundle(nano: HealthGPT, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bundle") / "bundle"
    nano.save_pretrained(folder, include_base=True)
    return folder


BAD_BUNDLES = [
    pytest.param(lambda b: _truncate(b / "llm" / "model.safetensors"), "llm", id="truncated base llm"),
    pytest.param(lambda b: _truncate(b / "vision" / "model.safetensors"), "vision", id="truncated vision tower"),
    pytest.param(lambda b: _truncate(b / "vqgan" / "vqgan.safetensors"), "vqgan", id="truncated vqgan"),
    pytest.param(
        lambda b: (b / "bundle.json").write_text("[1, 2]"), "bundle.json: not a bundle", id="bundle.json list"
    ),
    pytest.param(lambda b: (b / "bundle.json").write_text('{"format": '), "not a HealthGPT bundle", id="bad json"),
    pytest.param(
        lambda b: _nan_in(b / "plugins" / "generation.safetensors"),
        "generation.safetensors: tensor ",
        id="nan in a plugin",
    ),
]


@pytest.mark.parametrize(("damage", "message"), BAD_BUNDLES)
def test_a_damaged_bundle_is_one_line_exit_2(pristine_bundle: Path, tmp_path: Path, damage, message: str) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(pristine_bundle, bundle)
    shutil.copy(CT, tmp_path / "ct.dcm")
    damage(bundle)
    before = files_under(tmp_path)
    out = healthgpt("ask", "ct.dcm", "Why?", "--model", "bundle", *TOKENS, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert files_under(tmp_path) == before


# ----- info --------------------------------------------------------------------------------------------------------
def test_uneven_slices_resampled_on_request_with_one_warning(tmp_path: Path) -> None:
    out = healthgpt("info", UNEVEN, "--uneven-slices", "resample", "--json", cwd=tmp_path)
    assert out.returncode == 0 and out.stderr.count("\n") == 1
    assert "gaps of 202.5, 1.25 mm" in out.stderr and "resampled to 165 slices 1.25 mm apart" in out.stderr
    facts = json.loads(out.stdout)
    assert facts["slices"] == 165 and facts["spacing_mm"][0] == 1.25  # (105.5 - -99.5) / 1.25 + 1 slices


def test_info_on_images(tmp_path: Path) -> None:
    out = healthgpt("info", CT, "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    ds = pydicom.dcmread(CT)
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert facts["format"] == "DICOM" and facts["modality"] == "CT" and facts["units"] == "HU"
    assert facts["shape"] == [ds.Rows, ds.Columns]
    assert facts["spacing_mm"] == pytest.approx([float(v) for v in ds.PixelSpacing], abs=1e-4)
    assert facts["value_range"] == [float(hu.min()), float(hu.max())]
    assert facts["window"] == {"center": 40, "width": 400, "from": "default for CT"}

    facts = json.loads(healthgpt("info", NIFTI, "--json", cwd=tmp_path).stdout)
    volume = nib.load(NIFTI)
    assert facts["format"] == "NIfTI" and facts["slices"] == volume.shape[2]
    assert sorted(facts["shape"]) == sorted(volume.shape[:3])
    assert sorted(facts["spacing_mm"]) == pytest.approx(sorted(volume.header.get_zooms()[:3]), abs=1e-4)
    text = healthgpt("info", NIFTI, cwd=tmp_path).stdout
    assert "format: NIfTI" in text and "percentiles: [0.5, 99.5]" in text


def test_info_json_is_valid_json_with_null_for_non_finite_values(tmp_path: Path) -> None:
    values = np.arange(48, dtype=np.float32).reshape(4, 4, 3)
    values[0, 0, 0], values[1, 1, 1] = -np.inf, np.nan
    nib.save(nib.Nifti1Image(values, np.eye(4)), tmp_path / "inf.nii")
    out = healthgpt("info", "inf.nii", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    facts = json.loads(out.stdout, parse_constant=refuse)
    assert facts["value_range"] == [None, 47.0]


# ----- ask, chat ---------------------------------------------------------------------------------------------------
def test_ask_prints_the_api_answers(nano: HealthGPT, ct_picture: Image.Image, tmp_path: Path) -> None:
    out = healthgpt("ask", CT, "Is there a lesion?", *TOKENS, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == nano.ask(ct_picture, "Is there a lesion?", max_new_tokens=8) + "\n"
    assert out.stderr == ""  # no "Loading weights" bars, no library warnings


@pytest.mark.slow
def test_ask_batches_several_questions_with_image_options(nano: HealthGPT, tmp_path: Path) -> None:
    questions = ["Is there a lesion?", "Which organ is this?"]
    out = healthgpt("ask", NIFTI, *questions, "--slice", "3", "--window", "percentile", *TOKENS, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    picture = load_image(NIFTI, slice_index=3, window="percentile").to_pil()
    answers = nano.ask(picture, questions, max_new_tokens=8)
    assert out.stdout == "".join(a + "\n" for a in answers)


@pytest.mark.slow
def test_chat_reads_turns_from_stdin(nano: HealthGPT, ct_picture: Image.Image, tmp_path: Path) -> None:
    script = "Is there a lesion?\n\nWhy?\n/reset\nWhy?\n/quit\nNever read.\n"
    out = healthgpt("chat", CT, *TOKENS, cwd=tmp_path, stdin=script)
    assert out.returncode == 0, out.stderr
    first = [{"role": "user", "content": "Is there a lesion?"}]
    reply = nano.chat(first, ct_picture, max_new_tokens=8)
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
    follow_up = nano.chat(second, ct_picture, max_new_tokens=8)
    fresh = nano.chat([{"role": "user", "content": "Why?"}], ct_picture, max_new_tokens=8)
    assert follow_up != fresh  # so the output shows that /reset really dropped the history
    assert out.stdout == f"{reply}\n{follow_up}\n{fresh}\n"
    assert "(new conversation)" in out.stderr


# ----- generate ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_generate_png_is_the_api_image(nano: HealthGPT, ct_picture: Image.Image, tmp_path: Path) -> None:
    out = healthgpt("generate", CT, "-o", "mri.png", "--task", "ct2mri", "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "mri.png\n" and list(files_under(tmp_path)) == [tmp_path / "mri.png"]
    expected = nano.generate_image(ct_picture, "ct2mri", progress=False).image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "mri.png")), np.asarray(expected))


@pytest.mark.slow
def test_generate_nifti_keeps_the_source_affine(tmp_path: Path) -> None:
    out = healthgpt("generate", NIFTI, "-o", "ct.nii.gz", "--task", "mri2ct", "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    source = load_image(NIFTI)  # the middle axial slice, as the command used
    written = load_image(tmp_path / "ct.nii.gz", slice_index="all")
    assert written.plane_shape == (64, 64) and written.num_slices == 1
    np.testing.assert_allclose(written.affine, source.grid_affine(64, 64), atol=1e-4)


@pytest.mark.slow
def test_generate_all_slices_writes_a_volume_back(tmp_path: Path) -> None:
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    volume = np.random.default_rng(0).normal(size=(40, 30, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "mr.nii.gz")
    args = ["mr.nii.gz", "-o", "sr.nii.gz", "--task", "super_resolution", "--all-slices", "--batch-size", "2"]
    out = healthgpt("generate", *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "slices: 100%" in out.stderr and "3/3" in out.stderr  # the overall counter over the batches
    source = load_image(tmp_path / "mr.nii.gz", slice_index="all")
    written = load_image(tmp_path / "sr.nii.gz", slice_index="all")
    assert written.num_slices == 3 and written.plane_shape == (64, 64)
    np.testing.assert_allclose(written.affine, source.grid_affine(64, 64), atol=1e-4)


@pytest.mark.slow
def test_generate_dicom_series_from_a_dicom_source(tmp_path: Path) -> None:
    out = healthgpt("generate", CT, "-o", "series", "--task", "ct2mri", "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "series").iterdir())
    assert [f.name for f in files] == ["00001.dcm"]
    source, derived = pydicom.dcmread(CT), pydicom.dcmread(files[0])
    assert derived.StudyInstanceUID == source.StudyInstanceUID and derived.PatientID == source.PatientID
    assert derived.SeriesInstanceUID != source.SeriesInstanceUID and "DERIVED" in derived.ImageType
    assert (derived.Rows, derived.Columns) == (64, 64)
    assert float(derived.PixelSpacing[0]) == pytest.approx(float(source.PixelSpacing[0]) * source.Rows / 64)
    # a CT turned into MRI is an MR series of grey images
    assert (derived.Modality, derived.SOPClassUID) == ("MR", pydicom.uid.MRImageStorage)
    assert (derived.PhotometricInterpretation, derived.SamplesPerPixel) == ("MONOCHROME2", 1)
    assert load_image(tmp_path / "series").modality == "MR"


# ----- batch -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_batch_asks_generates_and_reports_bad_rows(nano: HealthGPT, ct_picture: Image.Image, tmp_path: Path) -> None:
    job = tmp_path / "job"  # paths in the rows start at the input's folder, not at the working directory
    job.mkdir()
    shutil.copy(CT, job / "ct.dcm")
    (job / "notes.png").write_text("not an image")
    rows = [
        {"id": 1, "image": "ct.dcm", "question": "Is there a lesion?"},
        {"id": "text", "question": "What is a CT scan?"},
        {"id": "bad", "image": "notes.png", "question": "Why?"},
        {"id": "long", "image": "ct.dcm", "question": "word " * 1500},
        {"id": "g", "image": "ct.dcm", "task": "ct2mri", "output": "g.png"},
        {"id": "g-bad", "image": "ct.dcm", "task": "ct2mri", "output": "g.jpg"},
    ]
    (job / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = healthgpt("batch", "job/in.jsonl", "out.jsonl", "--batch-size", "3", *TOKENS, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.endswith(
        "error: 3 of 6 rows failed; their lines in out.jsonl say why (fix them, then re-run with --retry-failed)\n"
    )
    results = {r["id"]: r for r in read_rows(tmp_path / "out.jsonl")}
    assert sorted(results, key=str) == sorted((r["id"] for r in rows), key=str)
    assert [results[1]["answer"], results["text"]["answer"]] == nano.ask(
        [ct_picture, None], ["Is there a lesion?", "What is a CT scan?"], max_new_tokens=8
    )
    assert "notes.png: is not a recognised image" in results["bad"]["error"]
    assert "context is 1024 tokens" in results["long"]["error"]
    assert "unsupported output suffix '.jpg'" in results["g-bad"]["error"]
    assert results["g"] == {"id": "g", "output": "g.png", "instruction": results["g"]["instruction"], "task": "ct2mri"}
    expected = nano.generate_image(ct_picture, "ct2mri", progress=False).image
    assert np.array_equal(np.asarray(Image.open(job / "g.png")), np.asarray(expected))
    assert not (job / "g.jpg").exists()

    again = healthgpt("batch", "job/in.jsonl", "out.jsonl", cwd=tmp_path)  # all done: nothing runs, nothing appended
    assert again.returncode == 2 and len(read_rows(tmp_path / "out.jsonl")) == len(rows)

    ct_picture.save(job / "notes.png")  # the bad image fixed: only --retry-failed runs its row again
    retried = healthgpt("batch", "job/in.jsonl", "out.jsonl", "--retry-failed", *TOKENS, cwd=tmp_path)
    lines = read_rows(tmp_path / "out.jsonl")
    assert retried.returncode == 2 and "2 of 6 rows failed" in retried.stderr
    assert sorted(str(r["id"]) for r in lines[len(rows) :]) == ["bad", "g-bad", "long"]  # the failed rows, once each
    assert {r["id"]: r for r in lines}["bad"] == {"id": "bad", "answer": nano.ask(ct_picture, "Why?", max_new_tokens=8)}


@pytest.mark.slow
def test_batch_killed_halfway_resumes_with_every_row_once(nano: HealthGPT, tmp_path: Path) -> None:
    questions = [f"Question number {i}: is there a lesion in region {i}?" for i in range(60)]
    lines = [json.dumps({"id": f"q{i}", "question": q}) for i, q in enumerate(questions)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    results = tmp_path / "out.jsonl"
    args = [*ENTRY, "batch", "in.jsonl", "out.jsonl", "--batch-size", "2", "--no-progress", *TOKENS]
    log = (tmp_path / "stderr.txt").open("w")
    run = subprocess.Popen(args, cwd=tmp_path, env=ENV, stdout=log, stderr=log)
    deadline = time.monotonic() + 240
    while (not results.exists() or results.read_text().count("\n") < 10) and run.poll() is None:
        assert time.monotonic() < deadline, "the batch never got going"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    log.close()
    assert run.returncode == -signal.SIGKILL, "the batch finished before it could be killed"
    written = results.read_text().count("\n")
    assert 10 <= written < len(questions)
    with results.open("a") as file:  # as if the kill had landed in the middle of a write
        file.write('{"id": "q59", "answer": "half wri')

    out = healthgpt("batch", "in.jsonl", "out.jsonl", "--batch-size", "4", *TOKENS, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = read_rows(results)
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(len(questions)))
    answers = dict(
        zip((f"q{i}" for i in range(len(questions))), nano.ask(None, questions, max_new_tokens=8), strict=True)
    )
    assert all(r["answer"] == answers[r["id"]] for r in rows)


# ----- convert and bundles -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_convert_writes_a_bundle_that_info_describes_and_ask_loads(
    nano: HealthGPT, ct_picture: Image.Image, tmp_path: Path
) -> None:
    refused = healthgpt("convert", "bundle", "--model", "nano", cwd=tmp_path)
    assert refused.returncode == 2 and "add --include-base" in refused.stderr
    assert not (tmp_path / "bundle").exists()
    out = healthgpt("convert", "bundle", "--model", "nano", "--include-base", cwd=tmp_path)
    assert out.returncode == 0, out.stderr

    facts = json.loads(healthgpt("info", "bundle", "--json", cwd=tmp_path).stdout)
    assert facts["config"]["variant"] == "nano" and facts["bundle"]["plugins"] == ["comprehension", "generation"]
    plugins = {w["file"]: w for w in facts["weights"] if w["file"].startswith("plugins/")}
    for name, plugin in nano.config.plugins.items():
        hlora = plugins[f"plugins/{name}.safetensors"]["hlora"]
        assert (hlora["rank"], hlora["experts"]) == (plugin.rank, plugin.num_experts)
    assert all(w["dtypes"] == {"float32": w["tensors"]} for w in facts["weights"])

    answer = healthgpt("ask", CT, "Is there a lesion?", "--model", "bundle", *TOKENS, cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout == nano.ask(ct_picture, "Is there a lesion?", max_new_tokens=8) + "\n"


# ----- internal errors ---------------------------------------------------------------------------------------------
def test_internal_error_exits_1_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    """A failure that is not bad input (here a model that breaks while loading) is exit code 1, one line."""
    code = (
        "import sys\n"
        "from healthgpt.cli import app, common\n"
        "def broken(self):\n    raise RuntimeError('boom')\n"
        "common.ModelOptions.load = broken\n"
        "sys.argv = ['healthgpt', *sys.argv[1:]]\n"
        "app()\n"
    )
    args = [sys.executable, "-c", code, "ask", str(CT), "Why?"]
    out = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert out.returncode == 1
    assert out.stderr == "error: internal error (RuntimeError: boom); rerun with --debug for the traceback\n"
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "RuntimeError: boom" in debug.stderr


@pytest.mark.slow
def test_convert_official_files_then_ask_gives_the_published_answer(published: Path, tmp_path: Path) -> None:
    """The published code's answer on its tiny M3-shaped files, from the official files and from our bundle."""
    case = json.loads((published / "case_a_m3_com" / "outputs.json").read_text())
    plugin = published / "case_a_m3_com" / "com_hlora_weights.bin"
    official = ["--model", "m3", "--base-model", published / "tiny_phi3", "--vision-tower", published / "tiny_clip"]
    official += ["--plugin-file", f"comprehension={plugin}", "--dtype", "float32"]
    out = healthgpt("convert", "bundle", *official, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for model in (official, ["--model", "bundle"]):
        answer = healthgpt(
            "ask", published / "input_image.png", case["question"], *model, "--max-new-tokens", 16, cwd=tmp_path
        )
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout == case["decoded_skip_special"].strip() + "\n"
    facts = json.loads(healthgpt("info", plugin, "--json", cwd=tmp_path).stdout)
    (weights,) = facts["weights"]
    assert weights["hlora"] == {"rank": 64, "experts": 4, "tensors": 24} and weights["dtypes"] == {"float16": 28}
