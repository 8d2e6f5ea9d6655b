"""Record reading: LLaVA JSON / JSONL / parquet, checks that name file and line, skip or raise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from healthgpt.config import COMPREHENSION, GENERATION
from healthgpt.data.records import DataError, load_records


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    return tmp_path


GOOD = {"id": "good", "image": "a.png", "conversations": _turns("What is this?\n<image>", "A phantom.")}
BAD = {
    "missing image": {"id": "m", "image": "nope.png", "conversations": _turns("<image>\nWhat?", "x")},
    "placeholder count": {"id": "c", "image": "a.png", "conversations": _turns("<image>\n<image>\nWhat?", "x")},
    "empty response": {"id": "e", "image": "a.png", "conversations": _turns("<image>\nWhat?", "  ")},
    "unknown task": {"id": "t", "task": "segmentation", "image": "a.png", "conversations": _turns("<image>\nQ", "A")},
    "order": {"id": "o", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
    "no target": {"id": "g", "task": GENERATION, "conversations": _turns("Make a CT.", "Here.")},
}
EXPECTED = {
    "missing image": "missing image file",
    "placeholder count": "2 <image> placeholder(s) in the human turns but 1 image(s)",
    "empty response": "empty response",
    "unknown task": "unknown task 'segmentation'",
    "order": "turns must alternate",
    "no target": "needs a target",
}


def _write_json(path: Path, records: list[dict]) -> list[int]:
    """Write a pretty-printed JSON array and return the 1-based line where each record starts."""
    lines, text = [], "[\n"
    for i, record in enumerate(records):
        lines.append(text.count("\n") + 1)
        text += json.dumps(record, indent=2) + (",\n" if i < len(records) - 1 else "\n")
    path.write_text(text + "]\n")
    return lines


def test_malformed_records_are_reported_with_file_and_line_and_skipped(folder: Path) -> None:
    records = [GOOD, *BAD.values(), GOOD]
    lines = _write_json(folder / "train.json", records)
    found = load_records(folder / "train.json")
    assert [r.origin.index for r in found.records] == [0, len(records) - 1]
    assert len(found.issues) == len(BAD)
    for issue, (kind, record), line, index in zip(found.issues, BAD.items(), lines[1:], range(1, 99), strict=False):
        text = str(issue)
        assert text.startswith(f"{folder / 'train.json'}:{line} (record {index}, id {record['id']!r})"), text
        assert EXPECTED[kind] in text, (kind, text)


@pytest.mark.parametrize("kind", list(BAD))
def test_on_error_raise_rejects_with_the_location(folder: Path, kind: str) -> None:
    lines = _write_json(folder / "train.json", [GOOD, BAD[kind]])
    with pytest.raises(DataError, match=f"train.json:{lines[1]} .*{EXPECTED[kind][:20]}"):
        load_records(folder / "train.json", on_error="raise")


def test_jsonl_lines_multi_image_and_placeholders_moved_first(folder: Path) -> None:
    multi = {
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "Compare <image> with <image>."},
            {"from": "gpt", "value": "Same."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    rows = [json.dumps(GOOD), "", json.dumps(multi), "{not json", json.dumps(BAD["empty response"])]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    found = load_records(folder / "train.jsonl")
    assert [r.origin.line for r in found.records] == [1, 3]
    record = found.records[1]
    assert record.images == (folder / "a.png", folder / "b.png")
    assert record.turns[0] == ("user", "<image>\n<image>\nCompare  with .")
    assert [role for role, _ in record.turns] == ["user", "assistant", "user", "assistant"]
    assert found.records[0].turns[0] == ("user", "<image>\nWhat is this?")  # LLaVA: the image goes first
    assert [(i.origin.line, "invalid JSON" in i.problem) for i in found.issues] == [(4, True), (5, False)]


def test_task_inference_targets_and_field_map(folder: Path) -> None:
    gen = {"image": "a.png", "output_image": "b.png", "conversations": _turns("<image>\nTo MRI.", "Done.")}
    codes = {"task": GENERATION, "target_codes": [1, 2, 3], "conversations": _turns("Draw.", "")}
    found = load_records([GOOD, gen, codes], image_folder=folder, field_map={"target_image": "output_image"})
    assert [r.task for r in found.records] == [COMPREHENSION, GENERATION, GENERATION]
    assert found.records[1].target_image == folder / "b.png"
    assert found.records[2].target_codes == (1, 2, 3) and found.records[2].images == ()
    assert not found.issues


def test_parquet_through_datasets(folder: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [GOOD, {**GOOD, "id": "two", "conversations": _turns("<image>\nAgain?", "")}]
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    found = load_records(folder / "train.parquet")
    assert [r.origin.id for r in found.records] == ["good"]
    assert str(found.issues[0]) == f"{folder / 'train.parquet'} (record 1, id 'two'): turn 1 (gpt) is an empty response"
