"""What the CLI tests share: running the installed `healthgpt` command, the files under a folder, a folder of broken
inputs, and the JSONL rows a command wrote."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

CT = Path(get_testdata_file("CT_small.dcm"))
SCRIPT = shutil.which("healthgpt")
ENTRY = [SCRIPT] if SCRIPT else [sys.executable, "-m", "healthgpt.cli"]
ENV = {**os.environ, "PYTHONUTF8": "1", "COLUMNS": "200", "TQDM_DISABLE": "1"}


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


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bad_files(tmp_path: Path) -> Path:
    """A folder of broken inputs, each named for what is wrong with it."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("L", (64, 64), 3).save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:-30])
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)  # 1.6 billion pixels, a few bytes on disk
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b""))
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
    shutil.copy(tmp_path / "good.png", tmp_path / "shown" / "panel.png")
    return tmp_path


def read_rows(path: Path) -> list[dict]:
    """The JSON rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
