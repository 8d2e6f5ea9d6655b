"""Decoding settings and the logits processors (transformers' own) that carry them out."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; `temperature == 0` (the default, as published) means greedy."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def processors(self, constraint: LogitsProcessor | None = None) -> LogitsProcessorList:
        """Penalty, then the constraint (before the warpers, so top-k/top-p only see allowed tokens), then the
        temperature/top-k/top-p warpers of transformers."""
        procs = LogitsProcessorList()
        if self.repetition_penalty not in (None, 1.0):
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if constraint is not None:
            procs.append(constraint)
        if not self.greedy:
            procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k is not None:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs
