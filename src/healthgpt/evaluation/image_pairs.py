"""Generation benchmarks (paper Tables 2, 3, 11): paired output/target folders scored by SSIM/PSNR/MSE/LPIPS.

Files pair by stem. An output may be an image or a file of VQ codes (`.npy`, or `.txt` of integers) that the
caller's `decode` turns into an image. Per-image metrics come from `healthgpt.metrics.image_metrics` and are
averaged over pairs, as the tables report them (SSIM and LPIPS x100, PSNR in dB, MSE on the 0-255 scale).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CODE_SUFFIXES = (".npy", ".txt")
Decoder = Callable[[np.ndarray], "np.ndarray | Image.Image"]
LpipsFn = Callable[[np.ndarray, np.ndarray], float]


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes:
            if p.stem in found:
                raise ValueError(f"{folder}: two files share the stem {p.stem!r}")
            found[p.stem] = p
    return found


def _as_array(image: np.ndarray | Image.Image, mode: str) -> np.ndarray:
    """`image` in PIL `mode` ("L" or "RGB") as a float64 array on the 0-255 scale."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return np.asarray(image.convert(mode), dtype=np.float64)


def _load_output(path: Path, mode: str, decode: Decoder | None) -> np.ndarray:
    if path.suffix.lower() in CODE_SUFFIXES:
        if decode is None:
            raise ValueError(f"{path} holds VQ codes: pass `decode` to turn codes into an image")
        codes = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else _read_codes(path)
        return _as_array(decode(codes), mode)
    with Image.open(path) as im:
        return _as_array(im, mode)


def _read_codes(path: Path) -> np.ndarray:
    return np.array(path.read_text().replace(",", " ").split(), dtype=np.int64)


def score_image_pairs(
    output_dir: str | Path,
    target_dir: str | Path,
    *,
    decode: Decoder | None = None,
    mode: str = "L",
    data_range: float = 255.0,
    lpips: LpipsFn | None = None,
) -> dict[str, Any]:
    """Mean metrics over every target image and the output of the same stem (or over one output file and one target
    file); a missing output raises."""
    from healthgpt.metrics import image_metrics  # a sibling module; imported when used

    output_dir, target_dir = Path(output_dir), Path(target_dir)
    if output_dir.is_file() or target_dir.is_file():
        if not (output_dir.is_file() and target_dir.is_file()):
            raise ValueError(f"{output_dir}, {target_dir}: give two folders or two files, not one of each")
        outputs, targets = {target_dir.stem: output_dir}, {target_dir.stem: target_dir}
    else:
        outputs = _files(output_dir, IMAGE_SUFFIXES + CODE_SUFFIXES)
        targets = _files(target_dir, IMAGE_SUFFIXES)
    if not targets:
        raise FileNotFoundError(f"no target images in {target_dir}")
    missing = sorted(set(targets) - set(outputs))
    if missing:
        raise FileNotFoundError(f"{len(missing)} targets have no output in {output_dir}, e.g. {missing[:3]}")
    per_image: dict[str, dict[str, float]] = {}
    for stem, target_path in targets.items():
        with Image.open(target_path) as im:
            target = _as_array(im, mode)
        output = _load_output(outputs[stem], mode, decode)
        if output.shape != target.shape:
            raise ValueError(f"{stem}: output shape {output.shape} != target shape {target.shape}")
        scores = {k: float(v) for k, v in image_metrics(output, target, data_range=data_range, percent=True).items()}
        if lpips is not None:
            scores["lpips"] = 100.0 * float(lpips(output, target))
        per_image[stem] = scores
    keys = list(next(iter(per_image.values())))
    means = {k: float(np.mean([s[k] for s in per_image.values()])) for k in keys}
    return {
        "n": len(per_image),
        **means,
        "unpaired_outputs": len(set(outputs) - set(targets)),
        "per_image": per_image,
    }


def generation_table(
    results: Mapping[str, Mapping[str, Any]], keys: tuple[str, ...] = ("ssim", "psnr", "mse", "lpips")
) -> str:
    """Markdown, one row per task (e.g. "CT→MRI brain"), two decimals as the paper; absent metrics as "–"."""
    shown = [k for k in keys if any(k in r for r in results.values())]
    lines = ["| task | n | " + " | ".join(k.upper() for k in shown) + " |", "|" + "---|" * (len(shown) + 2)]
    for task, r in results.items():
        cells = [f"{r[k]:.2f}" if k in r else "–" for k in shown]
        lines.append(f"| {task} | {r.get('n', '–')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
