"""JSON that every parser accepts: NaN and infinities (a diverged loss, an image of -inf) become null, since
`json.dumps` would otherwise write the non-standard `NaN` / `-Infinity`."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every non-finite float (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `finite(value)`; refuses rather than writes non-standard JSON."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
