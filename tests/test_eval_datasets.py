"""Loaders against tiny fixture sets written in each benchmark's public on-disk layout."""

import io
import json

import pytest
from PIL import Image

from healthgpt.evaluation import load_benchmark
from healthgpt.evaluation.datasets import (
    load_mmmu_med,
    load_omnimedvqa,
    load_pathvqa,
    load_slake,
    load_vqa_rad,
)


def _png(path=None, size=(4, 3), value=128):
    im = Image.new("L", size, value)
    if path is None:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def _write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _hf_image(size=(4, 3), name="x.png"):
    return {"bytes": _png(size=size), "path": name}


def test_vqa_rad_osf_json(tmp_path):
    _png(tmp_path / "VQA_RAD Image Folder" / "synpic1.jpg", size=(5, 5))
    records = [
        {
            "qid": 1,
            "image_name": "synpic1.jpg",
            "question": "Is there a mass?",
            "answer": "Yes",
            "answer_type": "CLOSED",
            "question_type": "PRES",
            "phrase_type": "test_freeform",
            "image_organ": "CHEST",
        },
        {
            "qid": 2,
            "image_name": "synpic1.jpg",
            "question": "How many masses?",
            "answer": 2,
            "answer_type": "OPEN ",
            "question_type": "COUNT",
            "phrase_type": "test_para",
            "image_organ": "CHEST",
        },
        {
            "qid": 3,
            "image_name": "synpic1.jpg",
            "question": "Is it normal?",
            "answer": "No",
            "answer_type": "CLOSED",
            "question_type": "ABN",
            "phrase_type": "freeform",
            "image_organ": "CHEST",
        },
    ]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(records))
    test = load_vqa_rad(tmp_path)
    assert [(it.id, it.kind, it.answer, it.question_type) for it in test] == [
        ("vqa-rad/1", "closed", "Yes", "PRES"),
        ("vqa-rad/2", "open", "2", "COUNT"),
    ]
    assert test[0].meta["organ"] == "CHEST"
    assert test[0].load_images()[0].size == (5, 5)
    assert [it.id for it in load_vqa_rad(tmp_path, split="train")] == ["vqa-rad/3"]


def test_vqa_rad_osf_rejects_unknown_answer_type(tmp_path):
    rec = {
        "qid": 1,
        "image_name": "a.jpg",
        "question": "q",
        "answer": "yes",
        "answer_type": "MAYBE",
        "phrase_type": "test_freeform",
    }
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps([rec]))
    with pytest.raises(ValueError, match="answer_type"):
        load_vqa_rad(tmp_path)


def test_vqa_rad_hf_parquet_closed_is_yes_no(tmp_path):
    rows = [
        {"image": _hf_image((6, 2)), "question": "is this a ct?", "answer": "yes"},
        {"image": _hf_image(), "question": "is the liver normal?", "answer": "No"},
        {"image": _hf_image(), "question": "where is the lesion?", "answer": "left lobe"},
    ]
    _write_parquet(tmp_path / "data" / "test-00000-of-00001-abc.parquet", rows)
    _write_parquet(tmp_path / "data" / "train-00000-of-00001-abc.parquet", rows[:1])
    items = load_vqa_rad(tmp_path)
    assert [(it.id, it.kind, it.answer) for it in items] == [
        ("vqa-rad/test/00000", "closed", "yes"),
        ("vqa-rad/test/00001", "closed", "No"),
        ("vqa-rad/test/00002", "open", "left lobe"),
    ]
    assert items[0].load_images()[0].size == (6, 2)
    assert len(load_vqa_rad(tmp_path, split="train")) == 1


def test_vqa_rad_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_vqa_rad(tmp_path)


def test_slake_english_only(tmp_path):
    _png(tmp_path / "imgs" / "xmlab1" / "source.jpg", size=(7, 7))
    base = {
        "img_id": 1,
        "img_name": "xmlab1/source.jpg",
        "location": "Lung",
        "modality": "CT",
        "base_type": "vqa",
    }
    records = [
        {
            **base,
            "qid": 10,
            "question": "Is the lung healthy?",
            "answer": "No",
            "q_lang": "en",
            "answer_type": "CLOSED",
            "content_type": "Abnormality",
        },
        {
            **base,
            "qid": 11,
            "question": "Which organ is bigger, liver or spleen?",
            "answer": "Liver",
            "q_lang": "en",
            "answer_type": "CLOSED",
            "content_type": "Size",
        },
        {
            **base,
            "qid": 12,
            "question": "What modality?",
            "answer": "CT",
            "q_lang": "en",
            "answer_type": "OPEN",
            "content_type": "Modality",
        },
        {
            **base,
            "qid": 13,
            "question": "肺健康吗?",
            "answer": "不",
            "q_lang": "zh",
            "answer_type": "CLOSED",
            "content_type": "Abnormality",
        },
    ]
    (tmp_path / "test.json").write_text(json.dumps(records, ensure_ascii=False))
    items = load_slake(tmp_path)
    assert [(it.id, it.kind, it.modality, it.question_type) for it in items] == [
        ("slake/10", "closed", "CT", "Abnormality"),
        ("slake/11", "closed", "CT", "Size"),
        ("slake/12", "open", "CT", "Modality"),
    ]
    assert items[0].load_images()[0].size == (7, 7)


def test_pathvqa_parquet_and_text_layouts(tmp_path):
    rows = [
        {"image": _hf_image(), "question": "is this inflamed?", "answer": "yes"},
        {"image": _hf_image(), "question": "what is present?", "answer": "fibrosis"},
    ]
    _write_parquet(tmp_path / "hf" / "data" / "test-00000-of-00002.parquet", rows[:1])
    _write_parquet(tmp_path / "hf" / "data" / "test-00001-of-00002.parquet", rows[1:])
    items = load_pathvqa(tmp_path / "hf")
    assert [(it.id, it.kind) for it in items] == [
        ("pathvqa/test/00000", "closed"),
        ("pathvqa/test/00001", "open"),
    ]

    text = tmp_path / "text"
    _png(text / "images" / "test" / "test_0001.jpg")
    lines = [
        {"image": "images/test/test_0001.jpg", "question": "is this inflamed?", "answer": "no", "id": "t1"},
        {"image": "images/test/test_0001.jpg", "question": "what is present?", "answer": "fibrosis"},
    ]
    (text / "test.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = load_pathvqa(text)
    assert [(it.id, it.kind, it.answer) for it in items] == [
        ("pathvqa/test/t1", "closed", "no"),
        ("pathvqa/test/00001", "open", "fibrosis"),
    ]
    assert items[0].images[0] == text / "images/test/test_0001.jpg"


def _omni_record(qid, modality_key="modality_type", modality="CT(Computed Tomography)", **extra):
    rec = {
        "dataset": "Fake",
        "question_id": qid,
        "question_type": "Modality Recognition",
        "question": "What modality is shown?",
        "image_path": "Images/Fake/a.png",
        modality_key: modality,
    }
    rec.update(extra)
    return rec


def test_omnimedvqa_mcq_and_modality_names(tmp_path):
    _png(tmp_path / "Images" / "Fake" / "a.png")
    folder = tmp_path / "QA_information" / "Open-access"
    folder.mkdir(parents=True)
    records = [
        _omni_record("Fake_0", gt_answer="MRI", option_A="CT", option_B="MRI", option_C="PET", option_D="X-ray"),
        _omni_record(
            "Fake_1",
            modality="MR (Mag-netic Resonance Imaging)",
            gt_answer="Glioma.",
            option_A="Meningioma",
            option_B="glioma",
        ),
        _omni_record(
            "Fake_2",
            modality_key="modality",
            modality="ultrasound",
            gt_answer="No",
            option_A="Yes",
            option_B="No",
            option_C=None,
        ),
        _omni_record("Fake_3", modality="Dermoscopy", gt_answer="Nevus", option_A="Nevus", option_B="Melanoma"),
    ]
    (folder / "Fake.json").write_text(json.dumps(records))
    items = load_omnimedvqa(tmp_path)
    assert [(it.id, it.modality, it.options, it.answer, it.answer_letter) for it in items] == [
        ("omnimedvqa/Fake/Fake_0", "CT", ("CT", "MRI", "PET", "X-ray"), "MRI", "B"),
        ("omnimedvqa/Fake/Fake_1", "MRI", ("Meningioma", "glioma"), "glioma", "B"),
        ("omnimedvqa/Fake/Fake_2", "USS", ("Yes", "No"), "No", "B"),
        ("omnimedvqa/Fake/Fake_3", "Dermoscopy", ("Nevus", "Melanoma"), "Nevus", "A"),
    ]
    assert items[1].meta["modality_type"] == "MR (Mag-netic Resonance Imaging)"
    assert all(it.kind == "mcq" and it.question_type == "Modality Recognition" for it in items)
    assert [it.id for it in load_omnimedvqa(tmp_path, modalities=("MRI", "USS"))] == [
        "omnimedvqa/Fake/Fake_1",
        "omnimedvqa/Fake/Fake_2",
    ]


def test_omnimedvqa_answer_not_an_option_raises(tmp_path):
    folder = tmp_path / "QA_information" / "Open-access"
    folder.mkdir(parents=True)
    (folder / "Bad.json").write_text(json.dumps([_omni_record("B0", gt_answer="PET", option_A="CT", option_B="MR")]))
    with pytest.raises(ValueError, match="not exactly one of the options"):
        load_omnimedvqa(tmp_path)


def _mmmu_row(id_, **kw):
    row = {
        "id": id_,
        "question": "<image 1> Which drug?",
        "options": "[]",
        "explanation": "",
        "img_type": "['Tables']",
        "answer": "A",
        "topic_difficulty": "Easy",
        "question_type": "multiple-choice",
        "subfield": "Pharmacology",
    }
    row.update({f"image_{k}": None for k in range(1, 8)})
    row.update(kw)
    return row


def test_mmmu_med_parquet_and_json(tmp_path):
    rows = [
        _mmmu_row(
            "validation_Pharmacy_1",
            options="['Aspirin', 'Heparin', 'Warfarin']",
            answer="B",
            image_1=_hf_image((3, 3)),
            image_2=_hf_image((2, 2)),
        ),
        _mmmu_row("validation_Pharmacy_2", question_type="open", answer="['3.5', '3.50']", image_1=_hf_image()),
    ]
    _write_parquet(tmp_path / "Pharmacy" / "validation-00000-of-00001.parquet", rows)
    _png(tmp_path / "Public_Health" / "img" / "q1.png", size=(9, 9))
    row = _mmmu_row("validation_Public_Health_1", options=["Cohort", "Case-control"], image_1="img/q1.png")
    (tmp_path / "Public_Health" / "validation.json").write_text(json.dumps([row]))
    items = load_mmmu_med(tmp_path, subjects=("Pharmacy", "Public_Health"))
    assert [(it.id, it.kind, it.answer, it.options) for it in items] == [
        ("mmmu-med/validation_Pharmacy_1", "mcq", "Heparin", ("Aspirin", "Heparin", "Warfarin")),
        ("mmmu-med/validation_Pharmacy_2", "open", "3.5", ()),
        ("mmmu-med/validation_Public_Health_1", "mcq", "Cohort", ("Cohort", "Case-control")),
    ]
    assert [im.size for im in items[0].load_images()] == [(3, 3), (2, 2)]
    assert items[1].meta["accepted_answers"] == ["3.50"]
    assert items[0].modality == "Tables" and items[0].meta["subject"] == "Pharmacy"
    assert items[2].load_images()[0].size == (9, 9)


def test_mmmu_hidden_test_answers_raise(tmp_path):
    row = _mmmu_row("test_Pharmacy_1", options="['a', 'b']", answer="?")
    _write_parquet(tmp_path / "Pharmacy" / "test-00000-of-00001.parquet", [row])
    with pytest.raises(ValueError, match="hidden"):
        load_mmmu_med(tmp_path, split="test", subjects=("Pharmacy",))
    with pytest.raises(FileNotFoundError):
        load_mmmu_med(tmp_path, subjects=("Pharmacy",))


def test_load_benchmark_dispatches_and_rejects_unknown(tmp_path):
    (tmp_path / "test.json").write_text(json.dumps([]))
    assert load_benchmark("slake", tmp_path) == []
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("vqa-med", tmp_path)
