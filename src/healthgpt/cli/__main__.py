"""`python -m healthgpt.cli`."""

from . import app

app()
