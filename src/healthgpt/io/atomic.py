"""Atomic writes: build beside the target, then `os.replace`, so a failure leaves nothing partial.

Temporary names carry the writer's process id (`.tmp-<pid>-<hex>-<name>`): the next write into the same folder
removes those of processes that no longer run (a run killed by SIGKILL), never those of a live writer. SIGTERM and
SIGINT unwind through the `finally` blocks (`terminate_on_signals`), which remove the temporary of a write cut short.
Every output is checked first (`check_target`, `check_folder`), so a command refuses it before any work.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from healthgpt.errors import ImageInputError

_TMP = ".tmp-"


@contextmanager
def atomic_target(path: str | Path, *, directory: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a created folder if `directory`); move it onto `path` on success.

    The temporary name ends with the target's name so suffix-driven writers (nibabel's `.nii.gz`) behave.
    A folder target must be absent or empty: rename replaces an empty folder, never a filled one (`replacing` does
    that). With `overwrite=False` an existing file target is refused too.
    """
    path = Path(path)
    check_target(path, directory=directory, overwrite=overwrite and not directory)
    _remove_stale_once(path.parent.resolve())
    tmp = _temporary(path)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        match_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Where to write a new folder `path` that may replace a filled one: `path` itself if it is absent or empty,
    else a temporary name beside it, moved onto `path` when the block succeeds. The old folder is removed only
    then, so a failed or interrupted run keeps it."""
    path = Path(path)
    check_target(path, directory=True, overwrite=True)
    if not (path.is_dir() and any(path.iterdir())):
        yield path
        return
    _remove_stale_once(path.parent.resolve())
    staged = _temporary(path)
    try:
        yield staged
    except BaseException:
        _remove(staged)
        raise
    old = _temporary(path)  # should this process die before removing it, the next write's sweep does
    os.replace(path, old)
    try:
        os.replace(staged, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


@contextmanager
def scratch_folder(name: str) -> Iterator[Path]:
    """A new private folder in the system's temporary directory, removed when the block ends; those that killed
    processes left are removed at the first use in a process (uploads hold patient data)."""
    root = Path(tempfile.gettempdir())
    _remove_stale_once(root.resolve())
    folder = _temporary(root / name)
    folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        _remove(folder)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through `atomic_target`: readers see the old file or the whole new one."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def check_target(path: Path, *, directory: bool = False, overwrite: bool = False) -> None:
    """Refuse, before any work, a target that cannot be written: a missing or read-only parent folder, a file for a
    folder target, a folder for a file target; without `overwrite`, an existing file or a filled folder (`replacing`
    replaces one, never one that holds the working directory)."""
    parent = path.parent
    if not parent.is_dir():
        raise ImageInputError(path, "the folder to write into does not exist", f"create {parent} first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ImageInputError(path, "the folder to write into is not writable", "choose a folder you can write to")
    if not path.exists():
        return
    if directory != path.is_dir():
        what, fix = ("a file, not a folder", "a folder name") if directory else ("a folder, not a file", "a file path")
        raise ImageInputError(path, f"is {what}", f"give {fix} to write")
    filled = path.is_dir() and any(path.iterdir())
    if not overwrite and (filled or not directory):
        what = "the output folder already exists and is not empty" if directory else "already exists"
        raise ImageInputError(path, what, "choose another name, or pass --overwrite to replace it")
    if filled and Path.cwd().resolve().is_relative_to(path.resolve()):
        raise ImageInputError(path, "holds the working directory, so it is not replaced", "choose another folder")


def check_folder(path: Path) -> None:
    """Refuse, before any work, a folder that cannot be created (with its parents) or added to: the first path at or
    above it that exists must be a writable folder (a cache or a run folder that resumes)."""
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == path else f"cannot be created: {existing} is a file"
        raise ImageInputError(path, what, "choose a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ImageInputError(
            path, f"cannot be written: {existing} is not writable", "choose a folder you can write to"
        )


@functools.lru_cache(maxsize=4096)
def _remove_stale_once(folder: Path) -> None:
    """`remove_stale` once per folder and process: what killed runs left is there before this process writes, and
    a folder of many outputs (a code cache) must not be listed once per file written."""
    remove_stale(folder)


def remove_stale(folder: Path) -> None:
    """Remove the temporary files and folders that processes no longer running left in `folder`."""
    try:
        entries = [p for p in folder.iterdir() if p.name.startswith(_TMP)]
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(_TMP) :].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            _remove(entry)


def _temporary(path: Path) -> Path:
    """A new temporary name beside `path`, carrying this process's id for `remove_stale`."""
    return path.parent / f"{_TMP}{os.getpid()}-{uuid.uuid4().hex}-{path.name}"


def _remove(path: Path) -> None:
    """Remove a temporary file or folder, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def match_umask(path: Path) -> None:
    """Give `path` (every file under it, for a folder) the mode the umask asks for: safetensors and `tempfile`
    create files with mode 0600 whatever the umask."""
    mode = _file_mode()
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]:
        os.chmod(file, mode)


def _file_mode() -> int:
    """0o666 without the umask's bits. Linux reports the umask in /proc; elsewhere it is read by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class Terminated(SystemExit):
    """SIGTERM, turned into an exception so that `finally` blocks remove temporary outputs."""


@contextmanager
def terminate_on_signals() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` (exit 143) as SIGINT raises KeyboardInterrupt, so an interrupted
    write removes its temporary; the previous handler is restored on exit. Only the main thread can set handlers."""

    def raise_terminated(signum: int, frame: FrameType | None) -> None:
        raise Terminated(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
