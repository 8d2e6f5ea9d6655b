"""Batched, resumable benchmark runs: predictions appended as they come, settings and metrics beside them.

A run folder holds `run.json` (what was run: the caller's model/weights/sampling info, prompts, scoring,
item set), `predictions.jsonl` (one line per item, flushed per batch), `scores.jsonl`, `metrics.json` and
`metrics.md`. Rerunning into the same folder skips ids already answered; a half-written last line (a crash
mid-write) is cut off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from healthgpt import __version__
from healthgpt.errors import HealthGPTError
from healthgpt.evaluation.items import EvalItem, Predictor
from healthgpt.evaluation.prompts import DEFAULT_PROMPTS, PromptSet, render_prompt
from healthgpt.evaluation.report import metrics_markdown
from healthgpt.evaluation.scoring import OPEN_METRICS, SCORING_VERSION, item_scores, summarize
from healthgpt.io.atomic import write_atomic
from healthgpt.io.ledger import appending, read_ledger

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.jsonl"
METRICS_FILE = "metrics.json"
METRICS_MD_FILE = "metrics.md"
# Keys of run.json that must match when a run is resumed (the rest are timestamps and environment).
_IDENTITY_KEYS = ("run_info", "prompts", "scoring", "items")


class RunMismatchError(HealthGPTError):
    """A run folder already holds predictions made with other settings or another item set."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (for recording weight files in `run_info`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def items_fingerprint(items: list[EvalItem]) -> dict[str, Any]:
    """Count, per-dataset counts and a SHA-256 of the items' ids, questions, answers and options."""
    rows = [[it.id, it.dataset, it.kind, it.question, it.answer, list(it.options)] for it in items]
    digest = hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()
    per_dataset: dict[str, int] = {}
    for it in items:
        per_dataset[it.dataset] = per_dataset.get(it.dataset, 0) + 1
    return {"count": len(items), "per_dataset": dict(sorted(per_dataset.items())), "sha256": digest}


def read_predictions(path: str | Path) -> dict[str, dict[str, Any]]:
    """Prediction records by id; cuts a half-written last line off the file, raises on any other damage."""
    return read_ledger(path, unique=True)


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, so a crash never leaves half a file."""
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _batches(items: list[EvalItem], size: int) -> Iterable[list[EvalItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _start_run(out_dir: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The run record: checked against an existing run.json (resume) or written fresh."""
    path = out_dir / RUN_FILE
    if not path.exists() and (out_dir / PREDICTIONS_FILE).exists():
        raise RunMismatchError(f"{out_dir} holds predictions but no {RUN_FILE}: what made them is unknown")
    if path.exists():
        run = json.loads(path.read_text(encoding="utf-8"))
        differing = [k for k in _IDENTITY_KEYS if run.get(k) != identity[k]]
        if differing:
            raise RunMismatchError(f"{out_dir} holds a run with different {differing}; use a new folder")
        run["resumed_at"] = [*run.get("resumed_at", []), _now()]
    else:
        run = {
            **identity,
            "harness": {
                "healthgpt": __version__,
                "python": sys.version.split()[0],
                "platform": platform.platform(),
            },
            "started_at": _now(),
        }
    _write_json(path, run)
    return run


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def model_predictor(answer: Callable[..., list[str]], **sampling: Any) -> Predictor:
    """A predictor over a batched `answer([(images, question), ...], **sampling)` (as `HealthGPT.answer`): every
    image of each item, in order, and its rendered prompt."""

    def predict(items: list[EvalItem]) -> list[str]:
        return list(answer([(it.load_images(), it.prompt) for it in items], **sampling))

    return predict


def run_eval(
    predictor: Predictor,
    items: list[EvalItem],
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    run_info: dict[str, Any],
    prompts: PromptSet = DEFAULT_PROMPTS,
    open_metric: str = "recall",
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every item not yet answered in `out_dir`, then score all of them; returns the metrics.

    `run_info` is the caller's record of what is evaluated (model name, weight hashes, sampling settings);
    a resumed run must pass the same `run_info`, `prompts`, `open_metric` and items.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if open_metric not in OPEN_METRICS:
        raise ValueError(f"open_metric must be one of {OPEN_METRICS}, got {open_metric!r}")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    identity = {
        "run_info": json.loads(json.dumps(run_info)),  # fails early if not JSON; normalises tuples
        "prompts": prompts.to_dict(),
        "scoring": {"version": SCORING_VERSION, "open_metric": open_metric},
        "items": items_fingerprint(items),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _start_run(out_dir, identity)
    pred_path = out_dir / PREDICTIONS_FILE
    done = read_predictions(pred_path)
    unknown = set(done) - set(ids)
    if unknown:
        raise RunMismatchError(f"{pred_path} holds ids not in this item set, e.g. {sorted(unknown)[:3]}")
    todo = [it for it in items if it.id not in done]
    with (
        appending(pred_path, lambda record: json.dumps(record, ensure_ascii=False)) as write,
        tqdm(total=len(items), initial=len(done), disable=not progress, desc="eval") as bar,
    ):
        for batch in _batches(todo, batch_size):
            prompted = [dataclasses.replace(it, prompt=render_prompt(it, prompts)) for it in batch]
            answers = predictor(prompted)
            if len(answers) != len(prompted) or not all(isinstance(a, str) for a in answers):
                raise TypeError(f"predictor must return one str per item; got {answers!r:.200}")
            lines = [
                {"id": it.id, "dataset": it.dataset, "kind": it.kind, "prompt": it.prompt, "prediction": a}
                for it, a in zip(prompted, answers, strict=True)
            ]
            write(lines)
            bar.update(len(batch))
    return score_run(out_dir, items, run=run, open_metric=open_metric)


def score_run(
    out_dir: str | Path,
    items: list[EvalItem],
    *,
    run: dict[str, Any] | None = None,
    open_metric: str = "recall",
) -> dict[str, Any]:
    """Score a run folder's predictions against `items`; writes scores.jsonl, metrics.json and metrics.md."""
    out_dir = Path(out_dir)
    run = run if run is not None else json.loads((out_dir / RUN_FILE).read_text(encoding="utf-8"))
    predictions = {k: rec["prediction"] for k, rec in read_predictions(out_dir / PREDICTIONS_FILE).items()}
    metrics = summarize(items, predictions, open_metric=open_metric)
    scores = item_scores(items, predictions, open_metric=open_metric)
    write_atomic(out_dir / SCORES_FILE, "".join(json.dumps(s.to_dict()) + "\n" for s in scores))
    _write_json(out_dir / METRICS_FILE, metrics)
    write_atomic(out_dir / METRICS_MD_FILE, metrics_markdown(metrics, run))
    _write_json(out_dir / RUN_FILE, {**run, "finished_at": _now()})
    return metrics
