"""The one error raised for bad image input or output targets."""

from __future__ import annotations

from pathlib import Path


class ImageInputError(ValueError):
    """A file or folder that cannot be read or written as asked; the message names it and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}. Fix: {fix}")
        self.path = Path(path)
        self.problem = problem
        self.fix = fix

    def __reduce__(self) -> tuple[type, tuple[Path, str, str]]:
        return type(self), (self.path, self.problem, self.fix)
