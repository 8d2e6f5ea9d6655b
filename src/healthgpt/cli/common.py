"""The typer app, the option groups several commands share, and the error policy of every command.

Flags come from typed signatures. The option groups (model, sampling, image) are frozen dataclasses that `command`
expands into each command's flags. Exit codes: 0 ok, 2 bad usage or input (one `error:` line on stderr), 1 internal
error (`--debug` shows the traceback)."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_type_hints

import typer

from ..logs import silence_library_logs
from ..tasks import TASKS

if TYPE_CHECKING:
    from PIL import Image

    from ..api import HealthGPT
    from ..io import MedicalImage


app = typer.Typer(
    help="HealthGPT: ask questions about medical images and generate images with one model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_MODEL = "nano"  # the embedded model used where no other is named (HEALTHGPT_MODEL changes it)
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
            help="'nano' (the built-in toy model trained on synthetic phantoms, for trying things out), a bundle "
            "folder written by `healthgpt convert` or a recipe, a folder of official files, a variant (m3, l14, xl32; "
            "with --base-model, --vision-tower, --plugin-file) or a Hub id (lintw/HealthGPT-M3).",
            envvar="HEALTHGPT_MODEL",
            rich_help_panel=_MODEL,
        ),
    ] = DEFAULT_MODEL
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
    enforce_eager: Annotated[
        bool | None,
        typer.Option(
            "--enforce-eager/--compile",
            help="Decode eagerly, or through the compiled static-cache engine (default: compiled on a GPU, eager on "
            "a CPU, where compiling takes longer than one answer saves).",
            rich_help_panel=_MODEL,
        ),
    ] = None
    quantize: Annotated[
        str | None,
        typer.Option(
            help="Store the base LLM's linears weight-only as int8 or int4 (torchao; cpu, cuda) or nf4 "
            "(bitsandbytes; cuda); plugins, projectors and head stay in full precision (default: none).",
            rich_help_panel=_MODEL,
        ),
    ] = None

    def __post_init__(self) -> None:
        """Check what can be checked before anything loads: PLUGIN=PATH specs, that named files exist, the
        quantization mode."""
        from ..config import EMBEDDED, QUANTIZE_MODES, VARIANTS

        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"--quantize {self.quantize}: choose one of {', '.join(QUANTIZE_MODES)}")

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
            if source is None or source.lower() in (*EMBEDDED, *VARIANTS) or Path(source).exists():
                continue
            from ..hub import is_repo_id

            if not is_repo_id(source):
                raise FileNotFoundError(
                    f"{flag} {source}: no such folder, and not a variant name or a Hub id (owner/name)"
                )
        _check_device(self.device)
        if self.model.lower() in EMBEDDED:
            extra = [k for k in self.load_kwargs() if k not in ("dtype", "quantize")]
            if extra:
                raise ValueError(
                    f"--{extra[0].replace('_', '-')} applies to checkpoints, not to the built-in {self.model} model"
                )

    def plugin_files(self) -> dict[str, Path]:
        """`--plugin-file PLUGIN=PATH` as {plugin: path}."""
        pairs = [spec.partition("=") for spec in self.plugin_file or []]
        for spec, (name, sep, path) in zip(self.plugin_file or [], pairs, strict=True):
            if not (name and sep and path):
                raise ValueError(f"--plugin-file {spec!r}: use PLUGIN=PATH, e.g. comprehension=com_hlora_weights.bin")
        return {name: Path(path) for name, _, path in pairs}

    def local_files(self) -> list[Path]:
        """The files and folders on this machine that these options read (not variant names or Hub ids)."""
        named = [self.model, self.base_model, self.vision_tower, self.fusion_file, self.vqgan]
        named += list(self.plugin_files().values())
        return [Path(p) for p in named if p is not None and Path(p).exists()]

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
            quantize=self.quantize,
        )
        return {k: v for k, v in given.items() if v is not None}

    def load(self) -> HealthGPT:
        """The model these options name."""
        from ..api import HealthGPT

        return HealthGPT.from_pretrained(
            self.model, device=self.device, enforce_eager=self.enforce_eager, **self.load_kwargs()
        )

    def convert(self, output: Path, *, include_base: bool) -> None:
        """Write the model these options name as a bundle at `output`."""
        from ..config import EMBEDDED

        if self.model.lower() in EMBEDDED:
            if not include_base:
                raise ValueError(f"the built-in {self.model} model has no base folders to refer to: add --include-base")
            self.load().save_pretrained(output, include_base=True)
            return
        from ..checkpoints import convert_official

        convert_official(output, self.model, include_base=include_base, device=self.device, **self.load_kwargs())


def _check_device(device: str) -> None:
    """Refuse a GPU device this torch build or machine lacks, before any model loads."""
    kind = device.partition(":")[0]
    if kind not in ("cuda", "mps"):
        return
    import torch

    if kind == "cuda" and not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "finds no CUDA GPU on this machine"
        raise ValueError(f"--device {device}: torch {torch.__version__} {why}; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: this machine or torch build has no MPS (Apple GPU); use --device cpu")


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
            help="Volume of a 4D NIfTI, frame of a multi-frame DICOM or page of a multi-page image (default: 0; "
            "a multi-frame DICOM whose frames have positions is a volume: --slice, default the middle one).",
            rich_help_panel=_IMAGE,
        ),
    ] = None
    uneven_slices: Annotated[
        Literal["error", "resample"],
        typer.Option(
            help="A DICOM stack whose slice gaps differ: refuse it (error), or resample it linearly to an even "
            "grid at its median gap, with a warning naming the gaps.",
            rich_help_panel=_IMAGE,
        ),
    ] = "error"

    def load(self, path: Path, *, all_slices: bool = False) -> MedicalImage:
        """The image at `path` (one slice, or the whole volume if `all_slices`), windowed as asked."""
        from ..io import load_image

        if all_slices and self.slice_index is not None:
            raise ValueError("--all-slices and --slice exclude each other: give one")
        axis = int(self.axis) if self.axis is not None and self.axis.isdigit() else self.axis
        index = "all" if all_slices else self.slice_index
        return load_image(
            path, window=self.window, slice_index=index, axis=axis, frame=self.frame, uneven_slices=self.uneven_slices
        )

    def picture(self, path: Path | None) -> Image.Image | None:
        """The 8-bit RGB picture of one slice of `path` (None without a path)."""
        return None if path is None else self.load(path).to_pil()


_GROUPS = (ModelOptions, SamplingOptions, ImageOptions)

Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite/--no-overwrite",
        help="Replace existing outputs: a file, or a filled output folder once the new one is complete (never one "
        "that holds an input or the working directory). Without it they are refused before any work. What resumes "
        "is kept either way: batch adds to its results file and replaces only the images of the rows it runs.",
    ),
]


def command(func: Callable[..., None]) -> Callable[..., None]:
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
        from ..io.atomic import terminate_on_signals

        show_traceback = kwargs.pop("debug")
        silence_library_logs()  # before anything imports transformers (and through it torchao)
        try:
            for name, group in groups.items():
                kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in fields(group)})
            with terminate_on_signals():  # SIGTERM unwinds like Ctrl-C, so temporary outputs are removed
                func(**kwargs)
        except Exception as exc:
            if show_traceback:
                raise
            fail(exc)

    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return app.command()(run)


def fail(exc: Exception) -> None:
    """Print one `error:` line and exit with the code `healthgpt.errors.exit_code` gives: 2 for bad input, 1 for a
    bug."""
    from ..errors import INPUT_EXIT_CODE, exit_code

    code = exit_code(exc)
    if code == INPUT_EXIT_CODE:
        message = " ".join(str(exc).split())  # one line, whatever the message
    else:
        message = f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback"
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def require_questions(questions: Iterable[str]) -> None:
    """Refuse empty questions before any model loads."""
    for i, question in enumerate(questions, 1):
        if not question.strip():
            raise ValueError(f"question {i} is empty: give a non-empty question")


def echo_stream(pieces: Iterable[str]) -> str:
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


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
