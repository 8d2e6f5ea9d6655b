"""The phantom world: synthetic CT/MRI head slices with labelled lesions, for training and testing end to end.

Each case is the Shepp-Logan phantom (scikit-image) slightly rotated, scaled, shifted and re-contrasted,
with 0..3 disc lesions placed inside the skull. CT and MRI are different, non-affine mappings of the same
tissue classes (bone bright on CT and dark on MRI, CSF dark on CT and bright on MRI, lesions dark-ish on CT
and bright on MRI), so CT<->MRI conversion is a real mapping to learn. Everything is deterministic given
the generator.

Modules: `world` draws and renders cases, `text` words their questions, instructions, captions and reports,
`dataset` turns them into LLaVA-style records and files, `lesions` measures whether a generated image keeps a case's
lesions and invents none; `chest` is a second family, frontal chest films with cardiomegaly and pleural effusions,
their reports and a reader of those findings, for the report-to-image task.

Conventions:
- "left"/"right" are sides of the image *as displayed*: "left" means the lesion centre lies in the left
  half (column < (size - 1) / 2). This is not the patient's side (radiology displays the patient's right
  on the left). Lesions never cross the midline, so a side is unambiguous; "both" means both halves.
- Counts are answered with words: "zero", "one", "two", "three".
- Lesion sizes in reports assume a field of view of `FOV_MM` millimetres across the image.
"""

from .chest import ChestCase, ChestReading, chest_report, read_chest, sample_chest
from .dataset import SPLITS, iter_records, make_dataset
from .lesions import LesionCheck, check_lesions, lesion_contrast, lesion_rates
from .text import (
    COMPREHENSION_TASKS,
    GENERATION_TASKS,
    PHANTOM_TASKS,
    QA,
    GenerationPair,
    caption,
    generation_pairs,
    phantom_corpus,
    report,
    vqa_pairs,
)
from .world import (
    COUNT_WORDS,
    FOV_MM,
    IMAGE_KEYS,
    LOW_RES_FACTOR,
    MAX_SIZE,
    MIN_SIZE,
    MODALITIES,
    ImageKey,
    Lesion,
    Modality,
    PhantomCase,
    degrade,
    place_lesions,
    sample_case,
)

__all__ = [
    "COMPREHENSION_TASKS",
    "COUNT_WORDS",
    "FOV_MM",
    "GENERATION_TASKS",
    "IMAGE_KEYS",
    "LOW_RES_FACTOR",
    "MAX_SIZE",
    "MIN_SIZE",
    "MODALITIES",
    "PHANTOM_TASKS",
    "QA",
    "SPLITS",
    "ChestCase",
    "ChestReading",
    "GenerationPair",
    "ImageKey",
    "Lesion",
    "LesionCheck",
    "Modality",
    "PhantomCase",
    "caption",
    "check_lesions",
    "chest_report",
    "degrade",
    "generation_pairs",
    "iter_records",
    "lesion_contrast",
    "lesion_rates",
    "make_dataset",
    "phantom_corpus",
    "place_lesions",
    "read_chest",
    "report",
    "sample_case",
    "sample_chest",
    "vqa_pairs",
]
