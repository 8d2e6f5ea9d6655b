"""The phantom world: synthetic CT/MRI head slices with labelled lesions, for training and testing end to end.

Each case is the Shepp-Logan phantom (scikit-image) slightly rotated, scaled, shifted and re-contrasted,
with 0..3 disc lesions placed inside the skull. CT and MRI are different, non-affine mappings of the same
tissue classes (bone bright on CT and dark on MRI, CSF dark on CT and bright on MRI, lesions dark-ish on CT
and bright on MRI), so CT<->MRI conversion is a real mapping to learn. Everything is deterministic given
the generator.

Conventions:
- "left"/"right" are sides of the image *as displayed*: "left" means the lesion centre lies in the left
  half (column < (size - 1) / 2). This is not the patient's side (radiology displays the patient's right
  on the left). Lesions never cross the midline, so a side is unambiguous; "both" means both halves.
- Counts are answered with words: "zero", "one", "two", "three".
- Lesion sizes in reports assume a field of view of `FOV_MM` millimetres across the image.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.data import shepp_logan_phantom
from skimage.transform import resize
from tqdm.auto import tqdm

from healthgpt.config import COMPREHENSION, GENERATION
from healthgpt.io.atomic import write_atomic

Modality = Literal["CT", "MRI"]
ImageKey = Literal["ct", "mri", "ct_low_res", "mri_low_res"]

MODALITIES: tuple[Modality, ...] = ("CT", "MRI")
IMAGE_KEYS: tuple[ImageKey, ...] = ("ct", "mri", "ct_low_res", "mri_low_res")
COMPREHENSION_TASKS = ("presence", "side", "count")
GENERATION_TASKS = ("reconstruct", "ct2mri", "mri2ct", "super_resolution", "report2image")
# The phantom data set's question and image kinds (not the generation tasks of healthgpt.tasks).
PHANTOM_TASKS = COMPREHENSION_TASKS + GENERATION_TASKS
SPLITS = ("train", "test")
COUNT_WORDS = ("zero", "one", "two", "three")
MIN_SIZE, MAX_SIZE = 32, 512
LOW_RES_FACTOR = 4
FOV_MM = 220.0

# Tissue classes, in the order of the fraction maps. Background and CSF are both 0.0 in Shepp-Logan; they are
# told apart by connectivity to the image border.
_SL_VALUES = {"bone": 1.0, "parenchyma": 0.2, "dense": 0.3, "faint_spots": 0.1, "bright_spots": 0.4}
_TISSUES = ("background", "bone", "parenchyma", "csf", "dense", "faint_spots", "bright_spots")
_LEVELS: dict[str, np.ndarray] = {
    "CT": np.array([0.0, 1.0, 0.45, 0.28, 0.6, 0.36, 0.75]),
    "MRI": np.array([0.0, 0.08, 0.42, 0.78, 0.25, 0.6, 0.15]),  # T2-like: tissue order changes
}
_LESION_LEVEL = {"CT": 0.1, "MRI": 1.0}
_CT_NOISE, _MRI_NOISE = 0.01, 0.02

_PRESENCE_QUESTIONS = (
    "Is there a lesion in this {m} image?",
    "Does this {m} scan show a lesion?",
    "Can you see any lesion in this {m} image?",
    "Is a lesion visible on this {m} scan?",
)
_SIDE_QUESTIONS = (
    "Which side is the lesion on in this {m} image?",
    "On which side of this {m} image is the lesion?",
    "In this {m} scan, is the lesion on the left or the right?",
)
_COUNT_QUESTIONS = (
    "How many lesions are there in this {m} image?",
    "How many lesions does this {m} scan show?",
    "Count the lesions in this {m} image.",
)
_QUESTIONS = {"presence": _PRESENCE_QUESTIONS, "side": _SIDE_QUESTIONS, "count": _COUNT_QUESTIONS}
# Instructions and replies follow the paper's examples (REFERENCE §3.4); `{m}` modality, `{report}` findings.
_INSTRUCTIONS = {
    "reconstruct": (
        "Reconstruct the image.",
        "Reconstruct the following medical images.",
        "Please reconstruct this {m} image.",
    ),
    "ct2mri": (
        "I need a version of this CT representation in MRI.",
        "Transform the CT display into an MRI image.",
        "Convert this CT image into an MRI image.",
    ),
    "mri2ct": (
        "Transform the MRI display into a CT image.",
        "I need a version of this MRI representation in CT.",
        "Convert this MRI image into a CT image.",
    ),
    "super_resolution": (
        "Could you improve the quality of this {m} image?",
        "Please increase the resolution of this {m} image.",
        "Enhance the resolution of this {m} scan.",
    ),
    "report2image": (
        "Generate a {m} image from this report: {report}",
        "{report} Please create the matching {m} image.",
        "Create a {m} image that shows: {report}",
    ),
}
_REPLIES = {
    "reconstruct": "Here is the reconstructed medical image you need.",
    "ct2mri": "The image has been transformed into MRI.",
    "mri2ct": "Here is the CT version of the MRI image.",
    "super_resolution": "Here is the image with improved resolution.",
    "report2image": "Here is the {m} image for you.",
}


@dataclass(frozen=True)
class Lesion:
    """A disc lesion in pixel coordinates of the rendered image (x = column, y = row)."""

    x: float
    y: float
    radius: float
    intensity: float  # blending strength in (0, 1]: how far the disc moves towards the lesion level
    side: Literal["left", "right"]


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic subject: geometry, contrast and lesions; images are rendered lazily and cached."""

    size: int
    lesions: tuple[Lesion, ...]
    angle: float  # degrees
    scale: float
    shift: tuple[float, float]  # (rows, columns) in pixels
    gain: float
    bias: tuple[float, float]  # MRI intensity inhomogeneity slopes along (rows, columns)
    noise_seed: int

    @property
    def has_lesion(self) -> bool:
        return bool(self.lesions)

    @property
    def count(self) -> int:
        return len(self.lesions)

    @property
    def side(self) -> Literal["none", "left", "right", "both"]:
        sides = {lesion.side for lesion in self.lesions}
        return "none" if not sides else "both" if len(sides) == 2 else sides.pop()

    @cached_property
    def _fractions(self) -> np.ndarray:
        return _warp(_tissue_fractions(self.size), self.angle, self.scale, self.shift)

    def render(self, modality: Modality, *, lesions: bool = True) -> np.ndarray:
        """Render as uint8 (size, size); `lesions=False` gives the same case, same noise, without lesions."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        img = np.tensordot(_LEVELS[modality], self._fractions, axes=1)
        if lesions and self.lesions:
            alpha = _lesion_alpha(self.lesions, self.size)
            img = img * (1.0 - alpha) + alpha * _LESION_LEVEL[modality]
        noise = np.random.default_rng([self.noise_seed, MODALITIES.index(modality)])
        if modality == "CT":
            img = img * self.gain + noise.normal(0.0, _CT_NOISE, img.shape)
        else:
            rows, cols = np.mgrid[-1 : 1 : self.size * 1j, -1 : 1 : self.size * 1j]
            img = img * self.gain * (1.0 + self.bias[0] * rows + self.bias[1] * cols)
            real, imag = noise.normal(0.0, _MRI_NOISE, (2, *img.shape))
            img = np.hypot(img + real, imag)  # magnitude image: Rician noise
        return _to_uint8(img)

    @cached_property
    def ct(self) -> np.ndarray:
        return _frozen(self.render("CT"))

    @cached_property
    def mri(self) -> np.ndarray:
        return _frozen(self.render("MRI"))

    @cached_property
    def ct_low_res(self) -> np.ndarray:
        return _frozen(degrade(self.ct))

    @cached_property
    def mri_low_res(self) -> np.ndarray:
        return _frozen(degrade(self.mri))

    def image(self, key: ImageKey) -> np.ndarray:
        """The cached uint8 image named by `key` ("ct", "mri", "ct_low_res", "mri_low_res")."""
        if key not in IMAGE_KEYS:
            raise ValueError(f"image key must be one of {IMAGE_KEYS}, got {key!r}")
        return getattr(self, key)

    def rgb(self, key: ImageKey = "ct") -> Image.Image:
        """The image as an RGB PIL image (what vision towers expect)."""
        return Image.fromarray(self.image(key)).convert("RGB")


@dataclass(frozen=True)
class QA:
    """One closed comprehension question about a case."""

    kind: str
    modality: Modality
    question: str
    answer: str


@dataclass(frozen=True)
class GenerationPair:
    """One image-generation instruction: `source` image (None for text-only) -> `target` image."""

    kind: str
    instruction: str
    reply: str
    source: ImageKey | None
    target: ImageKey


def degrade(image: np.ndarray, factor: int = LOW_RES_FACTOR) -> np.ndarray:
    """Downsample by `factor` (anti-aliased) and upsample back bicubically: the super-resolution input."""
    small_shape = tuple(max(1, n // factor) for n in image.shape)
    small = resize(image / 255.0, small_shape, order=1, anti_aliasing=True)
    return _to_uint8(resize(small, image.shape, order=3, mode="symmetric"))


def sample_case(rng: np.random.Generator, size: int = 64, p_lesion: float = 0.5, max_lesions: int = 3) -> PhantomCase:
    """Draw a case: small random pose and contrast, and with probability `p_lesion` 1..max_lesions lesions."""
    if not (isinstance(size, int) and MIN_SIZE <= size <= MAX_SIZE):
        raise ValueError(f"size must be an int in {MIN_SIZE}..{MAX_SIZE}, got {size!r}")
    if not 0.0 <= p_lesion <= 1.0:
        raise ValueError(f"p_lesion must be in [0, 1], got {p_lesion}")
    if not 1 <= max_lesions < len(COUNT_WORDS):
        raise ValueError(f"max_lesions must be in 1..{len(COUNT_WORDS) - 1}, got {max_lesions}")
    angle = float(rng.uniform(-5.0, 5.0))
    scale = float(rng.uniform(0.9, 1.0))  # the skull keeps a margin from the border at the largest shift
    shift = (float(rng.uniform(-0.02, 0.02) * size), float(rng.uniform(-0.02, 0.02) * size))
    gain = float(rng.uniform(0.94, 1.06))
    bias = (float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.12, 0.12)))
    noise_seed = int(rng.integers(2**63))
    count = int(rng.integers(1, max_lesions + 1)) if rng.random() < p_lesion else 0
    fractions = _warp(_tissue_fractions(size), angle, scale, shift)
    lesions = _place_lesions(rng, fractions, count)
    return PhantomCase(size, lesions, angle, scale, shift, gain, bias, noise_seed)


def vqa_pairs(
    case: PhantomCase,
    rng: np.random.Generator,
    modality: Modality,
    kinds: Iterable[str] = COMPREHENSION_TASKS,
) -> list[QA]:
    """Closed questions about `case` seen in `modality`; "side" is asked only when there is a lesion."""
    kinds = _check_kinds(kinds, COMPREHENSION_TASKS)
    presence = "yes" if case.has_lesion else "no"
    answers = {"presence": presence, "side": case.side, "count": COUNT_WORDS[case.count]}
    return [
        QA(kind, modality, _pick(rng, _QUESTIONS[kind]).format(m=modality), answers[kind])
        for kind in kinds
        if kind != "side" or case.has_lesion
    ]


def generation_pairs(
    case: PhantomCase, rng: np.random.Generator, kinds: Iterable[str] = GENERATION_TASKS
) -> list[GenerationPair]:
    """One instruction per generation kind; the modality of reconstruct/super-resolution/report is drawn."""
    pairs = []
    for kind in _check_kinds(kinds, GENERATION_TASKS):
        fixed: dict[str, Modality] = {"ct2mri": "CT", "mri2ct": "MRI"}
        modality: Modality = fixed[kind] if kind in fixed else _pick(rng, MODALITIES)
        key: ImageKey = "ct" if modality == "CT" else "mri"
        source, target = {
            "reconstruct": (key, key),
            "ct2mri": ("ct", "mri"),
            "mri2ct": ("mri", "ct"),
            "super_resolution": (f"{key}_low_res", key),
            "report2image": (None, key),
        }[kind]
        instruction = _pick(rng, _INSTRUCTIONS[kind]).format(m=modality, report=report(case))
        pairs.append(GenerationPair(kind, instruction, _REPLIES[kind].format(m=modality), source, target))
    return pairs


def caption(case: PhantomCase, modality: Modality) -> str:
    """A one-sentence description for contrastive (CLIP-style) pre-training."""
    if not case.has_lesion:
        return f"{modality} image with no lesion."
    noun = "lesion" if case.count == 1 else "lesions"
    where = "on both sides" if case.side == "both" else f"on the {case.side} side"
    return f"{modality} image with {COUNT_WORDS[case.count]} {noun} {where}."


def report(case: PhantomCase) -> str:
    """Findings, one sentence per lesion from left to right ("A 23 mm lesion is seen on the left side.")."""
    if not case.has_lesion:
        return "No lesion is seen."
    return " ".join(
        f"A {round(2 * lesion.radius / case.size * FOV_MM)} mm lesion is seen on the {lesion.side} side."
        for lesion in sorted(case.lesions, key=lambda lesion: lesion.x)
    )


def phantom_corpus(rng: np.random.Generator, n: int) -> list[str]:
    """`n` sentences of the phantom world (question + answer, captions, reports, instructions + replies)."""
    sentences: list[str] = []
    while len(sentences) < n:
        case = sample_case(rng)  # labels only: no pixels are rendered
        sentences += [caption(case, m) for m in MODALITIES] + [report(case)]
        sentences += [f"{qa.question} {qa.answer}" for m in MODALITIES for qa in vqa_pairs(case, rng, m)]
        sentences += [f"{pair.instruction} {pair.reply}" for pair in generation_pairs(case, rng)]
    return [sentences[i] for i in rng.permutation(len(sentences))[:n]]


def iter_records(
    n_cases: int,
    seed: int,
    size: int = 64,
    tasks: Sequence[str] = PHANTOM_TASKS,
    split: str = "train",
    p_lesion: float = 0.5,
) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """The records `make_dataset` writes for `split`, in memory: (record, {relative path: uint8 image})."""
    for case_id, case, rng in _split_cases(n_cases, seed, size, split, p_lesion):
        yield from _case_records(case_id, case, rng, tasks)


def make_dataset(
    out_dir: str | os.PathLike[str],
    n_cases: int,
    seed: int,
    size: int = 64,
    tasks: Sequence[str] = PHANTOM_TASKS,
    test_fraction: float = 0.2,
    p_lesion: float = 0.5,
) -> dict[str, list[dict[str, Any]]]:
    """Write `images/*.png` and LLaVA-style `train.json`/`test.json` under `out_dir`; return records by split.

    Case i of a split depends only on (seed, split, i): changing `n_cases` does not reshuffle earlier cases.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_test = round(n_cases * test_fraction)
    records: dict[str, list[dict[str, Any]]] = {}
    for split, n in zip(SPLITS, (n_cases - n_test, n_test), strict=True):
        records[split] = []
        written: set[str] = set()
        cases = _split_cases(n, seed, size, split, p_lesion)
        for case_id, case, rng in tqdm(cases, total=n, desc=f"phantoms/{split}", disable=n < 500):
            for record, images in _case_records(case_id, case, rng, tasks):
                records[split].append(record)
                for rel_path, pixels in images.items():
                    if rel_path not in written:
                        write_atomic(out / rel_path, _png_bytes(pixels))
                        written.add(rel_path)
        write_atomic(out / f"{split}.json", json.dumps(records[split], indent=1).encode())
    return records


def _split_cases(
    n_cases: int, seed: int, size: int, split: str, p_lesion: float
) -> Iterator[tuple[str, PhantomCase, np.random.Generator]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for i in range(n_cases):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        yield f"{split}_{i:06d}", sample_case(rng, size, p_lesion), rng


def _case_records(
    case_id: str, case: PhantomCase, rng: np.random.Generator, tasks: Sequence[str]
) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    _check_kinds(tasks, PHANTOM_TASKS)
    labels = {
        "case": case_id,
        "size": case.size,
        "has_lesion": case.has_lesion,
        "count": case.count,
        "side": case.side,
        "lesions": [
            {"x": lesion.x, "y": lesion.y, "radius": round(lesion.radius, 3), "side": lesion.side}
            for lesion in case.lesions
        ],
    }
    out = []
    comprehension = [t for t in tasks if t in COMPREHENSION_TASKS]
    for modality in MODALITIES:
        key: ImageKey = "ct" if modality == "CT" else "mri"
        path = f"images/{case_id}_{key}.png"
        for qa in vqa_pairs(case, rng, modality, comprehension):
            record = {
                "id": f"{case_id}_{qa.kind}_{key}",
                "image": path,
                "task": COMPREHENSION,
                "conversations": _turns(qa.question, qa.answer, with_image=True),
                "meta": {"kind": qa.kind, "modality": modality, **labels},
            }
            out.append((record, {path: case.image(key)}))
    for pair in generation_pairs(case, rng, [t for t in tasks if t in GENERATION_TASKS]):
        target = f"images/{case_id}_{pair.target}.png"
        record: dict[str, Any] = {"id": f"{case_id}_{pair.kind}"}
        images = {target: case.image(pair.target)}
        if pair.source is not None:
            record["image"] = f"images/{case_id}_{pair.source}.png"
            images[record["image"]] = case.image(pair.source)
        record |= {
            "task": GENERATION,
            "conversations": _turns(pair.instruction, pair.reply, with_image=pair.source is not None),
            "target_image": target,
            "meta": {"kind": pair.kind, "source": pair.source, "target": pair.target, **labels},
        }
        out.append((record, images))
    return out


def _turns(prompt: str, answer: str, with_image: bool) -> list[dict[str, str]]:
    return [
        {"from": "human", "value": f"<image>\n{prompt}" if with_image else prompt},
        {"from": "gpt", "value": answer},
    ]


@functools.cache
def _phantom_labels() -> np.ndarray:
    """Tissue class index per pixel of the 400x400 Shepp-Logan phantom (computed once per process)."""
    values = np.round(shepp_logan_phantom(), 1)
    labels = np.full(values.shape, _TISSUES.index("csf"), dtype=np.int8)
    for name, value in _SL_VALUES.items():
        labels[values == value] = _TISSUES.index(name)
    zero_regions, _ = ndimage.label(values == 0.0)
    labels[zero_regions == zero_regions[0, 0]] = _TISSUES.index("background")
    return labels


@functools.cache
def _tissue_fractions(size: int) -> np.ndarray:
    """(classes, size, size) anti-aliased tissue fractions of the canonical phantom at `size` (read-only)."""
    onehot = (_phantom_labels()[..., None] == np.arange(len(_TISSUES))).astype(np.float64)
    fractions = resize(onehot, (size, size, len(_TISSUES)), order=1, anti_aliasing=True)
    fractions /= fractions.sum(axis=-1, keepdims=True)
    return _frozen(np.ascontiguousarray(fractions.transpose(2, 0, 1)))


def _warp(fractions: np.ndarray, angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """Rotate by `angle` degrees and scale about the centre, then shift; outside the phantom is background."""
    size = fractions.shape[-1]
    centre = np.full(2, (size - 1) / 2)
    cos, sin = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    matrix = np.array([[cos, sin], [-sin, cos]]) / scale  # inverse map: output (row, col) -> input (row, col)
    offset = centre - matrix @ (centre + np.asarray(shift))
    return np.stack(
        [
            ndimage.affine_transform(f, matrix, offset, order=1, mode="constant", cval=float(k == 0))
            for k, f in enumerate(fractions)
        ]
    )


def _place_lesions(rng: np.random.Generator, fractions: np.ndarray, count: int) -> tuple[Lesion, ...]:
    """Place `count` non-overlapping discs fully inside the skull, each wholly on one side of the midline."""
    size = fractions.shape[-1]
    depth = ndimage.distance_transform_edt(fractions[_TISSUES.index("parenchyma") :].sum(axis=0) > 0.99)
    rows, cols = np.indices(depth.shape)
    midline = (size - 1) / 2
    gap = 1.0 + max(1.0, 0.05 * size)  # between disc edges, so that lesions stay countable blobs
    lesions: list[Lesion] = []
    for _ in range(count):
        radius = max(1.5, float(rng.uniform(0.04, 0.08)) * size)
        while True:  # shrink the disc until it fits (only needed at small sizes)
            free = (depth >= radius + 1.0) & (np.abs(cols - midline) >= radius + 0.5)
            for other in lesions:
                free &= np.hypot(rows - other.y, cols - other.x) >= radius + other.radius + gap
            candidates = np.flatnonzero(free)
            if candidates.size or radius <= 1.0:
                break
            radius = max(1.0, 0.8 * radius)
        if candidates.size == 0:
            raise RuntimeError(f"no room for lesion {len(lesions) + 1} of {count} at size {size}")
        y, x = divmod(int(candidates[rng.integers(candidates.size)]), size)
        side: Literal["left", "right"] = "left" if x < midline else "right"
        lesions.append(Lesion(float(x), float(y), radius, float(rng.uniform(0.7, 1.0)), side))
    return tuple(lesions)


def _lesion_alpha(lesions: Sequence[Lesion], size: int) -> np.ndarray:
    """Per-pixel blend weight towards the lesion level: anti-aliased discs scaled by their intensity."""
    rows, cols = np.indices((size, size))
    alpha = np.zeros((size, size))
    for lesion in lesions:
        disc = np.clip(lesion.radius + 0.5 - np.hypot(rows - lesion.y, cols - lesion.x), 0.0, 1.0)
        alpha = np.maximum(alpha, disc * lesion.intensity)
    return alpha


def _check_kinds(kinds: Iterable[str], allowed: Sequence[str]) -> list[str]:
    kinds = list(kinds)
    unknown = sorted(set(kinds) - set(allowed))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected some of {list(allowed)}")
    return kinds


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
