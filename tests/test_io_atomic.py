"""Outputs: files get the umask's mode, temporaries of killed runs are cleaned at the next write, SIGTERM and SIGINT
remove the temporary of a write cut short (in the library and in the CLI)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from healthgpt import HealthGPT
from healthgpt.cli.outputs import check_output
from healthgpt.config import get_variant
from healthgpt.errors import ImageInputError
from healthgpt.io import save_png
from healthgpt.io.atomic import atomic_target, check_folder, check_target, replacing, scratch_folder
from healthgpt.vqgan import VQGAN

CT = get_testdata_file("CT_small.dcm")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "TQDM_DISABLE": "1"}


@pytest.fixture()
def umask() -> Iterator[None]:
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_written_files_get_the_umasks_mode(tmp_path: Path, umask: None) -> None:
    VQGAN.from_config(get_variant("nano").vq).save(tmp_path / "vq")  # safetensors alone writes 0600
    save_png(np.zeros((4, 4), np.uint8), tmp_path / "a.png")
    HealthGPT.from_pretrained("nano").save_pretrained(tmp_path / "bundle", include_base=True)
    written = [tmp_path / "vq" / "vqgan.safetensors", tmp_path / "vq" / "vqgan.json", tmp_path / "a.png"]
    written += [p for p in (tmp_path / "bundle").rglob("*") if p.is_file()]
    assert len(written) > 5 and {p.stat().st_mode & 0o777 for p in written} == {0o640}


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_the_next_write_removes_what_killed_runs_left_but_not_what_live_ones_write(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / f".tmp-{dead}-0a1b-series").mkdir()
    (tmp_path / f".tmp-{dead}-0a1b-series" / "00001.dcm").write_bytes(b"patient id inside")
    (tmp_path / f".tmp-{dead}-2c3d-out.png").write_bytes(b"half a png")
    live = tmp_path / f".tmp-{os.getpid()}-4e5f-other.png"  # a write in progress in this process
    live.write_bytes(b"in progress")
    (tmp_path / ".tmp-notes").write_text("not ours: no process id")
    save_png(np.zeros((4, 4), np.uint8), tmp_path / "new.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, ".tmp-notes", "new.png"])


def test_an_existing_file_is_kept_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"keep")
    with pytest.raises(ImageInputError, match=r"x.png: already exists. Fix: .*--overwrite"):
        with atomic_target(tmp_path / "x.png", overwrite=False):
            pass
    with atomic_target(tmp_path / "x.png") as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "x.png").read_bytes() == b"new" and os.listdir(tmp_path) == ["x.png"]


def test_a_read_only_folder_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root every folder is writable, so the check is shown with `os.access` answering as for another user;
    `test_a_really_read_only_folder` does it for real where the tests do not run as root."""
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ImageInputError, match=r"out.png: the folder to write into is not writable"):
        check_output(tmp_path / "out.png", None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_a_really_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    with pytest.raises(ImageInputError, match="is not writable"):
        save_png(np.zeros((4, 4), np.uint8), folder / "out.png")


BAD_TARGETS = [
    pytest.param("out.png", False, "out.png: is a folder, not a file. Fix: give a file path to write", id="a folder"),
    pytest.param("x.png", True, "x.png: is a file, not a folder. Fix: give a folder name to write", id="a file"),
    pytest.param("out.png", True, "out.png: the output folder already exists and is not empty", id="filled"),
    pytest.param("x.png", False, "x.png: already exists. Fix: choose another name, or pass --overwrite", id="taken"),
    pytest.param("gone/x.png", False, "gone/x.png: the folder to write into does not exist", id="no parent"),
]


@pytest.mark.parametrize(("name", "directory", "message"), BAD_TARGETS)
def test_bad_targets_are_refused_naming_the_path_and_the_fix(tmp_path: Path, name, directory, message) -> None:
    (tmp_path / "out.png").mkdir()
    (tmp_path / "out.png" / "a.png").write_bytes(b"kept")
    (tmp_path / "x.png").write_bytes(b"kept")
    with pytest.raises(ImageInputError) as refused:
        check_target(tmp_path / name, directory=directory)
    assert str(refused.value).startswith(f"{tmp_path}/{message}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "out.png", "x.png"]  # nothing written


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("x.png", "x.png: is a file, not a folder"),
        ("x.png/cache/codes", "x.png/cache/codes: cannot be created: " + "{tmp}/x.png is a file"),
    ],
)
def test_a_folder_to_create_or_resume_needs_a_writable_folder_above_it(tmp_path: Path, name, message) -> None:
    (tmp_path / "x.png").write_bytes(b"kept")
    check_folder(tmp_path / "runs" / "m3" / "stage2")  # created with its parents later
    with pytest.raises(ImageInputError, match=re.escape(f"{tmp_path}/{message.format(tmp=tmp_path)}. Fix: ")):
        check_folder(tmp_path / name)


def test_a_folder_under_a_read_only_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # as for another user (see above)
    with pytest.raises(ImageInputError, match=f"runs/m3: cannot be written: {tmp_path} is not writable. Fix: "):
        check_folder(tmp_path / "runs" / "m3")


def test_replacing_a_filled_folder_keeps_the_old_one_until_the_new_one_is_complete(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "old.dcm").write_bytes(b"old series")
    with pytest.raises(RuntimeError, match="the model broke"):
        with replacing(folder) as target:
            assert target != folder and not target.exists()
            target.mkdir()
            (target / "00001.dcm").write_bytes(b"half a new series")
            raise RuntimeError("the model broke")
    assert os.listdir(tmp_path) == ["series"] and os.listdir(folder) == ["old.dcm"]
    with replacing(folder) as target, atomic_target(target, directory=True) as tmp:
        (tmp / "00001.dcm").write_bytes(b"new series")
    assert os.listdir(tmp_path) == ["series"] and os.listdir(folder) == ["00001.dcm"]
    with replacing(tmp_path / "new") as target:  # nothing to replace: written in place
        assert target == tmp_path / "new"


def test_a_folder_holding_the_working_directory_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "work" / "inside").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "inside")
    with pytest.raises(ImageInputError, match="work: holds the working directory, so it is not replaced"):
        with replacing(tmp_path / "work"):
            pass
    assert (tmp_path / "work" / "inside").is_dir()


def test_a_scratch_folder_is_private_removed_after_and_cleans_what_killed_processes_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f".tmp-{_dead_pid()}-0a1b-healthgpt-upload"
    stale.mkdir()
    (stale / "upload.dcm").write_bytes(b"a patient's upload")
    with scratch_folder("healthgpt-upload") as folder:
        assert folder.parent == tmp_path and folder.stat().st_mode & 0o777 == 0o700
        assert os.listdir(tmp_path) == [folder.name]  # the killed server's upload is gone
        (folder / "upload.dcm").write_bytes(b"this upload")
    assert os.listdir(tmp_path) == []


_SIGNALLED = {
    "atomic_target": "atomic_target({series!r}, directory=True)",
    "replacing": "replacing({series!r}) as target, atomic_target(target, directory=True)",
}


@pytest.mark.parametrize("writer", sorted(_SIGNALLED))
@pytest.mark.parametrize(("sent", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, -signal.SIGINT)])
def test_a_signal_during_a_write_removes_its_temporary(tmp_path: Path, sent: int, code: int, writer: str) -> None:
    """Writing a new series, or the replacement of an existing one: the signal leaves what was there before."""
    series = tmp_path / "series"
    if writer == "replacing":
        series.mkdir()
        (series / "old.dcm").write_bytes(b"the earlier series")
    before = files(tmp_path)
    script = textwrap.dedent(
        f"""
        import signal, time
        from healthgpt.io.atomic import atomic_target, replacing, terminate_on_signals
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started in the background
        with terminate_on_signals(), {_SIGNALLED[writer].format(series=str(series))} as tmp:
            (tmp / "00001.dcm").write_bytes(b"patient id inside")
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert run.stdout is not None and run.stdout.readline() == b"writing\n"
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    run.send_signal(sent)
    run.wait(timeout=60)
    assert run.returncode == code  # SIGINT: KeyboardInterrupt, which Python ends by the signal itself
    assert files(tmp_path) == before


def files(folder: Path) -> dict[Path, bytes | None]:
    """Every path under `folder` with its content (None for folders)."""
    return {p: p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_sigterm_during_a_cli_series_write_leaves_nothing(tmp_path: Path) -> None:
    """`healthgpt generate -o series` killed while the series is being written: no output, no temporary folder.
    The model is replaced by one that returns the source picture, so the test waits for the write, not the model."""
    script = textwrap.dedent(
        """
        import sys, time
        from types import SimpleNamespace
        import pydicom
        from healthgpt.cli import app, common

        class Echo:
            def generate_image(self, pictures, *args, **kwargs):
                return [SimpleNamespace(image=p) for p in pictures]

        common.ModelOptions.load = lambda self: Echo()
        save_as = pydicom.Dataset.save_as

        def slow_save(self, *args, **kwargs):
            save_as(self, *args, **kwargs)
            print("writing", flush=True)
            time.sleep(60)

        pydicom.Dataset.save_as = slow_save
        sys.argv = ["healthgpt", *sys.argv[1:]]
        app()
        """
    )
    args = [sys.executable, "-c", script, "generate", CT, "-o", "series", "--task", "ct2mri", "--no-progress"]
    run = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert run.stdout is not None and run.stdout.readline() == b"writing\n"
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 143 and b"Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []
