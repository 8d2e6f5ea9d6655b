"""Training records from LLaVA conversation JSON/JSONL, VL-Health files and HF `datasets` (json, parquet, hub).

A record is one conversation (`human`/`gpt` turns, one or more `<image>`s in the human turns), a task type
(`comprehension` or `generation`, which selects the plugin and the visual depth) and, for generation, a target
image (a file whose VQ codes `tokenize_images` caches) or inline `target_codes`. Every record is checked when
it is read; a malformed one is reported with its file, line and index, then skipped or raised (`on_error`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from healthgpt.config import COMPREHENSION, GENERATION
from healthgpt.errors import HealthGPTError
from healthgpt.templates import place_images
from healthgpt.tokens import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

# A record trains one of the two H-LoRA plugins (REFERENCE §2.4); named tasks (ct2mri, ...) live in healthgpt.tasks.
PLUGIN_TASKS = (COMPREHENSION, GENERATION)
OnError = Literal["skip", "raise"]
Source = str | os.PathLike[str] | Sequence[Mapping[str, Any]]
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# Names a record may use for each field; the first one present wins (override with `field_map`).
_FIELDS: dict[str, tuple[str, ...]] = {
    "id": ("id",),
    "task": ("task", "task_type"),
    "image": ("image", "images"),
    "conversations": ("conversations",),
    "target_image": ("target_image",),
    "target_codes": ("target_codes",),
}


class DataError(HealthGPTError):
    """A malformed training record (raised with `on_error="raise"`); the message names the file and line."""


@dataclass(frozen=True)
class Origin:
    """Where a record comes from: file (or dataset name), 0-based index, 1-based line when known, its id."""

    source: str
    index: int
    line: int | None = None
    id: str | None = None

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        ident = f", id {self.id!r}" if self.id is not None else ""
        return f"{where} (record {self.index}{ident})"


@dataclass(frozen=True)
class DataIssue:
    """One rejected record and why."""

    origin: Origin
    problem: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.problem}"


@dataclass(frozen=True)
class Record:
    """A checked conversation: alternating (`user`|`assistant`, text) turns, user first and assistant last;
    `images` in order of their `<image>` placeholders; generation records carry a target."""

    task: str
    turns: tuple[tuple[str, str], ...]
    images: tuple[Path, ...]
    origin: Origin
    target_image: Path | None = None
    target_codes: tuple[int, ...] | None = None


@dataclass
class RecordSet:
    """The records that passed the checks and the issues of those that did not."""

    records: list[Record] = field(default_factory=list)
    issues: list[DataIssue] = field(default_factory=list)


def _reject(issue: DataIssue, on_error: OnError, issues: list[DataIssue]) -> None:
    if on_error == "raise":
        raise DataError(str(issue))
    log.warning("skipping %s", issue)
    issues.append(issue)


def _field(raw: Mapping[str, Any], name: str, field_map: Mapping[str, str]) -> Any:
    keys = (field_map[name],) if name in field_map else _FIELDS[name]
    return next((raw[k] for k in keys if k in raw), None)


def _normalise_user(text: str) -> tuple[str, int]:
    """LLaVA's rule: a turn's `<image>` placeholders move to its start, one `<image>\\n` each (as the published
    inference does; `SampleBuilder` moves them after the text for a model with `images_after_text`)."""
    count = text.count(IMAGE_PLACEHOLDER)
    if not count:
        return text, 0
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return place_images(rest, count, after_text=False), count


def parse_record(
    raw: Any,
    origin: Origin,
    image_folder: Path,
    *,
    default_task: str | None = None,
    field_map: Mapping[str, str] | None = None,
    check_files: bool = True,
) -> Record:
    """Check one raw record and normalise it; raises `DataError` (without the location) when it is malformed."""
    if not isinstance(raw, Mapping):
        raise DataError(f"a record must be a JSON object, got {type(raw).__name__}")
    fmap = dict(field_map or {})
    target_name = _field(raw, "target_image", fmap)
    target_codes = _field(raw, "target_codes", fmap)
    task = _task(_field(raw, "task", fmap) or default_task, target_name is not None or target_codes is not None)
    turns, placeholders = _turns(_field(raw, "conversations", fmap), task)
    images = _images(_field(raw, "image", fmap), placeholders, image_folder)
    target_path = None
    if target_name is not None:
        if not isinstance(target_name, str) or not target_name:
            raise DataError(f"'target_image' must be a path, got {target_name!r:.80}")
        target_path = image_folder / target_name
    if check_files:
        missing = [str(p) for p in (*images, *([target_path] if target_path else [])) if not p.is_file()]
        if missing:
            raise DataError(f"missing image file(s): {', '.join(missing)}")
    codes = None
    if target_codes is not None:
        if not isinstance(target_codes, list) or not target_codes or not all(isinstance(c, int) for c in target_codes):
            raise DataError("'target_codes' must be a non-empty list of integers")
        codes = tuple(target_codes)
    return Record(task, tuple(turns), images, origin, target_path, codes)


def _task(given: str | None, has_target: bool) -> str:
    """The record's plugin task: given, else generation when it has a target; checked against its target."""
    task = given or (GENERATION if has_target else COMPREHENSION)
    if task not in PLUGIN_TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {list(PLUGIN_TASKS)}")
    if task == GENERATION and not has_target:
        raise DataError("a generation record needs a target: 'target_image' (a file) or 'target_codes'")
    if task == COMPREHENSION and has_target:
        raise DataError("a comprehension record has a generation target; set its task to 'generation'")
    return task


def _turns(conversations: Any, task: str) -> tuple[list[tuple[str, str]], int]:
    """(role, text) turns, alternating user/assistant and ending with the response, and the `<image>` count."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError("'conversations' must be a non-empty list of {'from', 'value'} turns")
    turns: list[tuple[str, str]] = []
    placeholders = 0
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"turn {i} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.80}")
        role, text = _ROLES[turn["from"]], turn["value"]
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"turn {i} is from {turn['from']!r}; turns must alternate human/gpt, human first")
        if role == "user":
            text, count = _normalise_user(text)
            placeholders += count
            if not text.strip():
                raise DataError(f"turn {i} (human) is empty")
        else:
            if IMAGE_PLACEHOLDER in text:
                raise DataError(f"turn {i} (gpt) contains {IMAGE_PLACEHOLDER!r}; images go in human turns")
            last = i == len(conversations) - 1
            if not text.strip() and not (task == GENERATION and last):
                raise DataError(f"turn {i} (gpt) is an empty response")
        turns.append((role, text))
    if turns[-1][0] != "assistant":
        raise DataError("the conversation must end with a gpt turn (the response to learn)")
    return turns, placeholders


def _images(image: Any, placeholders: int, image_folder: Path) -> tuple[Path, ...]:
    """The paths of the record's input images: one per `<image>` placeholder of its human turns."""
    names = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"'image' must be a path or a list of paths, got {image!r:.80}")
    if len(names) != placeholders:
        raise DataError(
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the human turns but {len(names)} image(s)"
        )
    return tuple(image_folder / n for n in names)


def _json_array_items(text: str, source: str) -> Iterator[tuple[int, Any]]:
    """(1-based line, value) of each element of a top-level JSON array, so issues can name their line."""
    decoder = json.JSONDecoder()
    pos, line = 0, 1

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos >= len(text) or text[pos] != "[":
        raise DataError(f"{source}: expected a JSON array of records (or one JSON object per line in .jsonl)")
    pos, last = skip(pos + 1), 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", last, pos)
        last = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{e.lineno}: invalid JSON ({e.msg})") from None
        yield line, value
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos < len(text) and text[pos] != "]":
            raise DataError(f"{source}:{line + text.count(chr(10), last, pos)}: expected ',' or ']' between records")


def _read_file(path: Path) -> Iterator[tuple[int | None, Any]]:
    """(line, raw record) of a .json array, .jsonl lines, or .parquet rows (line None)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    yield lineno, json.loads(text)
                except json.JSONDecodeError as e:
                    yield lineno, DataError(f"invalid JSON ({e.msg})")
    elif suffix == ".json":
        yield from _json_array_items(path.read_text(encoding="utf-8"), str(path))
    elif suffix == ".parquet":
        for row in _hf_rows("parquet", data_files=str(path)):
            yield None, row
    else:
        raise DataError(f"{path}: unsupported data file type {suffix!r}; use .json, .jsonl or .parquet")


def _hf_rows(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Rows of an HF `datasets` dataset (imported here: `datasets` is optional)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError("reading parquet files or hub datasets needs `pip install datasets`") from e
    yield from datasets.load_dataset(*args, split=kwargs.pop("split", "train"), **kwargs)


def iter_raw(source: Source, split: str = "train") -> Iterator[tuple[Origin, Any]]:
    """(origin, raw record) from a file, an HF hub dataset name (`hf://owner/name`) or an in-memory list."""
    if not isinstance(source, (str, os.PathLike)):
        for i, raw in enumerate(source):
            yield Origin("<memory>", i, None, raw.get("id") if isinstance(raw, Mapping) else None), raw
        return
    name = os.fspath(source)
    if name.startswith("hf://"):
        rows: Iterable[tuple[int | None, Any]] = ((None, row) for row in _hf_rows(name[len("hf://") :], split=split))
    else:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        rows = _read_file(path)
    for i, (line, raw) in enumerate(rows):
        ident = raw.get("id") if isinstance(raw, Mapping) else None
        yield Origin(name, i, line, None if ident is None else str(ident)), raw


def load_records(
    sources: Source | Sequence[str | os.PathLike[str]],
    *,
    image_folder: str | os.PathLike[str] | None = None,
    on_error: OnError = "skip",
    default_task: str | None = None,
    field_map: Mapping[str, str] | None = None,
    check_files: bool = True,
    split: str = "train",
) -> RecordSet:
    """Read and check records from one or several sources (see `iter_raw`).

    Image paths are relative to `image_folder`, by default the folder of each data file (the working folder for
    hub datasets and in-memory lists). A record without `task` is a generation record when it has a target.
    `field_map` renames fields, e.g. `{"target_image": "output_image"}`.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if isinstance(sources, (str, os.PathLike)):
        groups: list[Source] = [sources]
    elif sources and all(isinstance(s, (str, os.PathLike)) for s in sources):
        groups = list(sources)  # type: ignore[arg-type]
    else:
        groups = [sources]  # type: ignore[list-item]
    out = RecordSet()
    for src in groups:
        is_file = isinstance(src, (str, os.PathLike)) and not os.fspath(src).startswith("hf://")
        folder = Path(image_folder) if image_folder is not None else Path(os.fspath(src)).parent if is_file else Path()
        for origin, raw in iter_raw(src, split):
            try:
                if isinstance(raw, DataError):
                    raise raw
                out.records.append(
                    parse_record(
                        raw, origin, folder, default_task=default_task, field_map=field_map, check_files=check_files
                    )
                )
            except DataError as e:
                _reject(DataIssue(origin, str(e)), on_error, out.issues)
    if out.issues:
        log.warning("%d malformed record(s) skipped; %d kept", len(out.issues), len(out.records))
    return out
