"""Shared pieces of the pre-training loops: seeded batch order, learning-rate schedule, image sources."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from healthgpt.io import load_image

# Files a folder source reads (through `healthgpt.io.load_image`, so DICOM and NIfTI slices work too).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz")

ImageSource = Iterable[Image.Image] | str | os.PathLike[str]


def image_items(source: ImageSource) -> list[Image.Image | Path]:
    """PIL images as given, or the image files under a folder (recursive, sorted) to be read when used."""
    if isinstance(source, str | os.PathLike):
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder; give a folder of images or a list of PIL images")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return list(files)
    items = list(source)
    if not items:
        raise ValueError("no images given")
    return items


def as_pil(item: Image.Image | Path) -> Image.Image:
    """The image itself, or the file read as 8-bit RGB with its own (or the modality's default) window."""
    return item if isinstance(item, Image.Image) else load_image(item).to_pil()


def batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` batches of indices into `n` items: epochs of seeded permutations, the last batch of an epoch
    topped up from the next one so every batch has `min(batch_size, n)` items."""
    size = min(batch_size, n)
    pending = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(pending) < size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:size]
        pending = pending[size:]


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay to 10% at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    params: Sequence[torch.nn.Parameter], lr: float, steps: int, weight_decay: float = 0.0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a warm-up (5% of the steps) and cosine schedule."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup))
