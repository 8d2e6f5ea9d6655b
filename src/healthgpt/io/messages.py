"""Library messages made fit for one-line errors: exception text on one line, warnings kept off stderr."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def one_line(exc: BaseException) -> str:
    """`exc`'s message on one line: nibabel and pydicom spread theirs over several, ending lines with ':'."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()).removesuffix(":")


@contextmanager
def warnings_logged(path: Path) -> Iterator[None]:
    """Log the warnings pydicom and nibabel emit while reading `path` (debug level) instead of printing them.

    Not thread-safe, like every use of warnings filters, but these libraries offer no per-call switch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                log.debug("%s: %s", path, warning.message)
