"""Constrained image spans: exactly `span_length` code tokens between the start and end image tokens.

A logits processor of ours (transformers has none that follows each row through a span). Each row's state picks its
row of a table of banned tokens built once: a few tensor ops per step, no boolean indexing and no reads to the host,
so a step never waits for the device.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ..tokens import ImageVocab


class ImageSpanConstraint(LogitsProcessor):
    """Inside an image span only code tokens are allowed until exactly `span_length` codes, then the end token is
    forced; outside a span code/end tokens are banned, and the start token only where images may be generated."""

    # Row states, each with its row of the table of banned tokens: outside a span (start token banned / allowed),
    # inside a span needing a code, inside a span needing the end token.
    OUTSIDE, MAY_START, NEED_CODE, NEED_END = range(4)

    def __init__(self, vocab: ImageVocab, span_length: int, in_span: torch.Tensor, allow_start: torch.Tensor) -> None:
        self.vocab = vocab
        self.span_length = span_length
        self.in_span = in_span.clone()  # [B] bool
        self.allow_start = allow_start.clone()  # [B] bool
        self.count = torch.zeros_like(in_span, dtype=torch.long)  # codes emitted in the current span
        self._banned: torch.Tensor | None = None

    def _table(self, scores: torch.Tensor) -> torch.Tensor:
        """[4, V] bool: the tokens each row state bans."""
        if self._banned is None:
            v = self.vocab
            codes = slice(v.first_code_id, v.first_code_id + v.num_codes)
            allowed = torch.zeros((4, scores.shape[-1]), dtype=torch.bool)
            allowed[self.OUTSIDE] = True
            allowed[self.OUTSIDE, codes] = False
            allowed[self.OUTSIDE, [v.start_id, v.end_id, v.newline_id]] = False
            allowed[self.MAY_START] = allowed[self.OUTSIDE]
            allowed[self.MAY_START, v.start_id] = True
            allowed[self.NEED_CODE, codes] = True
            allowed[self.NEED_END, v.end_id] = True
            self._banned = (~allowed).to(scores.device)
        return self._banned

    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.Tensor) -> torch.Tensor:
        inside = self.NEED_CODE + (self.count >= self.span_length).long()
        state = torch.where(self.in_span, inside, self.allow_start.long())  # OUTSIDE = 0, MAY_START = 1
        # masked_fill, not an additive bias: guided logits hold NaN (-inf minus -inf) in the columns a state bans
        return scores.masked_fill(self._table(scores)[state], float("-inf"))

    def update(self, tokens: torch.Tensor) -> torch.Tensor:
        """Advance each row's span state with the token it just produced; returns which rows closed a span."""
        v = self.vocab
        closed = self.in_span & (tokens == v.end_id)
        opened = ~self.in_span & (tokens == v.start_id)
        is_code = (tokens >= v.first_code_id) & (tokens < v.first_code_id + v.num_codes)
        self.count = (self.count + (self.in_span & is_code).long()).masked_fill(closed | opened, 0)
        self.in_span = (self.in_span & ~closed) | opened
        return closed
