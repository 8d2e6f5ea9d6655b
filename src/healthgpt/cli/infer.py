"""`ask`, `chat`, `generate` and `demo`: questions and image generation from the command line."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..tasks import check_image_input, resolve_instruction
from .common import (
    DEFAULT_MODEL,
    ImageOptions,
    ModelOptions,
    Overwrite,
    SamplingOptions,
    TaskName,
    chunks,
    command,
    echo_stream,
    require_questions,
)
from .outputs import check_output, output_path

DEMO_PANEL = "panel.png"

if TYPE_CHECKING:
    from PIL import Image

    from ..api import HealthGPT


# ----- ask, chat ---------------------------------------------------------------------------------------------------
@command
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
    require_questions(question)
    picture = view.picture(image)
    health = model.load()
    if len(question) == 1:
        echo_stream(health.stream(picture, question[0], system=system, **sampling.kwargs()))
        return
    for answer in health.ask(picture, question, system=system, **sampling.kwargs()):
        typer.echo(answer)


@command
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
            messages = [*turn, {"role": "assistant", "content": echo_stream(pieces)}]


# ----- generate ----------------------------------------------------------------------------------------------------
@command
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
        float | None,
        typer.Option(
            help="Classifier-free guidance above 1 (against the instruction without its condition); default: the "
            "model's own (config guidance_scale).",
            show_default=False,
        ),
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
    overwrite: Overwrite = False,
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
    check_image_input(preset, image is not None)
    source = view.load(image, all_slices=all_slices) if image is not None else None
    check_output(output, source, overwrite=overwrite, inputs=[image])
    pictures = [s.to_pil() for s in source.slices()] if source is not None else [None]
    settings = dict(text=text, guidance_scale=guidance_scale, **sampling.kwargs())
    images = _generate_slices(model.load(), pictures, batch_size, what, progress, **settings)
    from ..io import write_images

    with output_path(output, overwrite=overwrite) as target:
        write_images(images, source, target, modality=preset.modality if preset is not None else None)
    typer.echo(str(output))


def _generate_slices(
    health: HealthGPT, pictures: list[Any], batch_size: int, what: str, progress: bool, **settings: Any
) -> list[Image.Image]:
    """The images `health` generates from `pictures`, `batch_size` per call, with an overall counter on stderr."""
    from tqdm.auto import tqdm

    images = []
    with tqdm(total=len(pictures), desc="slices", unit="slice", disable=not progress or len(pictures) == 1) as done:
        for chunk in chunks(pictures, batch_size):
            images += [r.image for r in health.generate_image(list(chunk), what, progress=progress, **settings)]
            done.update(len(chunk))
    return images


# ----- demo --------------------------------------------------------------------------------------------------------
@command
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the panel picture (created if missing).")] = Path(
        "healthgpt-demo"
    ),
    model: Annotated[
        str,
        typer.Option(
            help="A model trained on phantoms: the embedded nano, or a recipe's bundle folder (the mini recipe, "
            "healthgpt.recipes.nano.run(<folder>, variant='mini'), writes <folder>/model).",
            envvar="HEALTHGPT_MODEL",
        ),
    ] = DEFAULT_MODEL,
    seed: Annotated[int, typer.Option(help="Which held-out phantoms to show (their random stream).")] = 0,
    overwrite: Overwrite = False,
) -> None:
    """Run a toy model trained on synthetic phantoms (not for clinical use; the embedded nano unless --model names
    another): every image task on a held-out phantom and a chest film from its report, in one panel picture (input,
    truth, output); questions about the phantom and pydicom's CT_small.dcm; the figures of each."""
    from pydicom.data import get_testdata_file
    from rich.console import Console

    from ..api import HealthGPT
    from ..config import EMBEDDED
    from ..evaluation.phantom_demo import demo_case, image_rows, questions, report_of, write_demo_panel
    from ..io import load_image

    if model.lower() not in EMBEDDED and not Path(model).is_dir():
        raise ValueError(
            f"--model {model}: the demo runs a model trained on phantoms: {', '.join(EMBEDDED)}, or the bundle folder "
            "a recipe wrote (healthgpt.recipes.nano.run(<folder>, variant='mini') writes <folder>/model)"
        )
    panel = out / DEMO_PANEL
    _check_demo_outputs(out, [panel], overwrite)
    console = Console()
    console.print(
        f"[yellow]Model: {model}, a TOY HealthGPT trained on a CPU on synthetic phantoms (healthgpt.recipes.nano). "
        "Not for clinical use.[/yellow]"
    )
    loaded = HealthGPT.from_pretrained(model.lower() if model.lower() in EMBEDDED else model)
    case, chest = demo_case(seed, loaded.vqgan.image_size)
    asked = [(case.rgb("ct"), qa.question, qa.answer) for qa in questions(case, seed)]
    real = "unknown (a real CT slice, outside the phantom world)"
    asked.append((load_image(get_testdata_file("CT_small.dcm")).to_pil(), "Is there a lesion in this CT image?", real))
    answers = loaded.ask([im for im, _, _ in asked], [q for _, q, _ in asked], max_new_tokens=8)
    for (_, question, truth), answer in zip(asked, answers, strict=True):
        console.print(f"  Q: {question}\n  A: {answer}   [dim]truth: {truth}[/dim]")
    rows = image_rows(loaded, case, chest, report_of(chest, seed))
    for row in rows:
        console.print(f"[bold]{row.task}[/bold]: {row.figure}")
    out.mkdir(parents=True, exist_ok=True)
    write_demo_panel(panel, rows, f"{loaded.config.name} HealthGPT on a held-out phantom (toy model, synthetic data)")
    console.print(f"Panel (input, truth, output per task) written to {panel}")


def _check_demo_outputs(out: Path, paths: Iterable[Path], overwrite: bool) -> None:
    """Before the model loads: `out` can be created or written into, and holds none of `paths` unless `overwrite`."""
    from ..io.atomic import check_folder, check_target

    check_folder(out)
    for path in paths if out.is_dir() else ():
        check_target(path, overwrite=overwrite)
