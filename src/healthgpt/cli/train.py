"""`train`, `export`, `tokenize-images` and `train-vqgan`: the three-stage training from the command line."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated

import typer

from .common import Overwrite, command
from .outputs import check_output_folder, output_path

_OVERRIDES_HELP = "Dotted overrides of the recipe, e.g. stage3.lr=2e-4 train.max_steps=10 train.data=my.json."


@command
def train(
    stage: Annotated[
        str,
        typer.Option(
            help="Stage to run: stage1_comprehension, stage1_generation, stage2, stage3_comprehension, "
            "stage3_generation (or any stage the recipe defines). Each starts from the previous stage's output."
        ),
    ],
    config: Annotated[
        Path | None, typer.Option(help="Recipe YAML/JSON (default: the shipped M3 recipe).", exists=True)
    ] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help=_OVERRIDES_HELP, show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint.")] = False,
) -> None:
    """Run one stage of the three-stage strategy with accelerate (CPU, one GPU, or `accelerate launch` for many).

    Writes checkpoints every N steps (resumable after a crash), TensorBoard logs, loss.png and metrics.json under
    the recipe's output_dir; an earlier run of the stage there is resumed (--resume), never replaced."""
    from ..io.atomic import check_folder
    from ..training.loop import run_stage
    from ..training.stages import load_recipe
    from ..workers import exit_with_parent

    exit_with_parent()  # a recipe's worker (healthgpt.recipes.nano.run_stages) ends with the recipe
    recipe = load_recipe(config, overrides or (), stage)
    check_folder(Path(recipe.output_dir) / stage)  # before the model is built
    result = run_stage(recipe, stage, resume=resume)
    typer.echo(f"{stage}: {result.steps} steps, final loss {result.final_loss:.4f} -> {result.output}")


@command
def export(
    output: Annotated[Path, typer.Argument(help="New bundle folder.", show_default=False)],
    config: Annotated[Path | None, typer.Option(help="The recipe the stages were trained with.", exists=True)] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help=_OVERRIDES_HELP)] = None,
    include_base: Annotated[
        bool, typer.Option("--include-base/--refer-to-base", help="Copy the base weights into the bundle.")
    ] = False,
    vqgan: Annotated[Path | None, typer.Option(help="The VQGAN the image codes were made with.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Merge the stage-3 outputs (those trained so far) into one bundle that `--model BUNDLE` loads."""
    from ..training.loop import export_model

    check_output_folder(output, overwrite=overwrite, inputs=_export_inputs(config, overrides or (), vqgan))
    with output_path(output, overwrite=overwrite) as target:
        export_model(config, target, overrides=overrides or (), include_base=include_base, vqgan=vqgan)
    typer.echo(str(output))


def _export_inputs(config: Path | None, overrides: Sequence[str], vqgan: Path | None) -> Iterator[Path | None]:
    """What `export` reads: the VQGAN and the recipe's output_dir (the recipe is read only if asked for)."""
    from ..training.stages import load_recipe

    yield vqgan
    yield Path(load_recipe(config, overrides).output_dir)


@command
def tokenize_images(
    data: Annotated[list[str], typer.Argument(help="Record files (LLaVA JSON, JSONL, parquet, hf://name).")],
    vqgan: Annotated[Path, typer.Option(help="VQGAN folder or taming last.ckpt.", exists=True)],
    cache: Annotated[Path, typer.Option(help="Folder of the code cache (created; reused on re-runs).")],
    image_folder: Annotated[Path | None, typer.Option(help="Folder relative image paths start from.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per VQGAN call.")] = 16,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps.")] = "cpu",
    strict: Annotated[
        bool, typer.Option("--strict/--skip-bad", help="Stop at the first malformed record instead of skipping it.")
    ] = False,
) -> None:
    """Encode every generation target image once into VQ codes (resumable: cached images are skipped)."""
    from ..data.image_codes import tokenize_images as run
    from ..io.atomic import check_folder

    check_folder(cache)  # before the VQGAN loads
    report = run(
        data,
        vqgan,
        cache,
        image_folder=image_folder,
        batch_size=batch_size,
        device=device,
        on_error="raise" if strict else "skip",
    )
    for issue in report.issues:
        typer.echo(f"skipped: {issue}", err=True)
    typer.echo(f"encoded {report.encoded}, already cached {report.already_cached}, skipped {len(report.issues)}")


@command
def train_vqgan(
    images: Annotated[Path, typer.Argument(help="Folder of training images (PNG/JPEG, DICOM, NIfTI).", exists=True)],
    output: Annotated[Path, typer.Option("--out", help="Folder to save the trained VQGAN into.")],
    init: Annotated[
        Path | None, typer.Option("--from", help="Fine-tune this VQGAN (folder or taming last.ckpt) instead.")
    ] = None,
    variant: Annotated[str, typer.Option(help="Architecture when training from scratch (nano, m3).")] = "nano",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warm-up, then cosine).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and batch order.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps.")] = "cpu",
    overwrite: Overwrite = False,
) -> None:
    """Train a VQGAN on images (reconstruction + quantizer objective), or fine-tune a released one on your modality;
    saves it with a PNG of reconstructions. Images may be PNG/JPEG, DICOM or NIfTI."""
    from ..checkpoints import load_vqgan
    from ..config import get_variant
    from ..pretrain.vqgan import train_vqgan as run

    check_output_folder(output, overwrite=overwrite, inputs=[images, init])  # before any training step
    start = load_vqgan(init) if init is not None else get_variant(variant).vq
    with output_path(output, overwrite=overwrite) as target:
        model = run(
            images, vq=start, steps=steps, batch_size=batch_size, lr=lr, seed=seed, out_dir=target, device=device
        )
    typer.echo(f"{output} (grid {model.grid}x{model.grid}, {model.num_codes} codes)")
