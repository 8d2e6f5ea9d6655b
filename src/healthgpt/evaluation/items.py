"""The unit every benchmark loader yields and every predictor answers: one question about some images."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from healthgpt.io import load_image

VQA_RAD, SLAKE, PATHVQA, OMNIMEDVQA, MMMU_MED = "vqa-rad", "slake", "pathvqa", "omnimedvqa", "mmmu-med"
Kind = Literal["closed", "open", "mcq"]
KINDS: tuple[str, ...] = ("closed", "open", "mcq")
# A path on disk, encoded bytes (parquet rows carry PNG/JPEG bytes) or an already opened image.
ImageSource = Path | bytes | Image.Image


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question; `kind` is how the dataset itself marks it, `prompt` is filled by the runner."""

    id: str
    dataset: str
    images: tuple[ImageSource, ...]
    question: str
    answer: str
    kind: Kind
    options: tuple[str, ...] = ()  # option texts in letter order (A, B, ...) for "mcq"
    modality: str = ""
    question_type: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    prompt: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"item {self.id}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "mcq" and self.answer not in self.options:
            raise ValueError(f"item {self.id}: the answer of a multiple-choice item must be one of its options")

    @property
    def answer_letter(self) -> str | None:
        """The letter of the correct option of an MCQ item (the option whose text is the answer)."""
        if self.kind != "mcq":
            return None
        return option_letters(len(self.options))[self.options.index(self.answer)]

    def load_images(self) -> list[Image.Image]:
        """Open every image of the item (fully read, file handles closed), as stored."""
        return [_open(src) for src in self.images]


def option_letters(n: int) -> str:
    """The letters naming `n` options: A, B, C, ..."""
    if not 0 < n <= 26:
        raise ValueError(f"cannot letter {n} options")
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def _open(src: ImageSource) -> Image.Image:
    """An image as the model sees it at inference; files go through `load_image` (DICOM, NIfTI, 16-bit grey)."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, bytes):  # encoded PNG/JPEG bytes of a Hub dataset row
        with Image.open(io.BytesIO(src)) as im:
            im.load()
            return im.copy()
    return load_image(src).to_pil()


# Callable[[list[EvalItem]], list[str]]: a batch of items (with `prompt` set) to one answer per item.
Predictor = Callable[[list[EvalItem]], list[str]]
