"""Answer scoring that counts every item: closed yes/no, closed choice, open (recall/F1/exact) and MCQ.

Unlike the LLaVA-Med scorer most medical VLM papers copy, an answer that cannot be parsed (empty, "normal",
a hedge) is wrong and stays in the denominator, and "no" is matched as a word, never as a substring.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from healthgpt.evaluation.items import (
    MMMU_MED,
    OMNIMEDVQA,
    PATHVQA,
    SLAKE,
    VQA_RAD,
    EvalItem,
    option_letters,
)

SCORING_VERSION = "1"
OPEN_METRICS = ("recall", "f1", "exact", "match")
YES_WORDS = frozenset({"yes", "yeah", "yep"})
NO_WORDS = frozenset({"no", "nope"})
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBERS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())
}
_PUNCT = re.compile(r"[^\w\s]|_")
# Table 1 of the paper: (column, dataset, statistic); OMVQA is the mean over Table 9's seven modalities.
TABLE1_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("VQA-RAD close", VQA_RAD, "closed"),
    ("VQA-RAD all", VQA_RAD, "all"),
    ("SLAKE close", SLAKE, "closed"),
    ("SLAKE all", SLAKE, "all"),
    ("PathVQA close", PATHVQA, "closed"),
    ("PathVQA all", PATHVQA, "all"),
    ("MMMU-Med", MMMU_MED, "accuracy"),
    ("OMVQA", OMNIMEDVQA, "modality_mean"),
)
OMVQA_MODALITIES = ("CT", "X-ray", "FDM", "MiS", "OCT", "MRI", "USS")


def normalize(text: str) -> str:
    """Lower-case, punctuation to spaces, articles dropped, number words (zero..twelve) to digits."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def parse_yes_no(text: str) -> str | None:
    """'yes'/'no' by the first word, else by a lone yes- or no-word anywhere; None when neither."""
    words = normalize(text).split()
    if not words:
        return None
    if words[0] in YES_WORDS:
        return "yes"
    if words[0] in NO_WORDS:
        return "no"
    has_yes, has_no = bool(YES_WORDS.intersection(words)), bool(NO_WORDS.intersection(words))
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


def phrase_in(phrase: str, text: str) -> bool:
    """Whether normalised `phrase` occurs in normalised `text` as whole words."""
    p, t = normalize(phrase), normalize(text)
    return bool(p) and f" {p} " in f" {t} "


def parse_choice(text: str, options: tuple[str, ...]) -> str | None:
    """The option letter an answer picks: by letter ("B", "(B)", "B. x", "answer is B") or by option text."""
    letters = option_letters(len(options))
    raw = text.strip()
    m = re.fullmatch(r"[(\[]?([A-Za-z])[)\].:]?", raw)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    m = re.match(r"[(\[]?([A-Z])(?:[)\].:]|$)", raw)
    if m and m.group(1) in letters:
        return m.group(1)
    m = re.search(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:\-]?\s*[(\[]?([A-Z])\b", raw)
    if m and m.group(1) in letters:
        return m.group(1)
    m = re.match(r"([A-Z])\s+(.+)", raw)
    if m and m.group(1) in letters and normalize(m.group(2)) == normalize(options[letters.index(m.group(1))]):
        return m.group(1)
    norm = normalize(raw)
    exact = [letter for letter, opt in zip(letters, options, strict=True) if normalize(opt) == norm and norm]
    if len(exact) == 1:
        return exact[0]
    found = [(letter, opt) for letter, opt in zip(letters, options, strict=True) if phrase_in(opt, raw)]
    # "bacterial pneumonia" also contains the option "pneumonia": keep only the longest matches.
    found = [(lt, o) for lt, o in found if not any(o != o2 and phrase_in(o, o2) for _, o2 in found)]
    return found[0][0] if len(found) == 1 else None


def open_scores(prediction: str, answer: str) -> dict[str, float]:
    """Token recall (share of ground-truth tokens in the answer), precision, F1, exact match; normalised."""
    pred, gold = normalize(prediction).split(), normalize(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    recall = common / len(gold) if gold else float(not pred)
    precision = common / len(pred) if pred else float(not gold)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"recall": recall, "precision": precision, "f1": f1, "exact": float(pred == gold)}


@dataclass(frozen=True)
class ItemScore:
    """How one answer scored: `correct` (right/wrong, for every kind) and `score` (its share of "all")."""

    id: str
    dataset: str
    kind: str
    correct: bool
    score: float
    parsed: str | None = None
    recall: float | None = None
    f1: float | None = None
    exact: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accepted_answers(item: EvalItem) -> list[str]:
    """The answer plus any alternatives the dataset lists (MMMU open answers may be a python-list string)."""
    extra = item.meta.get("accepted_answers", [])
    return [item.answer, *extra]


def score_item(item: EvalItem, prediction: str, *, open_metric: str = "recall") -> ItemScore:
    """Score one answer; for open items `score` is `open_metric`, `correct` = an accepted answer is in it."""
    if open_metric not in OPEN_METRICS:
        raise ValueError(f"open_metric must be one of {OPEN_METRICS}, got {open_metric!r}")
    base = {"id": item.id, "dataset": item.dataset, "kind": item.kind}
    if item.kind == "mcq":
        parsed = parse_choice(prediction, item.options)
        correct = parsed == item.answer_letter
        return ItemScore(**base, correct=correct, score=float(correct), parsed=parsed)
    if item.kind == "closed":
        gold = normalize(item.answer)
        if gold in ("yes", "no"):
            parsed = parse_yes_no(prediction)
            correct = parsed == gold
        else:
            correct = any(phrase_in(a, prediction) for a in accepted_answers(item))
            parsed = None
        return ItemScore(**base, correct=correct, score=float(correct), parsed=parsed)
    scores = max((open_scores(prediction, a) for a in accepted_answers(item)), key=lambda s: s["f1"])
    match = any(phrase_in(a, prediction) for a in accepted_answers(item))
    value = float(match) if open_metric == "match" else scores[open_metric]
    return ItemScore(
        **base, correct=match, score=value, recall=scores["recall"], f1=scores["f1"], exact=scores["exact"]
    )


def _pct(values: Iterable[float]) -> float | None:
    vals = list(values)
    return 100.0 * sum(vals) / len(vals) if vals else None


def _group(scores: list[ItemScore]) -> dict[str, Any]:
    return {
        "n": len(scores),
        "accuracy": _pct(s.correct for s in scores),
        "all": _pct(s.score for s in scores),
    }


def _dataset_metrics(pairs: list[tuple[EvalItem, ItemScore]]) -> dict[str, Any]:
    scores = [s for _, s in pairs]
    out = _group(scores)
    closed = [s for s in scores if s.kind == "closed"]
    if closed:
        yes_no = [s for i, s in pairs if s.kind == "closed" and normalize(i.answer) in ("yes", "no")]
        out["closed"] = {
            "n": len(closed),
            "accuracy": _pct(s.correct for s in closed),
            "yes_no_n": len(yes_no),
            "unparsed": sum(s.parsed is None for s in yes_no),
        }
    opened = [s for s in scores if s.kind == "open"]
    if opened:
        out["open"] = {
            "n": len(opened),
            "recall": _pct(s.recall or 0.0 for s in opened),
            "f1": _pct(s.f1 or 0.0 for s in opened),
            "exact": _pct(s.exact or 0.0 for s in opened),
            "match": _pct(s.correct for s in opened),
        }
    mcq = [s for s in scores if s.kind == "mcq"]
    if mcq:
        out["mcq"] = {
            "n": len(mcq),
            "accuracy": _pct(s.correct for s in mcq),
            "unparsed": sum(s.parsed is None for s in mcq),
        }
    for key, attr in (("by_modality", "modality"), ("by_question_type", "question_type")):
        groups: dict[str, list[ItemScore]] = defaultdict(list)
        for item, s in pairs:
            if getattr(item, attr):
                groups[getattr(item, attr)].append(s)
        if groups:
            out[key] = {name: _group(g) for name, g in sorted(groups.items())}
    modality = out.get("by_modality", {})
    present = [m for m in OMVQA_MODALITIES if m in modality]
    if present:
        out["modality_mean"] = sum(modality[m]["accuracy"] for m in present) / len(present)
        out["modality_mean_of"] = present
    return out


def summarize(items: list[EvalItem], predictions: Mapping[str, str], *, open_metric: str = "recall") -> dict[str, Any]:
    """Metrics (percent) per dataset, breakdowns by modality and question type, and the paper's Table-1 row.

    Every item counts: an item with no prediction raises, an unparseable one is wrong.
    """
    missing = [it.id for it in items if it.id not in predictions]
    if missing:
        raise KeyError(f"{len(missing)} items have no prediction, e.g. {missing[:3]}")
    by_dataset: dict[str, list[tuple[EvalItem, ItemScore]]] = defaultdict(list)
    for item in items:
        by_dataset[item.dataset].append((item, score_item(item, predictions[item.id], open_metric=open_metric)))
    datasets = {name: _dataset_metrics(pairs) for name, pairs in sorted(by_dataset.items())}
    return {
        "datasets": datasets,
        "table1": table1(datasets),
        "scoring": {"version": SCORING_VERSION, "open_metric": open_metric, "percent": True},
    }


def item_scores(
    items: list[EvalItem], predictions: Mapping[str, str], *, open_metric: str = "recall"
) -> list[ItemScore]:
    """Per-item scores, in item order (for error analysis)."""
    return [score_item(it, predictions[it.id], open_metric=open_metric) for it in items]


def table1(datasets: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """The paper's Table-1 columns from per-dataset metrics; "Avg" only when all eight columns are present."""
    row: dict[str, float | None] = {}
    for column, dataset, stat in TABLE1_COLUMNS:
        metrics = datasets.get(dataset, {})
        value = metrics.get(stat, {}).get("accuracy") if stat == "closed" else metrics.get(stat)
        row[column] = value
    values = [v for v in row.values() if v is not None]
    row["Avg"] = sum(values) / len(values) if len(values) == len(TABLE1_COLUMNS) else None
    return row
