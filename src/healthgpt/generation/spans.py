"""Constrained image spans: exactly `span_length` code tokens between the start and end image tokens.

A logits processor of ours (transformers has none that follows each row through a span). Everything is tensor
arithmetic on masks built once, with no boolean indexing and no reads to the host, so a step never waits for the
device.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ..tokens import ImageVocab


class ImageSpanConstraint(LogitsProcessor):
    """Inside an image span only code tokens are allowed until exactly `span_length` codes, then the end token is
    forced; outside a span code/end tokens are banned, and the start token only where images may be generated."""

    def __init__(self, vocab: ImageVocab, span_length: int, in_span: torch.Tensor, allow_start: torch.Tensor) -> None:
        self.vocab = vocab
        self.span_length = span_length
        self.in_span = in_span.clone()  # [B] bool
        self.allow_start = allow_start.clone()  # [B] bool
        self.count = torch.zeros_like(in_span, dtype=torch.long)  # codes emitted in the current span
        self._masks: dict[str, torch.Tensor] = {}

    def _token_masks(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """[V] boolean masks of the code tokens, the tokens allowed outside a span, the start and the end token."""
        if not self._masks:
            v = self.vocab

            def one(ids: list[int] | range) -> torch.Tensor:
                mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
                mask[list(ids)] = True
                return mask

            code = one(range(v.first_code_id, v.first_code_id + v.num_codes))
            image_token = code | one([v.start_id, v.end_id, v.newline_id])
            self._masks = {"code": code, "text": ~image_token, "start": one([v.start_id]), "end": one([v.end_id])}
        return self._masks

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        m = self._token_masks(scores)
        need_code = (self.in_span & (self.count < self.span_length))[:, None]  # [B, 1]
        need_end = (self.in_span & (self.count >= self.span_length))[:, None]
        may_start = (~self.in_span & self.allow_start)[:, None]
        outside = m["text"] | (may_start & m["start"])  # [B, V]
        allowed = torch.where(need_code, m["code"], torch.where(need_end, m["end"], outside))
        return scores.masked_fill(~allowed, float("-inf"))

    def update(self, tokens: torch.Tensor) -> torch.Tensor:
        """Advance each row's span state with the token it just produced; returns which rows closed a span."""
        v = self.vocab
        is_code = (tokens >= v.first_code_id) & (tokens < v.first_code_id + v.num_codes)
        closed = self.in_span & (tokens == v.end_id)
        opened = ~self.in_span & (tokens == v.start_id)
        counted = torch.where(self.in_span & is_code, self.count + 1, self.count)
        self.count = torch.where(closed | opened, torch.zeros_like(counted), counted)
        self.in_span = (self.in_span & ~closed) | opened
        return closed
