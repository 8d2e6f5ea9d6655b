"""`batch`: JSONL in, JSONL out, resumable (finished ids are skipped; results are appended and flushed)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..tasks import TASKS, check_image_input, resolve_instruction

if TYPE_CHECKING:
    from ..api import HealthGPT
    from ..io import MedicalImage

from .. import jsonout
from .common import ImageOptions, ModelOptions, Overwrite, SamplingOptions, T, chunks, command
from .outputs import check_image_output, check_output, output_path


# ----- batch -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """One input row: a question to ask, or an instruction (task name or free text) to generate an image from."""

    id: str | int
    image: Path | None
    question: str | None = None
    instruction: str | None = None
    text: str | None = None
    output: str | None = None  # as written in the input, for the result line
    output_path: Path | None = None  # resolved against the input's folder


def _job(row: Any, where: str, base: Path) -> _Job:
    """One checked input row: an object with an id, an optional image and one of question / task / instruction."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    job_id, image, output = row.get("id"), row.get("image"), row.get("output")
    if not isinstance(job_id, (str, int)) or isinstance(job_id, bool):
        raise ValueError(f'{where}: needs an "id" (a string or an integer)')
    if image is not None and not (isinstance(image, str) and image):
        raise ValueError(f'{where}: "image" must be a path')
    kinds = [k for k in ("question", "task", "instruction") if row.get(k) is not None]
    if len(kinds) != 1 or not isinstance(row[kinds[0]], str) or not row[kinds[0]].strip():
        raise ValueError(f'{where}: give exactly one non-empty "question", "task" or "instruction"')
    kind, value = kinds[0], row[kinds[0]]
    image_path = base / image if image else None
    if kind == "question":
        return _Job(job_id, image_path, question=value)
    if kind == "task" and value not in TASKS:
        raise ValueError(f'{where}: unknown task {value!r}; use one of {", ".join(TASKS)}, or "instruction"')
    try:
        _, preset = resolve_instruction(value, row.get("text"))
        check_image_input(preset, image_path is not None)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not (isinstance(output, str) and output):
        raise ValueError(f'{where}: a generate row needs an "output" path (.png, .nii.gz or a folder)')
    return _Job(job_id, image_path, instruction=value, text=row.get("text"), output=output, output_path=base / output)


def _read_jobs(path: Path) -> list[_Job]:
    """Every row of the input JSONL, all checked (unique ids and outputs) before any work starts."""
    jobs: list[_Job] = []
    ids: set[Any] = set()
    outputs: dict[Path, Any] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        job = _job(row, where, path.parent)
        if job.id in ids:
            raise ValueError(f"{where}: id {job.id!r} appears twice; ids must be unique")
        ids.add(job.id)
        if job.output_path is not None and outputs.setdefault(job.output_path, job.id) != job.id:
            raise ValueError(f"{where}: output {job.output!r} is also the output of id {outputs[job.output_path]!r}")
        jobs.append(job)
    if not jobs:
        raise ValueError(f"{path}: no rows")
    return jobs


def _attempt(call: Callable[[list[T]], list[Any]], items: list[T]) -> list[Any]:
    """`call(items)` as one batch; if the batch is refused as bad input, item by item, so that only the bad items
    fail (their result is the exception)."""
    try:
        return call(items)
    except ValueError as exc:
        if len(items) == 1:
            return [exc]
        return [_attempt(call, [item])[0] for item in items]


@dataclass(frozen=True)
class _Settings:
    """How every row runs: image options, guidance, sampling, rows per model call, whether outputs are replaced and
    progress shown."""

    view: ImageOptions
    guidance_scale: float | None
    sampling: dict[str, Any]
    batch_size: int
    overwrite: bool
    progress: bool


def _pending(jobs: Sequence[_Job], results: Path, retry_failed: bool) -> tuple[list[_Job], int]:
    """(the rows `results` holds no result of, or with `retry_failed` an error; the number of errors it keeps)."""
    from ..io.atomic import check_target
    from ..io.ledger import read_ledger

    check_target(results, overwrite=True)  # appended to: may exist
    done = read_ledger(results, ids={job.id for job in jobs})
    if retry_failed:
        done = {key: row for key, row in done.items() if "error" not in row}
    return [job for job in jobs if job.id not in done], sum("error" in row for row in done.values())


def _check_row_outputs(jobs: Sequence[_Job], overwrite: bool) -> tuple[list[_Job], list[dict[str, Any]]]:
    """(the rows to run, {"id", "error"} results of those whose output cannot be written), before any model loads."""
    todo, refused = [], []
    for job in jobs:
        try:
            if job.output_path is not None:
                check_image_output(job.output_path, overwrite=overwrite, inputs=[job.image])
            todo.append(job)
        except ValueError as exc:
            refused.append({"id": job.id, "error": str(exc)})
    return todo, refused


def _run_jobs(
    health: HealthGPT, jobs: Sequence[_Job], settings: _Settings, write: Callable[[list[dict]], None], total: int
) -> int:
    """Run `jobs` (the rest of `total` rows) in batched model calls of rows sharing one instruction, writing each
    result as soon as it is done; returns how many failed."""
    from tqdm.auto import tqdm

    groups: dict[tuple[str | None, str | None], list[_Job]] = {}
    for job in jobs:
        groups.setdefault((job.instruction, job.text), []).append(job)
    failed = 0
    with tqdm(total=total, initial=total - len(jobs), unit="row", disable=not settings.progress) as bar:
        for group in groups.values():
            for chunk in chunks(group, settings.batch_size):
                for job, outcome in _run_chunk(health, chunk, settings):
                    write([{"id": job.id, **outcome}])
                    failed += "error" in outcome
                bar.update(len(chunk))
    return failed


def _run_chunk(health: HealthGPT, jobs: Sequence[_Job], settings: _Settings) -> Iterator[tuple[_Job, dict[str, Any]]]:
    """(row, result) for rows sharing one instruction (or all questions): one batched model call; a row with bad
    input gets {"error": message}."""
    from ..io import write_images

    ready: list[tuple[_Job, MedicalImage | None]] = []
    for job in jobs:
        try:
            source = settings.view.load(job.image) if job.image is not None else None
            if job.output_path is not None:
                check_output(job.output_path, source, overwrite=settings.overwrite, inputs=[job.image])
            ready.append((job, source))
        except ValueError as exc:
            yield job, {"error": str(exc)}
    if not ready:
        return
    pictures = [source.to_pil() if source is not None else None for _, source in ready]
    first, sampling = ready[0][0], settings.sampling
    if first.question is not None:
        questions = [job.question for job, _ in ready]
        outcomes = _attempt(
            lambda rows: health.ask([p for p, _ in rows], [q for _, q in rows], **sampling),
            list(zip(pictures, questions, strict=True)),
        )
    else:
        outcomes = _attempt(
            lambda rows: health.generate_image(
                rows,
                first.instruction,
                text=first.text,
                guidance_scale=settings.guidance_scale,
                progress=False,
                **sampling,
            ),
            pictures,
        )
    for (job, source), outcome in zip(ready, outcomes, strict=True):
        if isinstance(outcome, Exception):
            yield job, {"error": str(outcome)}
        elif job.question is not None:
            yield job, {"answer": outcome}
        else:
            try:
                with output_path(job.output_path, overwrite=settings.overwrite) as target:
                    write_images([outcome.image], source, target)
            except ValueError as exc:
                yield job, {"error": str(exc)}
                continue
            yield job, {"output": job.output, "instruction": outcome.instruction, "task": outcome.task}


@command
def batch(
    rows: Annotated[
        Path,
        typer.Argument(
            help='Input JSONL, one object per line: {"id", "image", "question"} to ask, or {"id", "image", "task" or '
            '"instruction", "text", "output"} to generate (output: .png, .nii.gz or a folder). Relative paths '
            "start at this file's folder.",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ],
    results: Annotated[
        Path,
        typer.Argument(
            help='Output JSONL, appended to: {"id", "answer"}, {"id", "output", "instruction", "task"} or {"id", '
            '"error"}. Ids already there are skipped, so re-running resumes an interrupted batch; with '
            "--retry-failed, ids whose last result is an error are run again (the new line supersedes it).",
            dir_okay=False,
            show_default=False,
        ),
    ],
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per batched model call.")] = 8,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help="Classifier-free guidance for generate rows; default: the model's own.", show_default=False),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress on stderr.")] = True,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed/--keep-failed", help="Run again the rows whose last result is an error (once fixed)."
        ),
    ] = False,
    overwrite: Overwrite = False,
    *,
    model: ModelOptions,
    sampling: SamplingOptions,
    view: ImageOptions,
) -> None:
    """Run many asks and generations from a JSONL file, resumably.

    Each result is appended and flushed as soon as it is done, so an interrupted run loses nothing written, and a
    re-run skips the ids already there (except failed ones with --retry-failed). Rows with bad input get an "error"
    result; the command then exits with 2."""
    from ..io.ledger import appending

    jobs = _read_jobs(rows)
    pending, failed = _pending(jobs, results, retry_failed)
    todo, refused = _check_row_outputs(pending, overwrite)
    settings = _Settings(view, guidance_scale, sampling.kwargs(), batch_size, overwrite, progress)
    with appending(results, lambda record: jsonout.dumps(record, ensure_ascii=False)) as write:
        write(refused)
        if todo:
            failed += _run_jobs(model.load(), todo, settings, write, len(jobs))
    failed += len(refused)
    if failed:
        raise ValueError(
            f"{failed} of {len(jobs)} rows failed; their lines in {results} say why (fix them, then re-run with "
            "--retry-failed)"
        )
