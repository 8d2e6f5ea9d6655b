"""Resumable JSONL results: one record per finished item, appended and fsynced as it is done, read back by id.

A crash can only cut the last line short (every write ends with a newline and is flushed), so reading removes a
partial last line, whose item is then redone; any other damage is an error naming the line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


def read_ledger(
    path: str | Path, *, ids: Collection[Any] | None = None, unique: bool = False
) -> dict[Any, dict[str, Any]]:
    """The records of `path` by their "id" (a later line supersedes an earlier one unless `unique`). With `ids`, a
    record whose id is not among them is an error: the file belongs to another input. A half-written last line is
    cut off the file, but only once every complete line has been read as ours."""
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    records: dict[Any, dict[str, Any]] = {}
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{number}: not a result line ({err.msg}); give a new output file or repair this one"
            ) from None
        if not isinstance(record, dict) or (ids is not None and record.get("id") not in ids):
            raise ValueError(f"{path}:{number}: this result's id is not in the input; give a new output file")
        if unique and record["id"] in records:
            raise ValueError(f"{path}:{number}: repeats id {record['id']!r}; give a new output file")
        records[record["id"]] = record
    if len(complete) < len(data):
        log.warning("%s: dropping a half-written last line (%d bytes)", path, len(data) - len(complete))
        with path.open("r+b") as file:
            file.truncate(len(complete))
    return records


@contextmanager
def appending(path: str | Path, dumps: Callable[[Any], str]) -> Iterator[Callable[[Iterable[Any]], None]]:
    """Open `path` for appending; yield `write(records)`, which adds one `dumps(record)` line per record and
    flushes them to disk before returning, so an interrupted run loses nothing it has reported done."""
    with open(path, "a", encoding="utf-8") as file:
        yield lambda records: _write(file, [dumps(record) + "\n" for record in records])


def _write(file: IO[str], lines: list[str]) -> None:
    file.write("".join(lines))
    file.flush()
    os.fsync(file.fileno())
