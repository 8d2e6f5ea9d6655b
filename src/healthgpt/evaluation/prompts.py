"""The prompt wording of each question kind, kept as data so every run records exactly what the model saw.

HealthGPT did not publish its evaluation prompts (issue #33). `short` uses the LLaVA-1.5 short-answer
suffix for VQA questions and the LLaVA/MMMU multiple-choice wording; `plain` sends VQA questions unchanged.
The wording never depends on the ground truth: a closed question is not told to answer yes/no, because
some closed questions (SLAKE "Which is bigger, the liver or the spleen?") are not yes/no.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from healthgpt.evaluation.items import EvalItem, option_letters

SHORT_ANSWER = "Answer the question using a single word or phrase."
MCQ_ANSWER = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class PromptSet:
    """Templates per item kind: `{question}` and, for mcq, `{options}` (one `option_line` per option)."""

    name: str
    closed: str
    open: str
    mcq: str
    option_line: str = "{letter}. {text}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROMPT_SETS: dict[str, PromptSet] = {
    "short": PromptSet(
        name="short",
        closed="{question}\n" + SHORT_ANSWER,
        open="{question}\n" + SHORT_ANSWER,
        mcq="{question}\n{options}\n" + MCQ_ANSWER,
    ),
    "plain": PromptSet(
        name="plain", closed="{question}", open="{question}", mcq="{question}\n{options}\n" + MCQ_ANSWER
    ),
}
DEFAULT_PROMPTS = PROMPT_SETS["short"]
# The prompt set each variant is evaluated with unless one is named. The paper did not publish its evaluation
# prompts (issue #33), so no variant has a "paper" set: m3, l14 and xl32 get `short`, the LLaVA-1.5 convention of the
# LLaVA-style data they were trained on; nano and mini get `plain`, the unsuffixed questions of their phantom training
# data (issue #14 measured nano's closed accuracy at 0% with `short`, where it answers "both" or "left", and 90% with
# `plain`).
VARIANT_PROMPTS: dict[str, str] = {"nano": "plain", "mini": "plain", "m3": "short", "l14": "short", "xl32": "short"}


def prompts_for(variant: str) -> PromptSet:
    """The default prompt set of a model variant (`short` for variants not listed)."""
    return PROMPT_SETS[VARIANT_PROMPTS.get(variant.lower(), "short")]


def render_prompt(item: EvalItem, prompts: PromptSet = DEFAULT_PROMPTS) -> str:
    """The text sent to the model for `item` under `prompts`."""
    question = item.question.strip()
    if item.kind == "mcq":
        lines = [
            prompts.option_line.format(letter=letter, text=text)
            for letter, text in zip(option_letters(len(item.options)), item.options, strict=True)
        ]
        return prompts.mcq.format(question=question, options="\n".join(lines))
    return (prompts.closed if item.kind == "closed" else prompts.open).format(question=question)
