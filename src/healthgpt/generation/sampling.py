"""Decoding settings, and their per-row form: every row of one batch keeps its own temperature, top-k, top-p,
repetition penalty and seed as tensors (and a generator), so rows with any mix of settings share one step.

The arithmetic is transformers' (`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`) done for all rows at once; a row gets the same scores as those processors give it alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


class RowSampling:
    """The settings of `rows` batch rows as tensors [rows]; `set` gives a row its settings (a seeded row its own
    generator), `clear` empties it. Which rows sample, and with what, is also kept on the host, so choosing tokens
    never reads the device."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.device = device
        self.params: list[SamplingParams | None] = [None] * rows
        self.temperature = torch.ones(rows, device=device)
        self.top_k = torch.ones(rows, dtype=torch.long, device=device)  # 0: off
        self.top_p = torch.ones(rows, device=device)
        self.keep_mass = torch.zeros(rows, device=device)  # 1 - top_p, in Python's precision as transformers has it
        self.penalty = torch.ones(rows, device=device)
        self.generators: dict[int, torch.Generator] = {}  # seeded sampled rows
        self._unseeded = torch.empty(0, dtype=torch.long, device=device)  # unseeded sampled rows
        self._flags = (False, False, False, False)  # any sampled row, any top-k, any top-p, any penalty

    def set(self, row: int, params: SamplingParams) -> None:
        """Give `row` the settings `params` (a seeded sampled row gets a new generator seeded with its seed)."""
        self.params[row] = params
        self.temperature[row] = params.temperature or 1.0
        self.top_k[row] = params.top_k or 0
        self.top_p[row] = params.top_p or 1.0
        self.keep_mass[row] = 1 - (params.top_p or 1.0)
        self.penalty[row] = params.repetition_penalty or 1.0
        self.generators.pop(row, None)
        if not params.greedy and params.seed is not None:
            self.generators[row] = torch.Generator(device=self.device).manual_seed(params.seed)
        self._refresh()

    def clear(self, row: int) -> None:
        """Forget `row`'s settings (its slot was freed)."""
        self.params[row] = None
        self.generators.pop(row, None)
        self._refresh()

    def _refresh(self) -> None:
        live = [(i, p) for i, p in enumerate(self.params) if p is not None]
        sampled = [(i, p) for i, p in live if not p.greedy]
        unseeded = [i for i, p in sampled if p.seed is None]
        self._unseeded = torch.tensor(unseeded, dtype=torch.long, device=self.device)
        self._flags = (
            bool(sampled),
            any(p.top_k is not None for _, p in sampled),
            any(p.top_p is not None and p.top_p < 1 for _, p in sampled),
            any(p.repetition_penalty not in (None, 1.0) for _, p in live),
        )

    @property
    def penalizes(self) -> bool:
        """Whether some row has a repetition penalty (only then are generated tokens tracked)."""
        return self._flags[3]

    def penalize(self, scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Scores [B, V] with each row's repetition penalty on the tokens it generated (`seen` [B, V] bool)."""
        penalty = self.penalty[:, None]
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(seen, penalized, scores)

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores [B, V] after each row's temperature, top-k and top-p (rows without them are left as they are)."""
        _, any_top_k, any_top_p, _ = self._flags
        warped = scores / self.temperature[:, None]
        if any_top_k:
            k = self.top_k.clamp(max=scores.shape[-1])
            kth = warped.sort(dim=-1, descending=True).values.gather(1, (k - 1).clamp(min=0)[:, None])
            warped = warped.masked_fill((warped < kth) & (k > 0)[:, None], float("-inf"))
        if any_top_p:
            ascending, order = warped.sort(dim=-1, descending=False)
            remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= self.keep_mass[:, None]
            remove[:, -1] = False
            remove = remove.scatter(1, order, remove) & (self.top_p < 1)[:, None]
            warped = warped.masked_fill(remove, float("-inf"))
        return warped

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Each row's token [B] from its processed scores [B, V]: the argmax for greedy rows, a draw from the
        warped scores for sampled ones (seeded rows from their own generator)."""
        token = scores.argmax(dim=-1)
        if not self._flags[0]:
            return token
        probs = self.warp(scores).softmax(dim=-1)
        if len(self._unseeded):
            token[self._unseeded] = torch.multinomial(probs[self._unseeded], 1).squeeze(-1)
        for row, generator in self.generators.items():
            token[row] = torch.multinomial(probs[row : row + 1], 1, generator=generator)[0, 0]
        return token
