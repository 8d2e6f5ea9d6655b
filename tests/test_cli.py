"""The `healthgpt` command line as users run it: the installed entry point in a subprocess, on the nano model.

Outputs are checked against the Python API on the same nano model (same seed, greedy), so the CLI is shown to be a
thin layer: same answers, same images, geometry kept by the writers. Bad input must give one `error:` line, exit
code 2 and no output file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import typer
from nibabel.testing import data_path
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from healthgpt import HealthGPT, load_image
from healthgpt.cli import app

CT = Path(get_testdata_file("CT_small.dcm"))
NIFTI = Path(data_path) / "example4d.nii.gz"
UNEVEN = str(Path(CT).parent / "dicomdirtests" / "77654033" / "CT2")  # pydicom's series with gaps 202.5, 1.3, 1.2
SCRIPT = shutil.which("healthgpt")
ENTRY = [SCRIPT] if SCRIPT else [sys.executable, "-m", "healthgpt.cli"]
ENV = {**os.environ, "PYTHONUTF8": "1", "COLUMNS": "200", "TQDM_DISABLE": "1"}
TOKENS = ["--max-new-tokens", "8"]
COMMANDS = ["ask", "chat", "generate", "batch", "convert", "info", "demo", "serve", "ui", "train", "export"]
COMMANDS += ["tokenize-images", "train-vqgan", "eval", "compare", "score-images"]


def healthgpt(*args: object, cwd: Path, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `healthgpt` command with `args` in `cwd`."""
    return subprocess.run(
        [*ENTRY, *map(str, args)],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=ENV,
        timeout=timeout,
    )


def files_under(folder: Path) -> dict[Path, bytes | None]:
    """Every path under `folder` with its content (None for folders)."""
    return {p: p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


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
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture()
def bad_files(tmp_path: Path) -> Path:
    """A folder of broken inputs, each named for what is wrong with it."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("L", (64, 64), 3).save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:-30])
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)  # 1.6 billion pixels, a few bytes on disk
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    (tmp_path / "truncated.dcm").write_bytes(CT.read_bytes()[: CT.stat().st_size // 2])
    no_pixels = pydicom.dcmread(CT)
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "no_pixels.dcm")
    shutil.copy(CT, tmp_path / "ct.dcm")
    (tmp_path / "rows.jsonl").write_text('{"id": 1, "image": "ct.dcm", "question": "Why?"}\n{"id": 2, "image": \n')
    (tmp_path / "twice.jsonl").write_text('{"id": 1, "question": "Why?"}\n{"id": 1, "question": "How?"}\n')
    (tmp_path / "one.jsonl").write_text('{"id": 1, "question": "Why?"}\n')
    (tmp_path / "notes.txt").write_text("my notes\nnot results")  # no final newline: must not be cut
    Image.new("L", (20000, 1)).save(tmp_path / "wide.png")  # ~100 bytes; its padded square 400 M pixels
    header = nib.Nifti1Header()
    header.set_data_shape((64, 64, 64))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    (tmp_path / "short.nii").write_bytes(header.binaryblock + bytes(104))  # declares 1 MiB of voxels, holds 100 B
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), np.nan, np.float32), np.eye(4)), tmp_path / "nan.nii")
    long = bytearray(CT.read_bytes())
    at = long.rfind(b"\xe0\x7f\x10\x00OW")  # pixel data: tag, VR, 2 reserved bytes, then its 4-byte length
    long[at + 8 : at + 12] = struct.pack("<I", 0x7FFFFFF0)
    (tmp_path / "long.dcm").write_bytes(long)
    shutil.copy(tmp_path / "good.png", tmp_path / "taken.png")
    (tmp_path / "filled").mkdir()
    (tmp_path / "filled" / "keep.txt").write_text("not mine")
    (tmp_path / "scans").mkdir()  # a DICOM series folder
    shutil.copy(CT, tmp_path / "scans" / "00001.dcm")
    (tmp_path / "shown").mkdir()  # what an earlier `healthgpt demo --out shown` wrote
    shutil.copy(tmp_path / "good.png", tmp_path / "shown" / "CT_small.png")
    return tmp_path


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


# ----- outputs: refused before any model work ---------------------------------------------------------------------
NO_MODEL = """
import sys, torch
build = torch.nn.Module.__init__

def build_while_importing(self, *args, **kwargs):  # libraries build modules when imported: let them
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "_call_with_frames_removed":  # importlib's frame
        frame = frame.f_back
    if frame is None:
        raise RuntimeError("model work began")
    build(self, *args, **kwargs)

def load(*args, **kwargs):
    raise RuntimeError("model work began")

torch.nn.Module.__init__ = build_while_importing  # building any model, VQGAN or vision tower fails
torch.load = load
from healthgpt.cli import app
sys.argv = ["healthgpt", *sys.argv[1:]]
app()
"""
_FOLDER = "the output folder already exists and is not empty. Fix: choose another name, or pass --overwrite"

BAD_OUTPUTS = [
    pytest.param(
        ["generate", "good.png", "-o", "taken.png"],
        "taken.png: already exists. Fix: choose another name, or pass --overwrite to replace it",
        id="generate: existing file",
    ),
    pytest.param(
        ["generate", "ct.dcm", "-o", "gone/x.png"],
        "gone/x.png: the folder to write into does not exist. Fix: create gone first",
        id="generate: no folder",
    ),
    pytest.param(["generate", "ct.dcm", "-o", "filled"], f"filled: {_FOLDER}", id="generate: filled folder"),
    pytest.param(
        ["generate", "scans", "-o", "scans", "--overwrite"],
        "scans: holds the input scans, which replacing the folder would delete",
        id="generate: over its source",
    ),
    pytest.param(
        ["generate", "ct.dcm", "-o", ".", "--overwrite"],
        ".: holds the working directory, so it is not replaced",
        id="generate: over the working directory",
    ),
    pytest.param(["convert", "filled", "--include-base"], f"filled: {_FOLDER}", id="convert: filled folder"),
    pytest.param(
        ["convert", "taken.png", "--model", "filled"], "taken.png: is a file, not a folder", id="convert: a file"
    ),
    pytest.param(
        ["convert", "filled", "--model", "filled", "--overwrite"],
        "filled: holds the input filled",
        id="convert: over its model",
    ),
    pytest.param(["export", "filled"], f"filled: {_FOLDER}", id="export: filled folder"),
    pytest.param(
        ["export", "filled", "--set", "output_dir=filled/runs", "--overwrite"],
        "filled: holds the input filled/runs",
        id="export: over the runs",
    ),
    pytest.param(
        ["train-vqgan", "filled", "--out", "gone/vq"],
        "gone/vq: the folder to write into does not exist",
        id="train-vqgan: no folder",
    ),
    pytest.param(
        ["train-vqgan", "filled", "--out", "filled", "--overwrite"],
        "filled: holds the input filled",
        id="train-vqgan: over its images",
    ),
    pytest.param(
        ["tokenize-images", "rows.json", "--vqgan", "filled", "--cache", "taken.png/codes"],
        "taken.png/codes: cannot be created: taken.png is a file",
        id="tokenize-images: cache under a file",
    ),
    pytest.param(
        ["eval", "--data", "slake=filled", "--out", "taken.png"],
        "taken.png: is a file, not a folder",
        id="eval: run folder is a file",
    ),
    pytest.param(
        ["train", "--stage", "stage3_comprehension", "output_dir=taken.png"],
        "taken.png/stage3_comprehension: cannot be created: taken.png is a file",
        id="train: output_dir is a file",
    ),
    pytest.param(
        ["batch", "one.jsonl", "gone/out.jsonl"], "gone/out.jsonl: the folder to write", id="batch: no folder"
    ),
    pytest.param(["demo", "--out", "taken.png"], "taken.png: is a file, not a folder", id="demo: a file"),
    pytest.param(
        ["demo", "--out", "shown"],
        "shown/CT_small.png: already exists. Fix: choose another name, or pass --overwrite",
        id="demo: earlier images",
    ),
]


def no_model(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """`healthgpt args` in a process where building any torch module or loading a torch file fails."""
    return subprocess.run(
        [sys.executable, "-c", NO_MODEL, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300
    )


@pytest.mark.parametrize(("args", "message"), BAD_OUTPUTS)
def test_a_bad_output_is_refused_before_any_model_work(bad_files: Path, args: list, message: str) -> None:
    """One line naming the path and the fix, exit 2, nothing written, and no model built: were the check after the
    model work, the error would be "model work began"."""
    before = files_under(bad_files)
    out = no_model(*args, cwd=bad_files)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert message in out.stderr and "Fix: " in out.stderr and "Traceback" not in out.stderr
    assert files_under(bad_files) == before


def test_batch_refuses_rows_whose_output_is_taken_before_any_model_work(bad_files: Path) -> None:
    rows = [
        {"id": "taken", "image": "ct.dcm", "task": "ct2mri", "output": "taken.png"},
        {"id": "gone", "image": "ct.dcm", "task": "ct2mri", "output": "gone/g.png"},
    ]
    (bad_files / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = no_model("batch", "gen.jsonl", "out.jsonl", "--no-progress", cwd=bad_files)
    assert out.returncode == 2 and out.stderr == (
        "error: 2 of 2 rows failed; their lines in out.jsonl say why (fix them, then re-run with --retry-failed)\n"
    )
    results = {r["id"]: r["error"] for r in _rows(bad_files / "out.jsonl")}
    assert results["taken"].endswith(
        "taken.png: already exists. Fix: choose another name, or pass --overwrite to replace it"
    )
    assert results["gone"].endswith("gone/g.png: the folder to write into does not exist. Fix: create gone first")


ECHO = """
import sys
from types import SimpleNamespace
from healthgpt.cli import app, common

class Echo:  # generates the source picture back, so the test waits for the writes, not a model
    def generate_image(self, pictures, *args, **kwargs):
        return [SimpleNamespace(image=p, instruction="echo", task="ct2mri") for p in pictures]

common.ModelOptions.load = lambda self: Echo()
sys.argv = ["healthgpt", *sys.argv[1:]]
app()
"""


def echo(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """`healthgpt args` with a model that generates each source picture back."""
    return subprocess.run(
        [sys.executable, "-c", ECHO, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300
    )


def test_overwrite_replaces_a_file_and_a_whole_series_folder(tmp_path: Path) -> None:
    Image.new("L", (16, 16), 7).save(tmp_path / "old.png")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "stale.dcm").write_bytes(b"an older series")
    for args in (["-o", "old.png"], ["-o", "series"]):
        out = echo("generate", CT, *args, "--overwrite", "--task", "ct2mri", "--no-progress", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png", "series"]  # no temporary left beside them
    expected = np.asarray(load_image(CT).to_pil())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "old.png").convert("RGB")), expected)
    assert [p.name for p in (tmp_path / "series").iterdir()] == ["00001.dcm"]  # the old folder's file went with it
    assert load_image(tmp_path / "series").plane_shape == expected.shape[:2]


def test_batch_overwrite_replaces_row_outputs_and_still_resumes(tmp_path: Path) -> None:
    shutil.copy(CT, tmp_path / "ct.dcm")
    Image.new("L", (16, 16), 7).save(tmp_path / "g.png")  # e.g. written by a run killed before its result line
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "g", "image": "ct.dcm", "task": "ct2mri", "output": "g.png"}))
    refused = echo("batch", "in.jsonl", "out.jsonl", "--no-progress", cwd=tmp_path)
    assert refused.returncode == 2 and "g.png: already exists" in _rows(tmp_path / "out.jsonl")[0]["error"]
    out = echo("batch", "in.jsonl", "out.jsonl", "--retry-failed", "--overwrite", "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert _rows(tmp_path / "out.jsonl")[1] == {"id": "g", "output": "g.png", "instruction": "echo", "task": "ct2mri"}
    assert Image.open(tmp_path / "g.png").size == load_image(CT).to_pil().size
    again = echo("batch", "in.jsonl", "out.jsonl", "--overwrite", cwd=tmp_path)  # resumed: nothing left to run
    assert again.returncode == 0 and len(_rows(tmp_path / "out.jsonl")) == 2


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
def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


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
    results = {r["id"]: r for r in _rows(tmp_path / "out.jsonl")}
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
    assert again.returncode == 2 and len(_rows(tmp_path / "out.jsonl")) == len(rows)

    ct_picture.save(job / "notes.png")  # the bad image fixed: only --retry-failed runs its row again
    retried = healthgpt("batch", "job/in.jsonl", "out.jsonl", "--retry-failed", *TOKENS, cwd=tmp_path)
    lines = _rows(tmp_path / "out.jsonl")
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
    rows = _rows(results)
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
