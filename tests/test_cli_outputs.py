"""Every command that writes checks its outputs before any model work: a taken file or a filled folder is refused
unless `--overwrite`, a missing parent folder is named, and nothing is written. Run in processes where building a
torch module or loading a torch file fails, so a check made after the model work would show."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli import CT, ENV, files_under, read_rows
from PIL import Image

from healthgpt import load_image

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
        "shown/panel.png: already exists. Fix: choose another name, or pass --overwrite",
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
    results = {r["id"]: r["error"] for r in read_rows(bad_files / "out.jsonl")}
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
    assert refused.returncode == 2 and "g.png: already exists" in read_rows(tmp_path / "out.jsonl")[0]["error"]
    out = echo("batch", "in.jsonl", "out.jsonl", "--retry-failed", "--overwrite", "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert read_rows(tmp_path / "out.jsonl")[1] == {
        "id": "g",
        "output": "g.png",
        "instruction": "echo",
        "task": "ct2mri",
    }
    assert Image.open(tmp_path / "g.png").size == load_image(CT).to_pil().size
    again = echo("batch", "in.jsonl", "out.jsonl", "--overwrite", cwd=tmp_path)  # resumed: nothing left to run
    assert again.returncode == 0 and len(read_rows(tmp_path / "out.jsonl")) == 2
