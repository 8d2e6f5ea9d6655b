"""HealthGPT: medical image understanding and generation with one autoregressive LLM.

The public names below are imported on first use, so `import healthgpt` stays cheap (no torch, no transformers).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "HealthGPT": "healthgpt.api",
    "GeneratedImage": "healthgpt.api",
    "PromptTooLongError": "healthgpt.api",
    "SamplingParams": "healthgpt.generation",
    "PromptError": "healthgpt.templates",
    "CheckpointError": "healthgpt.checkpoints",
    "HealthGPTConfig": "healthgpt.config",
    "get_variant": "healthgpt.config",
    "TASKS": "healthgpt.tasks",
    "ImageInputError": "healthgpt.io",
    "MedicalImage": "healthgpt.io",
    "load_image": "healthgpt.io",
    "save_png": "healthgpt.io",
    "save_nifti": "healthgpt.io",
    "save_dicom_series": "healthgpt.io",
    "write_volume": "healthgpt.io",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'healthgpt' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
