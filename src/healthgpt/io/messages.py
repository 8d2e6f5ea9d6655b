"""Library messages made fit for one-line errors: exception text on one line, warnings kept off stderr."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def one_line(exc: BaseException) -> str:
    """`exc`'s message on one line: nibabel and pydicom spread theirs over several, ending lines with ':'."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()).removesuffix(":")


@contextmanager
def warnings_logged(path: Path) -> Iterator[None]:
    """Log the warnings pydicom and nibabel emit in this thread while reading `path` (debug level) instead of printing
    them; the libraries offer no per-call switch.

    Thread-safe, unlike `warnings.catch_warnings` (the server reads uploads in a thread pool): while any thread is
    inside, `warnings.showwarning` hands each warning to the innermost block of the thread that raised it, and shows
    other threads' warnings as before. The filters are not changed, so a warning repeated at the same place may be
    logged once."""
    caught: list[Warning | str] = []
    blocks = _thread.__dict__.setdefault("blocks", [])
    blocks.append(caught)
    _route(+1)
    try:
        yield
    finally:
        _route(-1)
        blocks.pop()
        for message in caught:
            log.debug("%s: %s", path, one_line(message) if isinstance(message, Warning) else message)


_thread = threading.local()  # .blocks: the lists of this thread's open `warnings_logged` blocks
_lock = threading.Lock()
_routing = {"blocks": 0, "previous": warnings.showwarning}


def _route(change: int) -> None:
    """Count an open block in or out: the first installs `_show`, the last puts back what it replaced."""
    with _lock:
        if change > 0 and _routing["blocks"] == 0:
            _routing["previous"] = warnings.showwarning
            warnings.showwarning = _show
        _routing["blocks"] += change
        if change < 0 and _routing["blocks"] == 0 and warnings.showwarning is _show:
            warnings.showwarning = _routing["previous"]


def _show(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    blocks = getattr(_thread, "blocks", None)
    if blocks:
        blocks[-1].append(message)
    else:
        _routing["previous"](message, category, filename, lineno, file, line)
