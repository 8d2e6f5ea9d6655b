"""The words of the phantom world: closed questions, generation instructions, captions and reports of a case."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .world import COUNT_WORDS, FOV_MM, MODALITIES, ImageKey, Modality, PhantomCase, sample_case

COMPREHENSION_TASKS = ("presence", "side", "count")
GENERATION_TASKS = ("reconstruct", "ct2mri", "mri2ct", "super_resolution", "report2image")
# The phantom data set's question and image kinds (not the generation tasks of healthgpt.tasks).
PHANTOM_TASKS = COMPREHENSION_TASKS + GENERATION_TASKS
FINDINGS_TASK = "findings"  # opt-in open question: the report of an image (`findings_qa`)

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
_FINDINGS_QUESTIONS = (
    "Describe the findings in this {m} image.",
    "Write a short report of this {m} scan.",
    "What are the findings in this {m} image?",
)
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
class QA:
    """One comprehension question about a case: a closed one, or the open "findings"."""

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


def vqa_pairs(
    case: PhantomCase,
    rng: np.random.Generator,
    modality: Modality,
    kinds: Iterable[str] = COMPREHENSION_TASKS,
) -> list[QA]:
    """Closed questions about `case` seen in `modality`; "side" is asked only when there is a lesion."""
    kinds = check_kinds(kinds, COMPREHENSION_TASKS)
    presence = "yes" if case.has_lesion else "no"
    answers = {"presence": presence, "side": case.side, "count": COUNT_WORDS[case.count]}
    return [
        QA(kind, modality, _pick(rng, _QUESTIONS[kind]).format(m=modality), answers[kind])
        for kind in kinds
        if kind != "side" or case.has_lesion
    ]


def findings_qa(case: PhantomCase, rng: np.random.Generator, modality: Modality) -> QA:
    """The open question "describe the findings" about `case` seen in `modality`, answered by its `report`."""
    return QA(FINDINGS_TASK, modality, _pick(rng, _FINDINGS_QUESTIONS).format(m=modality), report(case))


def generation_pairs(
    case: PhantomCase, rng: np.random.Generator, kinds: Iterable[str] = GENERATION_TASKS
) -> list[GenerationPair]:
    """One instruction per generation kind; the modality of reconstruct/super-resolution/report is drawn."""
    pairs = []
    for kind in check_kinds(kinds, GENERATION_TASKS):
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


def check_kinds(kinds: Iterable[str], allowed: Sequence[str]) -> list[str]:
    """`kinds` as a list; a clear error naming any kind not in `allowed`."""
    kinds = list(kinds)
    unknown = sorted(set(kinds) - set(allowed))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected some of {list(allowed)}")
    return kinds


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]
