"""Batching training samples: right padding, attention mask, stacked pixel values, one plugin per sample."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from healthgpt.tokens import IGNORE_INDEX


def collate(samples: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    """Stack `TrainingDataset` items: `input_ids` padded right with `pad_id`, `labels` with -100, `attention_mask`,
    `pixel_values` of all images in sample order ([N, 3, S, S] or None) and the `plugins` list."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(s["input_ids"]) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = sample["input_ids"]
        labels[row, :n] = sample["labels"]
        attention_mask[row, :n] = 1
    pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(pixels) if pixels else None,
        "plugins": [s["plugin"] for s in samples],
    }


def num_supervised(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss counts: labels after the one-position shift that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
