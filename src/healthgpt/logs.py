"""Keeping optional libraries' import-time chatter out of our output.

torchao, when installed, is imported by transformers and peft too; on torch builds its compiled extensions were not
made for it logs "Failed to load ..._C_*.so" and makes torch's pytree registry warn about Enum subclasses. Neither
concerns our users, and on stderr they would break the command line's one-`error:`-line contract.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def silence_library_logs() -> None:
    """Show only errors of the noisy libraries' loggers from now on (for command-line entry points)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def quiet_library_logs() -> Iterator[None]:
    """Show only errors of the noisy libraries' loggers inside the block (an import), then restore their levels."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    silence_library_logs()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
