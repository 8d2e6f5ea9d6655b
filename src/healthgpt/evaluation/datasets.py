"""Loaders for the comprehension benchmarks of Table 1, each from its public on-disk layout in a local folder.

Layouts read (nothing is downloaded):
* VQA-RAD: the OSF release (`VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/`; test = phrase_type
  test_freeform/test_para, kind from answer_type) or the HF `flaviagiammarino/vqa-rad` parquet files
  (`data/{split}-*.parquet`, image/question/answer; no answer_type there, so closed = a yes/no answer).
* SLAKE: `{split}.json` + `imgs/`, English questions only (q_lang "en"), kind from answer_type.
* PathVQA: the HF `flaviagiammarino/path-vqa` parquet files, or a pickle-free text layout: `{split}.jsonl`,
  one `{"image": <path relative to the folder>, "question", "answer"}` per line (optional "id").
  Closed = a yes/no answer, as the PathVQA paper defines its closed questions.
* OmniMedVQA: `QA_information/Open-access/*.json` lists, image paths relative to the root; all items are MCQ.
  Modalities are shortened to the column names of the paper's Table 9 (CT, X-ray, FDM, MiS, OCT, MRI, USS).
* MMMU medical subjects: `<Subject>/{split}-*.parquet` (HF `MMMU/MMMU`) or `<Subject>/{split}.json[l]`
  with the same fields (images as paths relative to the subject folder). Use split "validation": test
  answers are hidden.
HF parquet files are read with pyarrow; HF image cells are `{"bytes", "path"}` structs.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from healthgpt.evaluation.items import (
    MMMU_MED,
    OMNIMEDVQA,
    PATHVQA,
    SLAKE,
    VQA_RAD,
    EvalItem,
    ImageSource,
    Kind,
    option_letters,
)
from healthgpt.evaluation.scoring import normalize

VQA_RAD_OSF_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_OSF_IMAGES = "VQA_RAD Image Folder"
MMMU_MED_SUBJECTS = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)
# OmniMedVQA `modality_type` values (typos as released) -> Table 9 column names.
OMNIMEDVQA_MODALITIES = {
    "CT(Computed Tomography)": "CT",
    "X-Ray": "X-ray",
    "Fundus Photography": "FDM",
    "Microscopy Images": "MiS",
    "OCT (Optical Coherence Tomography": "OCT",
    "MR (Mag-netic Resonance Imaging)": "MRI",
    "ultrasound": "USS",
}
MMMU_MAX_IMAGES = 7


def _read_json_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON list file or a JSON-lines file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def _read_parquet_rows(paths: list[Path]) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # optional dependency, only for the HF layouts
        raise ImportError("reading HF parquet benchmark files needs pyarrow: pip install pyarrow") from err
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def _parquet_files(root: Path, split: str) -> list[Path]:
    return sorted(p for p in root.rglob(f"{split}-*.parquet") if p.is_file())


def _hf_image(cell: Any, base: Path) -> ImageSource:
    """An HF image cell (`{"bytes", "path"}` struct) or a relative path string, as an image source."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        cell = cell.get("path")
    if not cell:
        raise ValueError("image cell holds neither bytes nor a path")
    return base / cell


def _yes_no_kind(answer: str) -> Kind:
    return "closed" if normalize(answer) in ("yes", "no") else "open"


def _marked_kind(answer_type: str, where: str) -> Kind:
    kind = answer_type.strip().upper()
    if kind not in ("CLOSED", "OPEN"):
        raise ValueError(f"{where}: answer_type must be CLOSED or OPEN, got {answer_type!r}")
    return "closed" if kind == "CLOSED" else "open"


def _simple_parquet(root: Path, split: str, dataset: str) -> list[EvalItem] | None:
    """Image/question/answer parquet rows (HF vqa-rad, path-vqa) with closed = yes/no; None if no files."""
    files = _parquet_files(root, split)
    if not files:
        return None
    return [
        EvalItem(
            id=f"{dataset}/{split}/{i:05d}",
            dataset=dataset,
            images=(_hf_image(row["image"], root),),
            question=row["question"],
            answer=str(row["answer"]).strip(),
            kind=_yes_no_kind(str(row["answer"])),
            meta={"split": split},
        )
        for i, row in enumerate(_read_parquet_rows(files))
    ]


def load_vqa_rad(root: str | Path, split: str = "test") -> list[EvalItem]:
    """VQA-RAD from the OSF json release (preferred: it marks closed/open) or the HF parquet files."""
    root = Path(root)
    osf = root / VQA_RAD_OSF_JSON
    if osf.is_file():
        images = root / VQA_RAD_OSF_IMAGES if (root / VQA_RAD_OSF_IMAGES).is_dir() else root
        items = []
        for rec in _read_json_records(osf):
            is_test = str(rec.get("phrase_type", "")).strip().startswith("test")
            if is_test != (split == "test"):
                continue
            items.append(
                EvalItem(
                    id=f"{VQA_RAD}/{rec['qid']}",
                    dataset=VQA_RAD,
                    images=(images / rec["image_name"],),
                    question=rec["question"],
                    answer=str(rec["answer"]).strip(),
                    kind=_marked_kind(rec["answer_type"], f"{osf} qid {rec['qid']}"),
                    question_type=str(rec.get("question_type", "")).strip(),
                    meta={"organ": rec.get("image_organ"), "phrase_type": rec.get("phrase_type")},
                )
            )
        return items
    items = _simple_parquet(root, split, VQA_RAD)
    if items is None:
        raise FileNotFoundError(f"no '{VQA_RAD_OSF_JSON}' and no '{split}-*.parquet' under {root}")
    return items


def load_slake(root: str | Path, split: str = "test") -> list[EvalItem]:
    """SLAKE English questions from `{split}.json`, images under `imgs/`."""
    root = Path(root)
    path = root / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"SLAKE split file not found: {path}")
    return [
        EvalItem(
            id=f"{SLAKE}/{rec['qid']}",
            dataset=SLAKE,
            images=(root / "imgs" / rec["img_name"],),
            question=rec["question"],
            answer=str(rec["answer"]).strip(),
            kind=_marked_kind(rec["answer_type"], f"{path} qid {rec['qid']}"),
            modality=rec.get("modality", ""),
            question_type=rec.get("content_type", ""),
            meta={"location": rec.get("location"), "img_id": rec.get("img_id"), "split": split},
        )
        for rec in _read_json_records(path)
        if rec.get("q_lang") == "en"
    ]


def load_pathvqa(root: str | Path, split: str = "test") -> list[EvalItem]:
    """PathVQA from the HF parquet files or from `{split}.jsonl` (see the module docstring)."""
    root = Path(root)
    items = _simple_parquet(root, split, PATHVQA)
    if items is not None:
        return items
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no '{split}-*.parquet' and no {path.name} under {root}")
    return [
        EvalItem(
            id=f"{PATHVQA}/{split}/{rec.get('id', f'{i:05d}')}",
            dataset=PATHVQA,
            images=(root / rec["image"],),
            question=rec["question"],
            answer=str(rec["answer"]).strip(),
            kind=_yes_no_kind(str(rec["answer"])),
            meta={"split": split},
        )
        for i, rec in enumerate(_read_json_records(path))
    ]


def _letter_options(rec: dict[str, Any]) -> tuple[str, ...]:
    """`option_A`, `option_B`, ... up to the first missing or empty one."""
    options = []
    for letter in option_letters(26):
        value = rec.get(f"option_{letter}")
        if value is None or str(value).strip() == "":
            break
        options.append(str(value).strip())
    return tuple(options)


def _matching_option(answer: str, options: tuple[str, ...], where: str) -> str:
    if answer in options:
        return answer
    matches = [o for o in options if normalize(o) == normalize(answer)]
    if len(matches) != 1:
        raise ValueError(f"{where}: answer {answer!r} is not exactly one of the options {options}")
    return matches[0]


def load_omnimedvqa(
    root: str | Path, *, access: str = "Open-access", modalities: Iterable[str] | None = None
) -> list[EvalItem]:
    """OmniMedVQA MCQ items; `modalities` (Table 9 names, e.g. ("CT", "MRI")) keeps only those."""
    root = Path(root)
    folder = root / "QA_information" / access
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no OmniMedVQA json files in {folder}")
    keep = set(modalities) if modalities is not None else None
    items = []
    for path in files:
        for i, rec in enumerate(_read_json_records(path)):
            raw = rec.get("modality_type", rec.get("modality", ""))  # one released record says "modality"
            modality = OMNIMEDVQA_MODALITIES.get(raw, raw)
            if keep is not None and modality not in keep:
                continue
            options = _letter_options(rec)
            where = f"{path.name} question {rec.get('question_id', i)}"
            items.append(
                EvalItem(
                    id=f"{OMNIMEDVQA}/{path.stem}/{rec.get('question_id', i)}",
                    dataset=OMNIMEDVQA,
                    images=(root / rec["image_path"],),
                    question=rec["question"],
                    answer=_matching_option(str(rec["gt_answer"]).strip(), options, where),
                    kind="mcq",
                    options=options,
                    modality=modality,
                    question_type=rec.get("question_type", ""),
                    meta={"source": rec.get("dataset", path.stem), "modality_type": raw},
                )
            )
    return items


def _literal_list(value: Any) -> list[str]:
    """A python-list string ("['a', 'b']") as a list; any other value as a one-element list."""
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return [text]
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    return [text]


def _mmmu_item(row: dict[str, Any], subject: str, base: Path, where: str) -> EvalItem:
    images = tuple(_hf_image(row[f"image_{k}"], base) for k in range(1, MMMU_MAX_IMAGES + 1) if row.get(f"image_{k}"))
    common = {
        "id": f"{MMMU_MED}/{row['id']}",
        "dataset": MMMU_MED,
        "images": images,
        "question": row["question"],
        "modality": ", ".join(_literal_list(row["img_type"])) if row.get("img_type") else "",
        "question_type": row.get("question_type", ""),
    }
    meta = {"subject": subject, "subfield": row.get("subfield"), "difficulty": row.get("topic_difficulty")}
    if row.get("question_type") == "open":
        answers = _literal_list(row["answer"])
        return EvalItem(**common, answer=answers[0], kind="open", meta={**meta, "accepted_answers": answers[1:]})
    options = tuple(_literal_list(row["options"]))
    letter = str(row["answer"]).strip()
    if letter not in option_letters(len(options)):
        raise ValueError(f"{where}: answer {letter!r} is not an option letter (test-split answers are hidden)")
    answer = options[option_letters(len(options)).index(letter)]
    return EvalItem(**common, answer=answer, kind="mcq", options=options, meta=meta)


def load_mmmu_med(
    root: str | Path, split: str = "validation", subjects: Iterable[str] = MMMU_MED_SUBJECTS
) -> list[EvalItem]:
    """The medical subjects of MMMU (Health & Medicine), one folder per subject under `root`."""
    root = Path(root)
    items = []
    for subject in subjects:
        folder = root / subject
        files = _parquet_files(folder, split) if folder.is_dir() else []
        if files:
            rows = _read_parquet_rows(files)
        elif (folder / f"{split}.json").is_file() or (folder / f"{split}.jsonl").is_file():
            path = folder / f"{split}.json"
            rows = _read_json_records(path if path.is_file() else folder / f"{split}.jsonl")
        else:
            raise FileNotFoundError(f"no MMMU {split} files for {subject} under {folder}")
        items.extend(_mmmu_item(row, subject, folder, f"{subject} {row.get('id')}") for row in rows)
    return items


LOADERS: dict[str, Callable[..., list[EvalItem]]] = {
    VQA_RAD: load_vqa_rad,
    SLAKE: load_slake,
    PATHVQA: load_pathvqa,
    OMNIMEDVQA: load_omnimedvqa,
    MMMU_MED: load_mmmu_med,
}


def load_benchmark(name: str, root: str | Path, **kwargs: Any) -> list[EvalItem]:
    """Load benchmark `name` (one of `LOADERS`) from `root`."""
    if name not in LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(LOADERS))}")
    return LOADERS[name](root, **kwargs)
