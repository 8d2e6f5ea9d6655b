"""Model-agnostic benchmark evaluation: loaders, prompts, scorers, resumable runs and reports.

A predictor is any `Callable[[list[EvalItem]], list[str]]`; the runner fills `item.prompt` before calling it.
"""

from healthgpt.evaluation.datasets import (
    LOADERS,
    MMMU_MED_SUBJECTS,
    load_benchmark,
    load_mmmu_med,
    load_omnimedvqa,
    load_pathvqa,
    load_slake,
    load_vqa_rad,
)
from healthgpt.evaluation.image_pairs import generation_table, score_image_pairs
from healthgpt.evaluation.items import EvalItem, Predictor
from healthgpt.evaluation.prompts import (
    DEFAULT_PROMPTS,
    PROMPT_SETS,
    VARIANT_PROMPTS,
    PromptSet,
    prompts_for,
    render_prompt,
)
from healthgpt.evaluation.report import compare_runs, metrics_markdown
from healthgpt.evaluation.runner import (
    RunMismatchError,
    model_predictor,
    read_predictions,
    run_eval,
    score_run,
    sha256_file,
)
from healthgpt.evaluation.scoring import score_item, summarize, table1

__all__ = [
    "DEFAULT_PROMPTS",
    "VARIANT_PROMPTS",
    "LOADERS",
    "MMMU_MED_SUBJECTS",
    "PROMPT_SETS",
    "EvalItem",
    "Predictor",
    "PromptSet",
    "RunMismatchError",
    "compare_runs",
    "model_predictor",
    "generation_table",
    "load_benchmark",
    "load_mmmu_med",
    "load_omnimedvqa",
    "load_pathvqa",
    "load_slake",
    "load_vqa_rad",
    "metrics_markdown",
    "read_predictions",
    "prompts_for",
    "render_prompt",
    "run_eval",
    "score_image_pairs",
    "score_item",
    "score_run",
    "sha256_file",
    "summarize",
    "table1",
]
