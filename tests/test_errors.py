"""One error hierarchy, mapped in one place to the CLI's exit code and the server's HTTP status."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from healthgpt import HealthGPT
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
from healthgpt.serving.server import create_app
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
        (json.JSONDecodeError("bad", "{", 0), 2, 500),  # on the server, a file it reads is not the client's fault
        (FileNotFoundError("gone.png"), 2, 500),
        (PermissionError(13, "Permission denied", "/ro/out.png"), 2, 500),
        (IsADirectoryError(21, "Is a directory", "out"), 2, 500),
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


@pytest.fixture(scope="module")
def nano() -> HealthGPT:
    return HealthGPT.from_pretrained("nano")


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (CheckpointError("w.safetensors: truncated"), 400, "w.safetensors: truncated"),
        (PermissionError(13, "Permission denied", "/srv/secret/tmp.png"), 500, "internal error"),
        (RuntimeError("connect to 10.0.0.7:5432 refused"), 500, "internal error"),
    ],
    ids=["project error", "server file", "bug"],
)
def test_the_server_answers_errors_no_route_handled_by_the_same_mapping(nano, error, status, message) -> None:
    """Only the project's own errors reach the client; anything else is a bare 500 that names nothing internal."""
    app = create_app(nano)

    @app.get("/boom")
    async def boom() -> None:
        raise error

    response = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert response.status_code == status and response.json()["error"]["message"] == message
