"""Markdown reports: one run's metrics (Table-1 row, per-dataset details, breakdowns); runs side by side."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from healthgpt.evaluation.scoring import TABLE1_COLUMNS

_TABLE1_HEADERS = [c for c, _, _ in TABLE1_COLUMNS] + ["Avg"]
# (header, path into a dataset's metrics)
_DATASET_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("n", ("n",)),
    ("close", ("closed", "accuracy")),
    ("open recall", ("open", "recall")),
    ("open F1", ("open", "f1")),
    ("open exact", ("open", "exact")),
    ("MCQ", ("mcq", "accuracy")),
    ("accuracy", ("accuracy",)),
    ("all", ("all",)),
)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.1f}"


def _get(data: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_markdown(metrics: Mapping[str, Any], run: Mapping[str, Any]) -> str:
    """One run as markdown: what was run, the Table-1 row, per-dataset metrics and breakdowns (percent)."""
    info = run.get("run_info", {})
    parts = [
        f"# Evaluation: {info.get('model', 'unnamed model')}",
        f"prompts `{run.get('prompts', {}).get('name')}`, open items scored by "
        f'`{metrics["scoring"]["open_metric"]}` in "all", scoring v{metrics["scoring"]["version"]}; '
        f"{run.get('items', {}).get('count')} items.",
        "## Table 1",
        _table(_TABLE1_HEADERS, [[metrics["table1"].get(h) for h in _TABLE1_HEADERS]]),
        "## Per dataset",
        _table(
            ["dataset"] + [h for h, _ in _DATASET_COLUMNS],
            [[name] + [_get(m, p) for _, p in _DATASET_COLUMNS] for name, m in metrics["datasets"].items()],
        ),
    ]
    for name, m in metrics["datasets"].items():
        for key, title in (("by_modality", "modality"), ("by_question_type", "question type")):
            if key in m:
                parts.append(f"### {name} by {title}")
                parts.append(
                    _table(
                        [title, "n", "accuracy", "all"],
                        [[g, v["n"], v["accuracy"], v["all"]] for g, v in m[key].items()],
                    )
                )
    return "\n\n".join(parts) + "\n"


def compare_runs(run_dirs: Iterable[str | Path], labels: Sequence[str] | None = None) -> str:
    """Runs side by side: their settings and item sets, Table-1 rows, then one table per dataset. Runs are labelled
    `labels`, else by folder name (by path as given where two folders share a name): several runs of one model differ
    by folder, not by model name."""
    runs = []
    dirs = list(map(Path, run_dirs))
    names = [d.name for d in dirs]
    for d in dirs:
        metrics = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
        run = json.loads((d / "run.json").read_text(encoding="utf-8"))
        runs.append((d.name if names.count(d.name) == 1 else str(d), metrics, run))
    if labels is not None:
        if len(labels) != len(runs):
            raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
        runs = [(label, m, r) for label, (_, m, r) in zip(labels, runs, strict=True)]
    names = sorted({name for _, m, _ in runs for name in m["datasets"]})
    parts = [
        "## Runs",
        _table(
            ["run", "prompts", "open metric", "items", "item set"],
            [
                [
                    label,
                    r["prompts"]["name"],
                    m["scoring"]["open_metric"],
                    r["items"]["count"],
                    r["items"]["sha256"][:12],
                ]
                for label, m, r in runs
            ],
        ),
        "## Table 1",
        _table(
            ["run", *_TABLE1_HEADERS],
            [[label] + [m["table1"].get(h) for h in _TABLE1_HEADERS] for label, m, _ in runs],
        ),
    ]
    for name in names:
        parts.append(f"### {name}")
        parts.append(
            _table(
                ["run"] + [h for h, _ in _DATASET_COLUMNS],
                [[label] + [_get(m["datasets"].get(name, {}), p) for _, p in _DATASET_COLUMNS] for label, m, _ in runs],
            )
        )
    return "\n\n".join(parts) + "\n"
