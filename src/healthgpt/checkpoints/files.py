"""Reading weight files safely (`.bin` without unpickling code, safetensors memory-mapped), dtype names, and the
the check that no tensor holds NaN or infinity (the strict key check is `healthgpt.state_keys`)."""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..errors import CheckpointError
from ..hub import WeightsNotFoundError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (`float32`, `bfloat16`, `float16`, or the published `FP32`/`FP16`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----- files -------------------------------------------------------------------------------------------------------
def load_state_file(path: str | Path) -> dict[str, Tensor]:
    """A memory-mapped tensor dict from a `.safetensors` file or a `torch.save` file (`.bin`/`.pt`, read with
    `weights_only=True`: only tensors are unpickled, no code runs). Tensors with NaN or inf are refused."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: weight file not found; check the path (or download it from the Hub)")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # torch reports bytes that are no pickle at all the same way
            raise CheckpointError(f"{path}: not a weight file (unreadable bytes); download or write it again") from e
        raise CheckpointError(
            f"{path}: holds Python objects other than tensors ({found.group(1)}); refusing to unpickle them, as that "
            "could run code. Fix: save its tensors as .safetensors with the tool that wrote it"
        ) from e
    except Exception as e:  # torch.load raises many types (KeyError, RuntimeError, ...) on bytes that are no weights
        raise CheckpointError(
            f"{path}: cannot read the weights ({type(e).__name__}: {e}); the file may be truncated or not a "
            "weight file — download or write it again"
        ) from e
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    check_finite(state, str(path))
    return dict(state)


def check_finite(state: Mapping[str, Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf: the model would answer nothing or noise instead of failing."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{source}: tensor {key} holds NaN or infinite values; the file is damaged or comes from a diverged "
                "run: use another checkpoint"
            )
