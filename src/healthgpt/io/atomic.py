"""Atomic writes: build beside the target, then `os.replace`, so a failure leaves nothing partial."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from healthgpt.errors import ImageInputError


@contextmanager
def atomic_target(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a created folder if `directory`); move it onto `path` on success.

    The temporary name ends with the target's name so suffix-driven writers (nibabel's `.nii.gz`) behave.
    A folder target must be absent or empty: rename replaces an empty folder, never a filled one.
    """
    path = Path(path)
    _check_target(path, directory)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}-{path.name}"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _check_target(path: Path, directory: bool) -> None:
    if not path.parent.is_dir():
        raise ImageInputError(path, "the folder to write into does not exist", f"create {path.parent} first")
    if directory and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ImageInputError(
            path,
            "the output folder already exists and is not empty",
            "choose a new folder name or remove the old one",
        )
    if not directory and path.is_dir():
        raise ImageInputError(path, "is a folder, not a file name", "give a file path to write")
