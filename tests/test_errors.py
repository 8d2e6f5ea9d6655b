"""One error hierarchy, mapped in one place to the CLI's exit code and the server's HTTP status."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from healthgpt.checkpoints import CheckpointError as FromCheckpoints
from healthgpt.data.records import DataError
from healthgpt.errors import (
    CheckpointError,
    HealthGPTError,
    ImageInputError,
    ImageRejected,
    RemoteImageError,
    exit_code,
    http_status,
)
from healthgpt.hlora import HLoRAStateError
from healthgpt.io import ImageInputError as FromIO
from healthgpt.templates import PromptError
from healthgpt.training.checkpointing import CheckpointError as FromTraining
from healthgpt.training.stages import RecipeError
from healthgpt.vqgan import CheckpointError as FromVQGAN
from healthgpt.vqgan import VQGANError

SRC = Path(__file__).resolve().parents[1] / "src" / "healthgpt"


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [
        (CheckpointError("w.safetensors: truncated"), 2, 400),
        (ImageInputError("x.png", "is empty", "export it again"), 2, 400),
        (RemoteImageError("image 1: not fetched"), 2, 400),
        (PromptError("empty question"), 2, 400),
        (json.JSONDecodeError("bad", "{", 0), 2, 400),
        (FileNotFoundError("gone.png"), 2, 400),
        (PermissionError(13, "Permission denied", "/ro/out.png"), 2, 400),
        (IsADirectoryError(21, "Is a directory", "out"), 2, 400),
        (RuntimeError("a bug"), 1, 500),
        (KeyError("a bug"), 1, 500),
    ],
)
def test_errors_map_to_exit_code_and_http_status(error: Exception, code: int, status: int) -> None:
    assert (exit_code(error), http_status(error)) == (code, status)


def test_every_project_error_is_one_class_in_the_hierarchy() -> None:
    assert FromCheckpoints is FromTraining is FromVQGAN is CheckpointError
    assert FromIO is ImageInputError
    for error in (DataError, RecipeError, PromptError, HLoRAStateError, VQGANError, ImageRejected, RemoteImageError):
        assert issubclass(error, HealthGPTError), error
    defined: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Rejected")):
                defined.setdefault(node.name, []).append(str(path.relative_to(SRC)))
    assert {name: files for name, files in defined.items() if len(files) > 1} == {}
    assert defined["CheckpointError"] == ["errors.py"] and defined["ImageInputError"] == ["errors.py"]
