"""The `healthgpt` command line: thin commands over the Python API.

Flags come from typed signatures. The option groups several commands share (model, sampling, image) are frozen
dataclasses that `_command` expands into each command's flags. Nothing heavy is imported here: torch and
transformers load inside the commands that need a model, so `healthgpt --help` stays fast.

Exit codes: 0 ok, 2 bad usage or input (one `error:` line on stderr), 1 internal error (`--debug` shows the
traceback). Outputs are written atomically, so a failed command leaves no partial file.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_type_hints

import typer

from .tasks import TASKS, resolve_instruction

if TYPE_CHECKING:
    from PIL import Image

    from .api import HealthGPT
    from .io import MedicalImage

app = typer.Typer(
    help="HealthGPT: ask questions about medical images and generate images with one model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

NANO = "nano"
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_MODEL, _SAMPLING, _IMAGE = "Model", "Sampling", "Image"
T = TypeVar("T")


# ----- option groups -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelOptions:
    """Which weights to load, in what precision, on which device."""

    model: Annotated[
        str,
        typer.Option(
            help="'nano' (the built-in model with random weights, for trying things out), a bundle folder written by "
            "`healthgpt convert`, a folder of official files, a variant (m3, l14, xl32; with --base-model, "
            "--vision-tower, --plugin-file) or a Hub id (lintw/HealthGPT-M3).",
            rich_help_panel=_MODEL,
        ),
    ] = NANO
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Weight precision: float32, bfloat16 or float16 (default: the checkpoint's).", rich_help_panel=_MODEL
        ),
    ] = None
    device: Annotated[str, typer.Option(help="Where to run: cpu, cuda, cuda:1, mps.", rich_help_panel=_MODEL)] = "cpu"
    base_model: Annotated[
        str | None,
        typer.Option(help="Folder (or Hub id) of the base LLM, e.g. Phi-3-mini-4k-instruct.", rich_help_panel=_MODEL),
    ] = None
    vision_tower: Annotated[
        str | None,
        typer.Option(help="Folder (or Hub id) of the CLIP vision tower.", rich_help_panel=_MODEL),
    ] = None
    plugin_file: Annotated[
        list[str] | None,
        typer.Option(
            help="PLUGIN=PATH, repeatable: an official H-LoRA file, e.g. comprehension=com_hlora_weights.bin "
            "or generation=gen_hlora_weights.bin.",
            rich_help_panel=_MODEL,
        ),
    ] = None
    fusion_file: Annotated[
        Path | None,
        typer.Option(
            help="The official fusion_layer_weights.bin (needed by the generation plugin).", rich_help_panel=_MODEL
        ),
    ] = None
    variant: Annotated[
        str | None,
        typer.Option(
            help="m3, l14 or xl32: the variant of a folder of official files whose names do not say.",
            rich_help_panel=_MODEL,
        ),
    ] = None
    vqgan: Annotated[
        Path | None,
        typer.Option(
            help="VQGAN folder or taming last.ckpt (needed to decode generated images).", rich_help_panel=_MODEL
        ),
    ] = None

    def __post_init__(self) -> None:
        """Check what can be checked before anything loads: PLUGIN=PATH specs, and that named files exist."""
        from .config import VARIANTS

        given = [(f"--plugin-file {name}=", path) for name, path in self.plugin_files().items()]
        given += [("--fusion-file ", self.fusion_file), ("--vqgan ", self.vqgan)]
        for flag, path in given:
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"{flag}{path}: no such file")
        for flag, source in (
            ("--model", self.model),
            ("--base-model", self.base_model),
            ("--vision-tower", self.vision_tower),
        ):
            if source is None or source == NANO or source.lower() in VARIANTS or Path(source).exists():
                continue
            from .hub import is_repo_id

            if not is_repo_id(source):
                raise FileNotFoundError(
                    f"{flag} {source}: no such folder, and not a variant name or a Hub id (owner/name)"
                )
        if self.model == NANO:
            extra = [k for k, v in self.load_kwargs().items() if k != "dtype"]
            if extra:
                raise ValueError(
                    f"--{extra[0].replace('_', '-')} applies to checkpoints, not to the built-in nano model"
                )

    def plugin_files(self) -> dict[str, Path]:
        """`--plugin-file PLUGIN=PATH` as {plugin: path}."""
        pairs = [spec.partition("=") for spec in self.plugin_file or []]
        for spec, (name, sep, path) in zip(self.plugin_file or [], pairs, strict=True):
            if not (name and sep and path):
                raise ValueError(f"--plugin-file {spec!r}: use PLUGIN=PATH, e.g. comprehension=com_hlora_weights.bin")
        return {name: Path(path) for name, _, path in pairs}

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `HealthGPT.from_pretrained` / `convert_official` that were given."""
        given = dict(
            base_model=self.base_model,
            vision_tower=self.vision_tower,
            plugin_files=self.plugin_files() or None,
            fusion_file=self.fusion_file,
            variant=self.variant,
            vqgan=self.vqgan,
            dtype=self.dtype,
        )
        return {k: v for k, v in given.items() if v is not None}

    def load(self) -> HealthGPT:
        """The model these options name."""
        from .api import HealthGPT

        if self.model != NANO:
            return HealthGPT.from_pretrained(self.model, device=self.device, **self.load_kwargs())
        return HealthGPT.random(NANO).to(device=self.device, dtype=self.dtype)

    def convert(self, output: Path, *, include_base: bool) -> None:
        """Write the model these options name as a bundle at `output`."""
        if self.model == NANO:
            if not include_base:
                raise ValueError("the nano model has no base folders to refer to: add --include-base")
            self.load().save_pretrained(output, include_base=True)
            return
        from .checkpoints import convert_official

        convert_official(output, self.model, include_base=include_base, device=self.device, **self.load_kwargs())


@dataclass(frozen=True)
class SamplingOptions:
    """Decoding settings; those not given keep the API's defaults (greedy, 512 new tokens)."""

    max_new_tokens: Annotated[
        int | None, typer.Option(help="Longest answer in tokens (default: 512).", rich_help_panel=_SAMPLING)
    ] = None
    temperature: Annotated[
        float | None,
        typer.Option(
            help="0 decodes greedily (the published setting); above 0 samples (default: 0).", rich_help_panel=_SAMPLING
        ),
    ] = None
    top_p: Annotated[
        float | None,
        typer.Option(help="Nucleus sampling: keep the smallest set of tokens of this mass.", rich_help_panel=_SAMPLING),
    ] = None
    top_k: Annotated[
        int | None, typer.Option(help="Sample among the k likeliest tokens.", rich_help_panel=_SAMPLING)
    ] = None
    repetition_penalty: Annotated[
        float | None, typer.Option(help="Above 1 discourages repeating tokens.", rich_help_panel=_SAMPLING)
    ] = None
    seed: Annotated[
        int | None, typer.Option(help="Seed for sampling, for repeatable runs.", rich_help_panel=_SAMPLING)
    ] = None

    def kwargs(self) -> dict[str, Any]:
        """The settings given, as keyword arguments of the API's sampling methods."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class ImageOptions:
    """How an image file becomes the picture the model sees."""

    window: Annotated[
        str | None,
        typer.Option(
            help="Display window: a preset (lung, mediastinum, soft_tissue, brain, bone, liver), 'multi' "
            "(three CT windows as RGB), 'percentile' or 'CENTER,WIDTH' such as 40,400 (default: the file's own, "
            "else soft tissue for CT, else percentiles).",
            rich_help_panel=_IMAGE,
        ),
    ] = None
    slice_index: Annotated[
        int | None,
        typer.Option(
            "--slice",
            help="Slice of a volume (NIfTI, DICOM series folder, multi-frame DICOM) (default: the middle one).",
            rich_help_panel=_IMAGE,
        ),
    ] = None
    axis: Annotated[
        str | None,
        typer.Option(
            help="Reslice a volume: axial, coronal, sagittal, or RAS axis 0, 1, 2 (default: NIfTI axial, DICOM "
            "its own stack).",
            rich_help_panel=_IMAGE,
        ),
    ] = None
    frame: Annotated[
        int | None,
        typer.Option(
            help="Volume of a 4D NIfTI, frame of a multi-frame DICOM or page of a multi-page image (default: 0).",
            rich_help_panel=_IMAGE,
        ),
    ] = None

    def load(self, path: Path, *, all_slices: bool = False) -> MedicalImage:
        """The image at `path` (one slice, or the whole volume if `all_slices`), windowed as asked."""
        from .io import load_image

        if all_slices and self.slice_index is not None:
            raise ValueError("--all-slices and --slice exclude each other: give one")
        axis = int(self.axis) if self.axis is not None and self.axis.isdigit() else self.axis
        index = "all" if all_slices else self.slice_index
        return load_image(path, window=self.window, slice_index=index, axis=axis, frame=self.frame)

    def picture(self, path: Path | None) -> Image.Image | None:
        """The 8-bit RGB picture of one slice of `path` (None without a path)."""
        return None if path is None else self.load(path).to_pil()


_GROUPS = (ModelOptions, SamplingOptions, ImageOptions)


def _command(func: Callable[..., None]) -> Callable[..., None]:
    """Register `func` as a command. Its parameters typed with an option group get that group's flags; `--debug` is
    added. Bad input ends the command with one `error:` line and exit code 2, anything else with exit code 1."""
    signature = inspect.signature(func, eval_str=True)
    groups = {name: p.annotation for name, p in signature.parameters.items() if p.annotation in _GROUPS}
    params = [p for p in signature.parameters.values() if p.name not in groups]
    for group in groups.values():
        hints = get_type_hints(group, include_extras=True)
        params += [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
            for f in fields(group)
        ]
    debug = Annotated[bool, typer.Option("--debug/--no-debug", help="Show the full traceback of errors.")]
    params.append(inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=debug))

    @functools.wraps(func)
    def run(**kwargs: Any) -> None:
        show_traceback = kwargs.pop("debug")
        try:
            for name, group in groups.items():
                kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in fields(group)})
            func(**kwargs)
        except Exception as exc:
            if show_traceback:
                raise
            _fail(exc)

    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return app.command()(run)


def _fail(exc: Exception) -> None:
    """Print one `error:` line and exit: 2 for bad input (ValueError and its kin: ImageInputError, PromptError,
    CheckpointError; a missing file), 1 for anything else."""
    if isinstance(exc, (ValueError, FileNotFoundError)):
        code, message = 2, str(exc)
    else:
        code, message = 1, f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback"
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _require_questions(questions: Iterable[str]) -> None:
    """Refuse empty questions before any model loads."""
    for i, question in enumerate(questions, 1):
        if not question.strip():
            raise ValueError(f"question {i} is empty: give a non-empty question")


def _echo_stream(pieces: Iterable[str]) -> str:
    """Print a streamed reply as it grows, without leading or trailing whitespace; returns what was printed."""
    text = shown = ""
    for piece in pieces:
        text += piece
        ready = text.strip()
        if len(ready) > len(shown):
            sys.stdout.write(ready[len(shown) :])
            sys.stdout.flush()
            shown = ready
    sys.stdout.write("\n")
    sys.stdout.flush()
    return shown


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ----- ask, chat ---------------------------------------------------------------------------------------------------
@_command
def ask(
    image: Annotated[
        Path,
        typer.Argument(
            help="Image: PNG/JPEG/TIFF/BMP, a DICOM file or series folder, or NIfTI (.nii, .nii.gz).",
            show_default=False,
        ),
    ],
    question: Annotated[
        list[str],
        typer.Argument(help="One or more questions; several are answered in one batched call, one answer per line."),
    ],
    system: Annotated[str | None, typer.Option(help="System prompt (default: the model's).")] = None,
    *,
    model: ModelOptions,
    sampling: SamplingOptions,
    view: ImageOptions,
) -> None:
    """Answer questions about a medical image."""
    _require_questions(question)
    picture = view.picture(image)
    health = model.load()
    if len(question) == 1:
        _echo_stream(health.stream(picture, question[0], system=system, **sampling.kwargs()))
        return
    for answer in health.ask(picture, question, system=system, **sampling.kwargs()):
        typer.echo(answer)


@_command
def chat(
    image: Annotated[
        Path | None,
        typer.Argument(help="Image the conversation is about (optional); same formats as `ask`.", show_default=False),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt (default: the model's).")] = None,
    *,
    model: ModelOptions,
    sampling: SamplingOptions,
    view: ImageOptions,
) -> None:
    """Talk about an image over several turns.

    Reads one message per line from stdin (a terminal or a pipe) and prints each reply on stdout; `/reset` starts a
    new conversation, `/quit` (or the end of input) ends."""
    picture = view.picture(image)
    health = model.load()
    prompt = "you> " if sys.stdin.isatty() else ""
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            return
        if line == "/quit":
            return
        if line == "/reset":
            messages = []
            typer.echo("(new conversation)", err=True)
        elif line.startswith("/"):
            typer.echo(f"error: unknown command {line!r}: use /reset or /quit", err=True)
        elif line:
            turn = [*messages, {"role": "user", "content": line}]
            try:
                pieces = health.stream_chat(turn, picture, system=system, **sampling.kwargs())
            except ValueError as exc:  # e.g. the conversation outgrew the context: the user can /reset
                typer.echo(f"error: {exc} (/reset starts a new conversation)", err=True)
                continue
            messages = [*turn, {"role": "assistant", "content": _echo_stream(pieces)}]


# ----- generate ----------------------------------------------------------------------------------------------------
def _check_output(path: Path, source: MedicalImage | None) -> None:
    """Fail before any model work if `path` cannot hold the result: a `.png` holds one slice; `.nii`/`.nii.gz` take
    the geometry of a source with one, a folder (no suffix) becomes a DICOM series derived from a DICOM source."""
    from .io import ImageInputError

    slices = source.num_slices if source is not None else 1
    if path.suffix.lower() == ".png":
        if slices > 1:
            raise ImageInputError(path, f"a PNG holds one slice, not {slices}", "write .nii.gz or a DICOM folder")
        return
    nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    if not nifti and path.suffix:
        raise ImageInputError(
            path, f"has the unsupported output suffix {path.suffix!r}", "write .png, .nii, .nii.gz or a folder name"
        )
    if source is None or (nifti and source.affine is None) or (not nifti and not source.datasets):
        needed = "a source with geometry (DICOM or NIfTI)" if nifti else "a DICOM source"
        raise ImageInputError(path, f"this output needs {needed}", "write .png, or generate from such a source")


def _write_images(images: Sequence[Image.Image], source: MedicalImage | None, path: Path) -> None:
    """Write generated slices by `path`'s suffix (atomically): PNG, or a volume with the source's geometry."""
    from .io import save_png, write_volume

    if path.suffix.lower() == ".png":
        save_png(images[0], path)
    else:
        assert source is not None  # `_check_output` made sure
        write_volume(list(images), source, path)


@_command
def generate(
    image: Annotated[
        Path | None,
        typer.Argument(help="Source image (any `ask` format); not needed for report_to_cxr.", show_default=False),
    ] = None,
    *,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Where to write: .png; .nii or .nii.gz (keeps the source's geometry); or a new folder for a DICOM "
            "series derived from a DICOM source.",
            show_default=False,
        ),
    ],
    task: Annotated[
        TaskName | None,
        typer.Option(help="A named task (default: reconstruct unless --instruction is given)."),
    ] = None,
    instruction: Annotated[str | None, typer.Option(help="A free instruction instead of a named task.")] = None,
    text: Annotated[str | None, typer.Option(help="The radiology report, for --task report_to_cxr.")] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(help="Classifier-free guidance above 1 (against the instruction without image).")
    ] = None,
    all_slices: Annotated[
        bool,
        typer.Option(
            "--all-slices/--one-slice",
            help="Generate every slice of a volume and write a volume back (.nii.gz or a DICOM folder).",
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Slices per batched model call with --all-slices.")] = 8,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress on stderr.")] = True,
    model: ModelOptions,
    sampling: SamplingOptions,
    view: ImageOptions,
) -> None:
    """Generate an image: CT to MRI, MRI to CT, super-resolution, reconstruction, report to chest X-ray.

    The output's suffix picks the format; volumes keep the source's geometry."""
    if task is not None and instruction is not None:
        raise ValueError("give --task or --instruction, not both")
    what = instruction if instruction is not None else task or "reconstruct"
    _, preset = resolve_instruction(what, text)
    if preset is not None and preset.needs_image and image is None:
        raise ValueError(f"task {preset.name!r} needs a source image")
    source = view.load(image, all_slices=all_slices) if image is not None else None
    _check_output(output, source)
    pictures = [s.to_pil() for s in source.slices()] if source is not None else [None]
    health = model.load()
    images = []
    for chunk in _chunks(pictures, batch_size):
        results = health.generate_image(
            list(chunk), what, text=text, guidance_scale=guidance_scale, progress=progress, **sampling.kwargs()
        )
        images += [r.image for r in results]
    _write_images(images, source, output)
    typer.echo(str(output))


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
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if preset is not None and preset.needs_image and image_path is None:
        raise ValueError(f'{where}: task {preset.name!r} needs an "image"')
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


def _read_done(path: Path, ids: set[Any]) -> dict[Any, dict[str, Any]]:
    """The results already in the output JSONL, by id. A last line cut short by a crash is removed (its row is
    redone); any other unreadable line, or an id not in the input, is an error."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    done: dict[Any, dict[str, Any]] = {}
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number}: not a result line; give a new output file or repair this one") from None
        if not isinstance(row, dict) or row.get("id") not in ids:
            raise ValueError(f"{path}:{number}: this result's id is not in the input; give a new output file")
        done[row["id"]] = row
    if len(complete) < len(data):  # only now that the file is known to be ours
        with path.open("r+b") as file:
            file.truncate(len(complete))
    return done


def _attempt(call: Callable[[list[T]], list[Any]], items: list[T]) -> list[Any]:
    """`call(items)` as one batch; if the batch is refused as bad input, item by item, so that only the bad items
    fail (their result is the exception)."""
    try:
        return call(items)
    except ValueError as exc:
        if len(items) == 1:
            return [exc]
        return [_attempt(call, [item])[0] for item in items]


def _run_chunk(
    health: HealthGPT, jobs: Sequence[_Job], view: ImageOptions, guidance_scale: float | None, sampling: dict[str, Any]
) -> Iterator[tuple[_Job, dict[str, Any]]]:
    """(row, result) for rows sharing one instruction (or all questions): one batched model call; a row with bad
    input gets {"error": message}."""
    ready: list[tuple[_Job, MedicalImage | None]] = []
    for job in jobs:
        try:
            source = view.load(job.image) if job.image is not None else None
            if job.output_path is not None:
                _check_output(job.output_path, source)
            ready.append((job, source))
        except ValueError as exc:
            yield job, {"error": str(exc)}
    if not ready:
        return
    pictures = [source.to_pil() if source is not None else None for _, source in ready]
    first = ready[0][0]
    if first.question is not None:
        questions = [job.question for job, _ in ready]
        outcomes = _attempt(
            lambda rows: health.ask([p for p, _ in rows], [q for _, q in rows], **sampling),
            list(zip(pictures, questions, strict=True)),
        )
    else:
        outcomes = _attempt(
            lambda rows: health.generate_image(
                rows, first.instruction, text=first.text, guidance_scale=guidance_scale, progress=False, **sampling
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
                _write_images([outcome.image], source, job.output_path)
            except ValueError as exc:
                yield job, {"error": str(exc)}
                continue
            yield job, {"output": job.output, "instruction": outcome.instruction, "task": outcome.task}


@_command
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
            '"error"}. Ids already there are skipped, so re-running resumes an interrupted batch.',
            dir_okay=False,
            show_default=False,
        ),
    ],
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per batched model call.")] = 8,
    guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance for generate rows.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress on stderr.")] = True,
    *,
    model: ModelOptions,
    sampling: SamplingOptions,
    view: ImageOptions,
) -> None:
    """Run many asks and generations from a JSONL file, resumably.

    Each result is appended and flushed as soon as it is done, so an interrupted run loses nothing written, and a
    re-run skips the ids already there. Rows with bad input get an "error" result; the command then exits with 2."""
    jobs = _read_jobs(rows)
    done = _read_done(results, {job.id for job in jobs})
    groups: dict[tuple[str | None, str | None], list[_Job]] = {}
    for job in jobs:
        if job.id not in done:
            groups.setdefault((job.instruction, job.text), []).append(job)
    failed = sum("error" in row for row in done.values())
    if groups:
        from tqdm.auto import tqdm

        health = model.load()
        with (
            results.open("a", encoding="utf-8") as out,
            tqdm(total=len(jobs), initial=len(done), unit="row", disable=not progress) as bar,
        ):
            for group in groups.values():
                for chunk in _chunks(group, batch_size):
                    for job, outcome in _run_chunk(health, chunk, view, guidance_scale, sampling.kwargs()):
                        out.write(json.dumps({"id": job.id, **outcome}, ensure_ascii=False) + "\n")
                        out.flush()
                        os.fsync(out.fileno())
                        failed += "error" in outcome
                    bar.update(len(chunk))
    if failed:
        raise ValueError(f"{failed} of {len(jobs)} rows failed; their lines in {results} say why")


# ----- convert, info, demo -----------------------------------------------------------------------------------------
@_command
def convert(
    output: Annotated[Path, typer.Argument(help="New folder to write the bundle into.", show_default=False)],
    include_base: Annotated[
        bool,
        typer.Option(
            "--include-base/--refer-to-base",
            help="Copy the base LLM and CLIP tower into the bundle, or refer to their local folders.",
        ),
    ] = False,
    *,
    model: ModelOptions,
) -> None:
    """Turn official HealthGPT files into one bundle folder that `--model BUNDLE` loads.

    --model names the official files (a folder of them, a variant or a Hub id), with --base-model, --vision-tower,
    --plugin-file, --fusion-file and --vqgan where they are elsewhere."""
    model.convert(output, include_base=include_base)
    typer.echo(str(output))


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}


def _human(value: float, units: Sequence[str], step: float) -> str:
    for unit in units[:-1]:
        if abs(value) < step:
            return f"{value:.4g} {unit}".strip()
        value /= step
    return f"{value:.4g} {units[-1]}"


def _tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} of a weight file, read without loading the values where the format allows."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as file:
            slices = {key: file.get_slice(key) for key in file.keys()}
            return {
                k: (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype().lower()))
                for k, s in slices.items()
            }
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    found: dict[str, tuple[tuple[int, ...], str]] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, torch.Tensor):
            found[prefix.rstrip(".")] = (tuple(value.shape), str(value.dtype).removeprefix("torch."))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{prefix}{key}.")

    walk(state, "")
    return found


def _weights_info(path: Path, root: Path) -> dict[str, Any]:
    """Size, tensor and parameter counts and dtypes of one weight file; rank and experts of H-LoRA tensors."""
    facts: dict[str, Any] = {"file": str(path.relative_to(root)) if path != root else path.name}
    facts["size"] = _human(path.stat().st_size, ("B", "KB", "MB", "GB", "TB"), 1024)
    try:
        shapes = _tensor_shapes(path)
    except Exception as exc:  # many formats and failure types; report the file instead of failing the listing
        facts["unreadable"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return facts
    dtypes: dict[str, int] = {}
    for _, dtype in shapes.values():
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    count = sum(_product(shape) for shape, _ in shapes.values())
    facts.update(tensors=len(shapes), parameters=_human(count, ("", "K", "M", "B"), 1000), dtypes=dtypes)
    lora = {k: shape for k, (shape, _) in shapes.items() if ".lora_" in k}
    if lora:
        import torch

        from .hlora import HLoRAStateError, infer_plugin_shape

        try:
            rank, experts = infer_plugin_shape({k: torch.empty(s, device="meta") for k, s in lora.items()})
            facts["hlora"] = {"rank": rank, "experts": experts, "tensors": len(lora)}
        except HLoRAStateError as exc:
            facts["hlora"] = str(exc)
    return facts


def _product(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _config_info(path: Path) -> dict[str, Any]:
    """The essentials of a HealthGPT config.json (variant, LLM, plugins with ranks) or of a transformers one."""
    from .config import HealthGPTConfig

    try:
        config = HealthGPTConfig.load(path)
    except ValueError:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable JSON config ({exc})") from None
        keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "dtype", "torch_dtype")
        return {k: raw[k] for k in keys if isinstance(raw, dict) and k in raw}
    llm = config.llm
    return {
        "variant": config.name,
        "llm": f"{llm.arch} {llm.source}: {llm.num_layers} layers, hidden {llm.hidden_size}, context "
        f"{llm.max_position_embeddings}",
        "vision": f"{config.vision.source}: {config.vision.image_size}px, patch {config.vision.patch_size}",
        "plugins": {
            name: {"rank": p.rank, "alpha": p.alpha, "experts": p.num_experts, "vision_layer": p.vision_layer}
            for name, p in config.plugins.items()
        },
        "image_tokens": config.vq.num_codes if config.add_image_tokens else 0,
        "template": config.template,
        "dtype": config.dtype,
    }


def _checkpoint_info(path: Path) -> dict[str, Any]:
    """What a bundle, checkpoint folder, config or weight file holds."""
    facts: dict[str, Any] = {"path": str(path)}
    if path.is_dir():
        manifest = path / "bundle.json"
        if manifest.is_file():
            facts["bundle"] = json.loads(manifest.read_text())
        if (path / "config.json").is_file():
            facts["config"] = _config_info(path / "config.json")
        files = sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    elif path.suffix == ".json":
        facts["config"] = _config_info(path)
        files = []
    else:
        files = [path]
    root = path if path.is_dir() else path.parent
    facts["weights"] = [_weights_info(file, root) for file in files]
    facts["total_size"] = _human(sum(f.stat().st_size for f in files), ("B", "KB", "MB", "GB", "TB"), 1024)
    return facts


def _image_info(path: Path) -> dict[str, Any]:
    """Format, modality, shape, spacing, value range (HU for CT) and display window of an image or volume."""
    import numpy as np

    from .io import load_image

    image = load_image(path, slice_index="all")
    if image.datasets:
        kind = "DICOM series" if path.is_dir() else "DICOM"
    else:
        kind = "NIfTI" if image.affine is not None else (path.suffix.lstrip(".").upper() or "raster")
    spacing: list[float] | None = None
    if image.affine is not None:
        steps = np.linalg.norm(image.affine[:3, :3], axis=0)
        spacing = [round(float(s), 4) for s in (steps if image.is_volume else steps[1:])]
    elif image.pixel_spacing is not None:
        spacing = [round(float(s), 4) for s in image.pixel_spacing]
    return {
        "path": str(path),
        "format": kind,
        "modality": image.modality,
        "shape": list(image.array.shape),
        "slices": image.num_slices,
        "colour": image.color,
        "spacing_mm": spacing,
        "value_range": [float(np.nanmin(image.array)), float(np.nanmax(image.array))],
        "units": "RGB 0-255" if image.color else "HU" if image.modality.upper() == "CT" else "stored values",
        "window": None if image.color else _window_info(image),
    }


def _window_info(image: MedicalImage) -> dict[str, Any]:
    """The window a grey image is shown with, and where it comes from."""
    from .io import PercentileWindow, Window, default_window

    window = image.window or default_window(image.modality)
    if isinstance(window, Window):
        shown: dict[str, Any] = {"center": window.center, "width": window.width}
    elif isinstance(window, PercentileWindow):
        shown = {"percentiles": [window.low, window.high]}
    else:  # MultiWindow
        shown = {"rgb": [{"center": w.center, "width": w.width} for w in window.channels]}
    return {**shown, "from": "file or --window" if image.window is not None else f"default for {image.modality}"}


def _is_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return any((path / name).is_file() for name in ("bundle.json", "config.json")) or any(
            p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()
        )
    return path.suffix in (*WEIGHT_SUFFIXES, ".json")


def _as_text(value: dict | list, indent: int = 0) -> Iterator[str]:
    """`key: value` lines; nested mappings are indented, lists of mappings become `-` items."""
    pad = "  " * indent
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        label = f"{pad}{key}:" if isinstance(value, dict) else f"{pad}-"
        if isinstance(item, dict) or (isinstance(item, list) and any(isinstance(v, dict) for v in item)):
            yield label
            yield from _as_text(item, indent + 1)
        else:
            yield f"{label} {json.dumps(item, ensure_ascii=False) if isinstance(item, list) else item}"


@_command
def info(
    path: Annotated[
        Path,
        typer.Argument(
            help="An image file or DICOM series folder; or a bundle, checkpoint folder, config.json or weight file "
            "(.safetensors, .bin, .pt, .ckpt).",
            show_default=False,
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json/--text", help="Print JSON instead of text.")] = False,
) -> None:
    """Show what an image or a checkpoint holds.

    Images: format, modality, shape, spacing, value range (HU for CT), display window. Checkpoints: config,
    plugins with their H-LoRA ranks, tensors, dtypes and sizes."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    facts = _checkpoint_info(path) if _is_checkpoint(path) else _image_info(path)
    typer.echo(json.dumps(facts, indent=2, ensure_ascii=False) if as_json else "\n".join(_as_text(facts)))


@app.command()
def demo(
    question: Annotated[
        str, typer.Option(help="Question to ask about the image.")
    ] = "Is there a lesion in this CT image?",
    seed: Annotated[int, typer.Option(help="Seed of the random nano model.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 24,
) -> None:
    """Build the nano model offline and ask one question about pydicom's CT_small.dcm."""
    from pydicom.data import get_testdata_file
    from rich.console import Console

    from .api import HealthGPT
    from .io import load_image

    console = Console()
    path = get_testdata_file("CT_small.dcm")
    image = load_image(path)
    console.print(f"[bold]Image[/bold]: {path} ({image.modality}, {image.array.shape})")
    model = HealthGPT.random(NANO, seed=seed)
    console.print("[yellow]Model: nano, UNTRAINED random weights — the answer is not meaningful.[/yellow]")
    console.print(f"[bold]Q[/bold]: {question}")
    answer = model.ask(image.to_pil(), question, max_new_tokens=max_new_tokens)
    console.print(f"[bold]HealthGPT[/bold]: {answer}")


if __name__ == "__main__":
    app()
