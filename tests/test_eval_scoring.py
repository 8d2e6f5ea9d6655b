"""Scorer rules on hand-computed values: every item counts, "normal" is not "no", MCQ by letter or text."""

import pytest

from healthgpt.evaluation.items import EvalItem
from healthgpt.evaluation.prompts import PROMPT_SETS, render_prompt
from healthgpt.evaluation.scoring import (
    normalize,
    open_scores,
    parse_choice,
    parse_yes_no,
    score_item,
    summarize,
    table1,
)


def _item(i, answer, kind="closed", dataset="vqa-rad", options=(), modality=""):
    return EvalItem(
        id=str(i),
        dataset=dataset,
        images=(),
        question="q?",
        answer=answer,
        kind=kind,
        options=options,
        modality=modality,
    )


def test_normalize_case_punctuation_articles_numbers():
    assert normalize("The Liver.") == "liver"
    assert normalize("  Two   lesions, an  X-ray!") == "2 lesions x ray"


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("YES, there is a mass in the left lung", "yes"),
        ("No.", "no"),
        ("no, it is normal", "no"),
        ("There is no fracture.", "no"),
        ("normal", None),
        ("abnormal", None),
        ("", None),
        ("   ", None),
        ("I am not sure", None),
        ("there is no doubt, yes", None),
    ],
)
def test_parse_yes_no(text, parsed):
    assert parse_yes_no(text) == parsed


def test_normal_is_not_a_no():
    assert score_item(_item(1, "no"), "normal").correct is False
    assert score_item(_item(1, "No"), "No.").correct is True
    assert score_item(_item(1, "yes"), "Yes.").correct is True


def test_wrong_and_unparseable_yes_no_answers_stay_in_the_denominator():
    items = [_item(1, "yes"), _item(2, "yes"), _item(3, "no"), _item(4, "no")]
    preds = {"1": "Yes", "2": "no", "3": "", "4": "normal"}
    closed = summarize(items, preds)["datasets"]["vqa-rad"]["closed"]
    # 1 right of 4; LLaVA-Med's scorer would drop "normal"/"" and count "normal" as containing "no".
    assert closed == {"n": 4, "accuracy": 25.0, "yes_no_n": 4, "unparsed": 2}


def test_closed_choice_question_matches_the_answer_phrase():
    item = _item(1, "Liver")
    assert score_item(item, "The liver.").correct is True
    assert score_item(item, "spleen").correct is False
    assert score_item(item, "liverish").correct is False  # whole words only


def test_open_recall_f1_exact_hand_computed():
    # gold: left lower lobe (3 tokens); pred normalised: lower lobe of left lung (5 tokens); 3 in common
    s = open_scores("The lower lobe of the left lung", "left lower lobe")
    assert s["recall"] == 1.0
    assert s["precision"] == pytest.approx(3 / 5)
    assert s["f1"] == pytest.approx(2 * 0.6 * 1.0 / 1.6)
    assert s["exact"] == 0.0
    s = open_scores("upper lobe", "right upper lobe")
    assert (s["recall"], s["precision"], s["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert open_scores("Two.", "2")["exact"] == 1.0
    assert open_scores("", "left lung") == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "exact": 0.0}


def test_open_item_score_uses_the_chosen_metric():
    item = _item(1, "right upper lobe", kind="open")
    assert score_item(item, "upper lobe").score == pytest.approx(2 / 3)
    assert score_item(item, "upper lobe", open_metric="f1").score == pytest.approx(0.8)
    assert score_item(item, "upper lobe", open_metric="exact").score == 0.0
    assert score_item(item, "in the right upper lobe", open_metric="match").score == 1.0
    with pytest.raises(ValueError):
        score_item(item, "x", open_metric="bleu")


OPTIONS = ("Pneumonia", "Bacterial pneumonia", "Fracture", "Normal")


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B. Bacterial pneumonia", "B"),
        ("The answer is B.", "B"),
        ("Answer: (B)", "B"),
        ("bacterial pneumonia", "B"),  # option text; "pneumonia" inside it is not a second match
        ("It shows a bacterial pneumonia.", "B"),
        ("Pneumonia", "A"),
        ("A pneumonia", "A"),
        ("A large opacity", None),  # "A" is an article here
        ("Fracture or normal", None),
        ("", None),
        ("E", None),
    ],
)
def test_parse_choice(text, letter):
    assert parse_choice(text, OPTIONS) == letter


def test_mcq_answered_with_the_option_text_counts_and_empty_is_wrong():
    item = _item(1, "Bacterial pneumonia", kind="mcq", options=OPTIONS)
    assert item.answer_letter == "B"
    assert score_item(item, "Bacterial pneumonia.").correct is True
    assert score_item(item, "B").correct is True
    assert score_item(item, "A").correct is False
    assert score_item(item, "").correct is False
    assert summarize([item], {"1": ""})["datasets"]["vqa-rad"]["mcq"] == {
        "n": 1,
        "accuracy": 0.0,
        "unparsed": 1,
    }


def test_all_mixes_closed_accuracy_and_open_recall():
    items = [_item(1, "yes"), _item(2, "no"), _item(3, "right upper lobe", kind="open")]
    m = summarize(items, {"1": "yes", "2": "yes", "3": "upper lobe"})["datasets"]["vqa-rad"]
    assert m["closed"]["accuracy"] == 50.0
    assert m["all"] == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(100 / 3)  # the open answer does not contain the whole phrase
    assert m["open"]["recall"] == pytest.approx(200 / 3)
    assert m["open"]["f1"] == pytest.approx(80.0)


def test_missing_prediction_raises():
    with pytest.raises(KeyError):
        summarize([_item(1, "yes")], {})


def test_omvqa_is_the_mean_over_modalities_and_breakdowns_count():
    opts = ("CT", "MRI")
    items = [
        _item(1, "CT", kind="mcq", dataset="omnimedvqa", options=opts, modality="CT"),
        _item(2, "CT", kind="mcq", dataset="omnimedvqa", options=opts, modality="MRI"),
        _item(3, "CT", kind="mcq", dataset="omnimedvqa", options=opts, modality="MRI"),
        _item(4, "CT", kind="mcq", dataset="omnimedvqa", options=opts, modality="MRI"),
        _item(5, "CT", kind="mcq", dataset="omnimedvqa", options=opts, modality="Dermoscopy"),
    ]
    m = summarize(items, {"1": "A", "2": "A", "3": "B", "4": "B", "5": "B"})
    ds = m["datasets"]["omnimedvqa"]
    assert ds["accuracy"] == pytest.approx(40.0)
    assert ds["by_modality"]["MRI"] == {
        "n": 3,
        "accuracy": pytest.approx(100 / 3),
        "all": pytest.approx(100 / 3),
    }
    # Table 9's seven modalities only (Dermoscopy is not one), each weighing the same: (100 + 33.3) / 2
    assert ds["modality_mean_of"] == ["CT", "MRI"]
    assert m["table1"]["OMVQA"] == pytest.approx((100 + 100 / 3) / 2)
    assert m["table1"]["Avg"] is None


def test_table1_average_reproduces_the_paper_row():
    # HealthGPT-M3, Table 1: 73.7 55.9 74.6 56.4 78.7 39.7 43.3 68.5 -> Avg 61.3
    datasets = {
        "vqa-rad": {"closed": {"accuracy": 73.7}, "all": 55.9},
        "slake": {"closed": {"accuracy": 74.6}, "all": 56.4},
        "pathvqa": {"closed": {"accuracy": 78.7}, "all": 39.7},
        "mmmu-med": {"accuracy": 43.3},
        "omnimedvqa": {"modality_mean": 68.5},
    }
    row = table1(datasets)
    assert row["PathVQA all"] == 39.7
    assert round(row["Avg"], 1) == 61.3


def test_prompts_list_options_and_never_leak_the_answer():
    item = _item(1, "Fracture", kind="mcq", options=OPTIONS)
    assert render_prompt(item) == (
        "q?\nA. Pneumonia\nB. Bacterial pneumonia\nC. Fracture\nD. Normal\n"
        "Answer with the option's letter from the given choices directly."
    )
    closed_yes, closed_no = _item(1, "yes"), _item(2, "no")
    assert (
        render_prompt(closed_yes)
        == render_prompt(closed_no)
        == "q?\nAnswer the question using a single word or phrase."
    )
    assert render_prompt(closed_yes, PROMPT_SETS["plain"]) == "q?"
