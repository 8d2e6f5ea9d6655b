"""The phantom data set: LLaVA-style records of each case, in memory or written as PNGs and JSON by split."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from healthgpt.config import COMPREHENSION, GENERATION
from healthgpt.io.atomic import write_atomic

from .chest import chest_report, sample_chest
from .text import (
    COMPREHENSION_TASKS,
    FINDINGS_TASK,
    GENERATION_TASKS,
    PHANTOM_TASKS,
    QA,
    check_kinds,
    findings_qa,
    generation_pairs,
    vqa_pairs,
)
from .world import MODALITIES, ImageKey, PhantomCase, sample_case

SPLITS = ("train", "test")
CHEST_TASK = "report_to_cxr"  # opt-in kind: a chest film from its report (the published task's name and phrasing)
CHEST_REPLY = "Here is the chest X-ray for you."
_CHEST_STREAM = 0x4358  # "CX": each case's chest film draws from its own stream, so other records are unchanged
# FINDINGS_TASK (opt-in) asks for each render's findings, answered by the case's report: HealthGPT's report writing.
_FINDINGS_STREAM = 0x4644  # "FD": its questions draw from their own stream, so other records are unchanged


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
    check_kinds(tasks, (*PHANTOM_TASKS, CHEST_TASK, FINDINGS_TASK))
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
    comprehension = [t for t in tasks if t in COMPREHENSION_TASKS]
    qas = [qa for modality in MODALITIES for qa in vqa_pairs(case, rng, modality, comprehension)]
    if FINDINGS_TASK in tasks:
        findings_rng = np.random.default_rng([_FINDINGS_STREAM, case.noise_seed])
        qas += [findings_qa(case, findings_rng, modality) for modality in MODALITIES]
    out = [_question_record(case_id, case, qa, labels) for qa in qas]
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
    if CHEST_TASK in tasks:
        out.append(_chest_record(case_id, case))
    return out


def _question_record(
    case_id: str, case: PhantomCase, qa: QA, labels: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A comprehension record: `qa` about the case's render in its modality."""
    key: ImageKey = "ct" if qa.modality == "CT" else "mri"
    path = f"images/{case_id}_{key}.png"
    record = {
        "id": f"{case_id}_{qa.kind}_{key}",
        "image": path,
        "task": COMPREHENSION,
        "conversations": _turns(qa.question, qa.answer, with_image=True),
        "meta": {"kind": qa.kind, "modality": qa.modality, **labels},
    }
    return record, {path: case.image(key)}


def _chest_record(case_id: str, case: PhantomCase) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The report -> chest film record beside a case (drawn from its own stream, seeded by the case): the report
    alone is the instruction, as the published report_to_cxr preset has it."""
    rng = np.random.default_rng([_CHEST_STREAM, case.noise_seed])
    film = sample_chest(rng, case.size)
    target = f"images/{case_id}_cxr.png"
    record = {
        "id": f"{case_id}_{CHEST_TASK}",
        "task": GENERATION,
        "conversations": _turns(chest_report(film, rng), CHEST_REPLY, with_image=False),
        "target_image": target,
        "meta": {"kind": CHEST_TASK, "source": None, "target": "cxr", "ctr": film.ctr, "effusion": film.effusion},
    }
    return record, {target: film.render()}


def _turns(prompt: str, answer: str, with_image: bool) -> list[dict[str, str]]:
    return [
        {"from": "human", "value": f"<image>\n{prompt}" if with_image else prompt},
        {"from": "gpt", "value": answer},
    ]


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
