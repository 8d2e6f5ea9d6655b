"""The one error hierarchy of healthgpt, and the one place that maps errors to CLI exit codes and HTTP statuses.

Every refusal of input the user can fix (a file, a flag, a request) is a `HealthGPTError`: the CLI exits 2 with one
`error:` line, the server answers 4xx. Anything else is a bug: exit 1, HTTP 500. The classes subclass `ValueError`
so callers that catch `ValueError` keep working."""

from __future__ import annotations

from pathlib import Path

INPUT_EXIT_CODE = 2
INTERNAL_EXIT_CODE = 1


class HealthGPTError(ValueError):
    """Bad input the user can fix; the message names what is wrong and how to fix it."""

    http_status = 400


class InputFileError(HealthGPTError):
    """A file or folder that cannot be read or written as asked: `<path>: <problem>. Fix: <fix>`."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}. Fix: {fix}")
        self.path = Path(path)
        self.problem = problem
        self.fix = fix

    def __reduce__(self) -> tuple[type, tuple[Path, str, str]]:
        return type(self), (self.path, self.problem, self.fix)


class ImageInputError(InputFileError):
    """An image file (or picture) that cannot be read, shown to the model or written as asked."""


class CheckpointError(HealthGPTError):
    """A weight file or training checkpoint that is unreadable, tampered with, or does not fit the model."""


class ImageRejected(HealthGPTError):
    """An image in a server request that will not be read; the message says why without internal details."""


class RemoteImageError(ImageRejected):
    """A remote image URL that the server will not fetch (not allowed, unreachable, too slow or too large)."""


def is_input_error(exc: BaseException) -> bool:
    """True for errors the user caused and can fix (exit 2 / HTTP 4xx): the hierarchy above, `ValueError` (which
    it extends, as do pydantic and json errors) and a missing or unwritable file."""
    return isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError))


def exit_code(exc: BaseException) -> int:
    """The CLI exit code of an error: 2 for bad input, 1 for anything else."""
    return INPUT_EXIT_CODE if is_input_error(exc) else INTERNAL_EXIT_CODE


def http_status(exc: BaseException) -> int:
    """The HTTP status of an error: its own for the hierarchy, 500 for anything else. A missing or unwritable file
    on the server is the server's fault, not the client's, unlike on the command line."""
    return exc.http_status if isinstance(exc, HealthGPTError) else 500
