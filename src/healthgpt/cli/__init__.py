"""The `healthgpt` command line: thin commands over the Python API.

Nothing heavy is imported here: torch and transformers load inside the commands that need a model, so
`healthgpt --help` stays fast. Outputs are written atomically, so a failed command leaves no partial file.
"""

from . import batch, evaluate, infer, inspect_cmds, serve, train  # noqa: F401  (importing registers commands)
from .common import app

__all__ = ["app"]
