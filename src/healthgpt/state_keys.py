"""The one strict state-dict check of every loader (released files, our bundle, the VQGAN): exactly the expected
keys, each with the expected shape, or an error listing what does not fit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .errors import CheckpointError


def _listing(what: str, items: Sequence[str], first: int = 5) -> str:
    more = f", ... ({len(items) - first} more)" if len(items) > first else ""
    return f"{len(items)} {what}: " + ", ".join(items[:first]) + more


def check_keys(state: Mapping[str, Tensor], expected: Mapping[str, torch.Size], source: str, what: str) -> None:
    """Raise `CheckpointError` unless `state` has exactly the `expected` keys with the expected shapes; the message
    lists the first missing, unused and mis-shaped keys with their counts."""
    missing = sorted(expected.keys() - state.keys())
    unused = sorted(state.keys() - expected.keys())
    wrong = [
        f"{k} (file {list(state[k].shape)}, model {list(s)})"
        for k, s in expected.items()
        if k in state and state[k].shape != s
    ]
    problems = [
        _listing(name, items)
        for name, items in (("missing", missing), ("unused", unused), ("with the wrong shape", wrong))
        if items
    ]
    if problems:
        raise CheckpointError(f"{source}: does not fit {what}: " + "; ".join(problems))
