"""End to end: fixture sets on disk -> loaders -> run_eval with a lookup predictor -> metrics.json; resume."""

import json
import shutil

import pytest
from PIL import Image

from healthgpt.evaluation import (
    EvalItem,
    RunMismatchError,
    compare_runs,
    load_mmmu_med,
    load_omnimedvqa,
    load_pathvqa,
    load_slake,
    load_vqa_rad,
    model_predictor,
    prompts_for,
    read_predictions,
    render_prompt,
    run_eval,
)

RUN_INFO = {"model": "fake-lookup", "weights": {"com_hlora.bin": "0" * 64}, "sampling": {"do_sample": False}}
# id -> answer the fake model gives, with the verdict a human gives it (comments)
ANSWERS = {
    "vqa-rad/1": "Yes.",  # gold Yes: right
    "vqa-rad/2": "normal",  # gold No: wrong ("normal" is not "no")
    "vqa-rad/3": "The lower lobe of the left lung",  # gold "left lower lobe": recall 1, F1 0.75
    "vqa-rad/4": "two",  # gold 2: recall 1, exact
    "slake/1": "",  # gold Yes: wrong, still counted
    "slake/2": "The liver",  # gold Liver (closed, not yes/no): right
    "slake/3": "upper lobe",  # gold "right upper lobe": recall 2/3
    "pathvqa/test/00000": "Yes, it is.",  # gold yes: right
    "pathvqa/test/00001": "fibrosis",  # gold fibrosis: recall 1
    "omnimedvqa/Omni/o1": "B",  # CT, gold B: right
    "omnimedvqa/Omni/o2": "glioma",  # MRI, gold "Glioma" by text: right
    "omnimedvqa/Omni/o3": "C",  # MRI, gold A: wrong
    "mmmu-med/validation_Pharmacy_1": "The answer is B",  # gold B: right
    "mmmu-med/validation_Pharmacy_2": "about 3.5 mg",  # open, gold 3.5: right
}


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), 100).save(path)


def _write_json(path, data, lines=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(d) + "\n" for d in data) if lines else json.dumps(data)
    path.write_text(text)


def _vqa_rad_record(qid, answer, answer_type, phrase_type="test_freeform"):
    return {
        "qid": qid,
        "image_name": "synpic1.jpg",
        "question": f"question {qid}?",
        "answer": answer,
        "answer_type": answer_type,
        "question_type": "PRES",
        "phrase_type": phrase_type,
        "image_organ": "CHEST",
    }


def _slake_record(qid, answer, answer_type):
    return {
        "img_id": 1,
        "img_name": "xmlab1/source.jpg",
        "qid": qid,
        "question": f"question {qid}?",
        "answer": answer,
        "q_lang": "en",
        "answer_type": answer_type,
        "modality": "CT",
        "content_type": "Organ",
        "location": "Abdomen",
    }


def _omni_record(qid, modality, gt, **options):
    return {
        "dataset": "Omni",
        "question_id": qid,
        "question_type": "Disease Diagnosis",
        "question": "What is shown?",
        "gt_answer": gt,
        "image_path": "Images/o.png",
        "modality_type": modality,
        **options,
    }


def _mmmu_row(id_, question_type, answer, options="[]"):
    row = {
        "id": id_,
        "question": "<image 1> ?",
        "options": options,
        "explanation": "",
        "img_type": "['Tables']",
    }
    row |= {"answer": answer, "topic_difficulty": "Easy", "question_type": question_type, "subfield": "x"}
    row |= {f"image_{k}": None for k in range(1, 8)}
    row["image_1"] = "q.png"
    return row


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Five benchmarks written in their public layouts (json variants), loaded back."""
    root = tmp_path_factory.mktemp("bench")
    _png(root / "vqarad" / "VQA_RAD Image Folder" / "synpic1.jpg")
    vqa_rad = [
        _vqa_rad_record(1, "Yes", "CLOSED"),
        _vqa_rad_record(2, "No", "CLOSED", "test_para"),
        _vqa_rad_record(3, "left lower lobe", "OPEN"),
        _vqa_rad_record(4, 2, "OPEN"),
        _vqa_rad_record(5, "No", "CLOSED", "freeform"),  # train split: not evaluated
    ]
    _write_json(root / "vqarad" / "VQA_RAD Dataset Public.json", vqa_rad)
    _png(root / "slake" / "imgs" / "xmlab1" / "source.jpg")
    slake = [_slake_record(1, "Yes", "CLOSED"), _slake_record(2, "Liver", "CLOSED")]
    slake += [_slake_record(3, "right upper lobe", "OPEN")]
    _write_json(root / "slake" / "test.json", slake)
    _png(root / "pathvqa" / "images" / "p.jpg")
    path_rows = [
        {"image": "images/p.jpg", "question": "inflamed?", "answer": "yes"},
        {"image": "images/p.jpg", "question": "what is present?", "answer": "fibrosis"},
    ]
    _write_json(root / "pathvqa" / "test.jsonl", path_rows, lines=True)
    _png(root / "omni" / "Images" / "o.png")
    omni = [
        _omni_record("o1", "CT(Computed Tomography)", "Liver", option_A="Kidney", option_B="Liver"),
        _omni_record("o2", "MR (Mag-netic Resonance Imaging)", "Glioma", option_A="Glioma", option_B="Normal"),
        _omni_record("o3", "MR (Mag-netic Resonance Imaging)", "Normal", option_A="Normal", option_B="Tumour"),
    ]
    _write_json(root / "omni" / "QA_information" / "Open-access" / "Omni.json", omni)
    _png(root / "mmmu" / "Pharmacy" / "q.png")
    mmmu = [
        _mmmu_row("validation_Pharmacy_1", "multiple-choice", "B", "['Aspirin', 'Heparin']"),
        _mmmu_row("validation_Pharmacy_2", "open", "3.5"),
    ]
    _write_json(root / "mmmu" / "Pharmacy" / "validation.json", mmmu)
    return (
        load_vqa_rad(root / "vqarad")
        + load_slake(root / "slake")
        + load_pathvqa(root / "pathvqa")
        + load_omnimedvqa(root / "omni")
        + load_mmmu_med(root / "mmmu", subjects=("Pharmacy",))
    )


class LookupPredictor:
    """Answers from a table; records what it was asked; raises after `fail_after` answers (a crash)."""

    def __init__(self, answers, fail_after=None):
        self.answers, self.fail_after, self.seen, self.batches = answers, fail_after, [], []

    def __call__(self, batch):
        self.batches.append(len(batch))
        out = []
        for item in batch:
            if self.fail_after is not None and len(self.seen) >= self.fail_after:
                raise RuntimeError("simulated crash")
            assert item.prompt is not None and item.images
            self.seen.append(item.id)
            out.append(self.answers[item.id])
        return out


def _lines(run_dir):
    return (run_dir / "predictions.jsonl").read_text().splitlines()


def test_items_load_in_their_layouts(items):
    assert len(items) == len(ANSWERS) and {it.id for it in items} == set(ANSWERS)


def test_end_to_end_metrics_match_hand_computed(items, tmp_path):
    predictor = LookupPredictor(ANSWERS)
    metrics = run_eval(predictor, items, tmp_path, batch_size=4, run_info=RUN_INFO, progress=False)
    assert predictor.batches == [4, 4, 4, 2]
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    ds = metrics["datasets"]
    # VQA-RAD: closed 1/2; open recall (1 + 1)/2; all = (1 + 0 + 1 + 1)/4; F1 (0.75 + 1)/2; exact 1/2
    assert ds["vqa-rad"]["closed"] == {"n": 2, "accuracy": 50.0, "yes_no_n": 2, "unparsed": 1}
    assert ds["vqa-rad"]["open"]["recall"] == 100.0
    assert ds["vqa-rad"]["open"]["f1"] == pytest.approx(87.5)
    assert ds["vqa-rad"]["open"]["exact"] == 50.0
    assert ds["vqa-rad"]["all"] == 75.0
    # SLAKE: closed 1/2 (the empty answer counts); all = (0 + 1 + 2/3)/3
    assert ds["slake"]["closed"]["accuracy"] == 50.0
    assert ds["slake"]["all"] == pytest.approx(100 * (5 / 3) / 3)
    assert ds["slake"]["by_modality"] == {"CT": {"n": 3, "accuracy": pytest.approx(100 / 3), "all": ds["slake"]["all"]}}
    assert ds["pathvqa"]["closed"]["accuracy"] == 100.0 and ds["pathvqa"]["all"] == 100.0
    # OmniMedVQA: micro 2/3, but OMVQA = mean over modalities (CT 100, MRI 50) = 75
    assert ds["omnimedvqa"]["accuracy"] == pytest.approx(200 / 3)
    assert ds["omnimedvqa"]["by_modality"]["MRI"]["accuracy"] == 50.0
    assert ds["mmmu-med"]["accuracy"] == 100.0
    t1 = metrics["table1"]
    expected = {
        "VQA-RAD close": 50.0,
        "VQA-RAD all": 75.0,
        "SLAKE close": 50.0,
        "SLAKE all": 500 / 9,
        "PathVQA close": 100.0,
        "PathVQA all": 100.0,
        "MMMU-Med": 100.0,
        "OMVQA": 75.0,
    }
    assert t1 == pytest.approx({**expected, "Avg": sum(expected.values()) / 8})

    run = json.loads((tmp_path / "run.json").read_text())
    assert run["run_info"] == RUN_INFO
    assert run["prompts"]["name"] == "short" and "{question}" in run["prompts"]["closed"]
    assert run["items"]["count"] == 14 and run["items"]["per_dataset"]["vqa-rad"] == 4
    records = [json.loads(x) for x in _lines(tmp_path)]
    by_id = {it.id: it for it in items}
    assert [r["id"] for r in records] == [it.id for it in items]
    assert all(r["prompt"] == render_prompt(by_id[r["id"]]) for r in records)
    md = (tmp_path / "metrics.md").read_text()
    assert "| 50.0 | 75.0 | 50.0 | 55.6 | 100.0 | 100.0 | 100.0 | 75.0 | 75.7 |" in md
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 14


def test_crash_and_resume_equals_an_uninterrupted_run(items, tmp_path):
    full = run_eval(LookupPredictor(ANSWERS), items, tmp_path / "full", batch_size=3, run_info=RUN_INFO, progress=False)
    crashing = LookupPredictor(ANSWERS, fail_after=7)  # dies inside the third batch of 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(crashing, items, tmp_path / "resumed", batch_size=3, run_info=RUN_INFO, progress=False)
    assert len(_lines(tmp_path / "resumed")) == 6  # two whole batches were flushed
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    again = LookupPredictor(ANSWERS)
    resumed = run_eval(again, items, tmp_path / "resumed", batch_size=3, run_info=RUN_INFO, progress=False)
    assert again.seen == [it.id for it in items[6:]]
    assert resumed == full
    ids = [json.loads(x)["id"] for x in _lines(tmp_path / "resumed")]
    assert sorted(ids) == sorted(ANSWERS) and len(ids) == len(set(ids))


def test_truncated_last_line_is_dropped_and_redone(items, tmp_path):
    full = run_eval(LookupPredictor(ANSWERS), items, tmp_path / "full", batch_size=5, run_info=RUN_INFO, progress=False)
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError):
        run_eval(LookupPredictor(ANSWERS, 5), items, run_dir, batch_size=5, run_info=RUN_INFO, progress=False)
    with open(run_dir / "predictions.jsonl", "a") as f:  # a crash in the middle of writing item 6
        f.write('{"id": "' + items[5].id + '", "dataset": "sla')
    assert list(read_predictions(run_dir / "predictions.jsonl")) == [it.id for it in items[:5]]
    assert (run_dir / "predictions.jsonl").read_text().endswith("}\n")  # the half line was cut off
    again = LookupPredictor(ANSWERS)
    assert run_eval(again, items, run_dir, batch_size=5, run_info=RUN_INFO, progress=False) == full
    assert again.seen == [it.id for it in items[5:]]
    ids = [json.loads(x)["id"] for x in _lines(run_dir)]
    assert ids == [it.id for it in items]


def test_finished_run_is_not_recomputed(items, tmp_path):
    run_eval(LookupPredictor(ANSWERS), items, tmp_path, batch_size=8, run_info=RUN_INFO, progress=False)
    again = LookupPredictor(ANSWERS)
    run_eval(again, items, tmp_path, batch_size=8, run_info=RUN_INFO, progress=False)
    assert again.seen == [] and len(_lines(tmp_path)) == len(items)


def test_resume_with_other_settings_or_items_is_refused(items, tmp_path):
    with pytest.raises(RuntimeError):
        run_eval(LookupPredictor(ANSWERS, 2), items, tmp_path, batch_size=2, run_info=RUN_INFO, progress=False)
    other = {**RUN_INFO, "sampling": {"do_sample": True, "temperature": 0.7}}
    with pytest.raises(RunMismatchError, match="run_info"):
        run_eval(LookupPredictor(ANSWERS), items, tmp_path, batch_size=2, run_info=other, progress=False)
    with pytest.raises(RunMismatchError, match="items"):
        run_eval(LookupPredictor(ANSWERS), items[:-1], tmp_path, batch_size=2, run_info=RUN_INFO, progress=False)


def test_corrupt_middle_line_and_bad_predictor_output_raise(items, tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a", "prediction": "x"}\nnot json\n{"id": "b", "prediction": "y"}\n')
    with pytest.raises(ValueError, match=":2: not a result line"):
        read_predictions(path)
    with pytest.raises(TypeError, match="one str per item"):
        run_eval(lambda b: ["yes"], items, tmp_path / "bad", batch_size=2, run_info=RUN_INFO, progress=False)
    with pytest.raises(ValueError, match="unique"):
        run_eval(LookupPredictor(ANSWERS), items + items[:1], tmp_path / "dup", batch_size=2, run_info=RUN_INFO)


def test_compare_runs_side_by_side(items, tmp_path):
    run_eval(LookupPredictor(ANSWERS), items, tmp_path / "a", batch_size=8, run_info=RUN_INFO, progress=False)
    all_yes = {k: "yes" for k in ANSWERS}
    info_b = {**RUN_INFO, "model": "always-yes"}
    run_eval(LookupPredictor(all_yes), items, tmp_path / "b", batch_size=8, run_info=info_b, progress=False)
    md = compare_runs([tmp_path / "a", tmp_path / "b"])
    table1_a = [line for line in md.splitlines() if line.startswith("| a | 50.0")]  # labelled by folder name
    assert table1_a == ["| a | 50.0 | 75.0 | 50.0 | 55.6 | 100.0 | 100.0 | 100.0 | 75.0 | 75.7 |"]
    # always "yes": VQA-RAD closed 1/2, all 1/4; SLAKE closed 1/2 ("yes" for Yes; not "Liver"), all 1/3;
    # PathVQA closed 1/1, all 1/2; MMMU 0; OMVQA 0
    assert "| b | 50.0 | 25.0 | 50.0 | 33.3 | 100.0 | 50.0 | 0.0 | 0.0 | 38.5 |" in md
    # the VQA-RAD table: n, close, open recall / F1 / exact, MCQ, accuracy, all
    assert "| b | 4 | 50.0 | 0.0 | 0.0 | 0.0 | – | 25.0 | 25.0 |" in md
    (tmp_path / "c").mkdir()
    twin = tmp_path / "c" / "a"  # two folders named "a": labelled by path
    shutil.copytree(tmp_path / "a", twin)
    assert f"| {twin} | 50.0 | 75.0 |" in compare_runs([tmp_path / "a", twin])
    assert md.count("| short | recall | 14 |") == 2
    with pytest.raises(ValueError):
        compare_runs([tmp_path / "a"], labels=["x", "y"])


def test_model_predictor_sends_every_image_and_the_prompt(items, tmp_path):
    calls = []

    def answer(pairs, **sampling):
        calls.append((pairs, sampling))
        return ["yes"] * len(pairs)

    mmmu = [it for it in items if it.dataset == "mmmu-med"]
    run_eval(
        model_predictor(answer, max_new_tokens=16), mmmu, tmp_path, batch_size=2, run_info=RUN_INFO, progress=False
    )
    ((pairs, sampling),) = calls
    assert [[im.size for im in images] for images, _ in pairs] == [[im.size for im in it.load_images()] for it in mmmu]
    assert [q for _, q in pairs] == [render_prompt(it) for it in mmmu]
    assert pairs[0][1] == (
        "<image 1> ?\nA. Aspirin\nB. Heparin\nAnswer with the option's letter from the given choices directly."
    )
    assert sampling == {"max_new_tokens": 16}


@pytest.mark.parametrize(
    ("variant", "bare"), [("nano", True), ("mini", True), ("MINI", True), ("m3", False), ("xl32", False)]
)
def test_models_trained_on_phantoms_are_asked_their_questions_as_they_were_trained(variant: str, bare: bool) -> None:
    """nano and mini learned unsuffixed phantom questions; the published variants get the LLaVA-1.5 short suffix."""
    item = EvalItem("q1", "phantom", (), "Is there a lesion in this CT image?", "yes", "closed")
    prompt = render_prompt(item, prompts_for(variant))
    assert (prompt == item.question) is bare and prompt.startswith(item.question)
