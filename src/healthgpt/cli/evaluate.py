"""`eval`, `compare` and `score-images`: benchmark runs and their reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .. import jsonout
from .common import ModelOptions, SamplingOptions, command

_BENCHMARKS = "vqa-rad, slake, pathvqa, omnimedvqa, mmmu-med"


def _pairs(specs: list[str]) -> dict[str, Path]:
    pairs = {}
    for spec in specs:
        name, sep, root = spec.partition("=")
        if not (sep and name and root):
            raise ValueError(f"--data {spec!r}: use BENCHMARK=FOLDER with BENCHMARK one of {_BENCHMARKS}")
        if not Path(root).exists():
            raise FileNotFoundError(f"--data {spec}: no such folder {root}")
        pairs[name] = Path(root)
    return pairs


def _weight_hashes(model: str) -> dict[str, str]:
    """SHA-256 of every weight file of a local checkpoint folder, for the run record."""
    from ..evaluation import sha256_file

    folder = Path(model)
    if not folder.is_dir():
        return {}
    suffixes = {".safetensors", ".bin", ".pt", ".ckpt"}
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.suffix in suffixes}


@command
def eval(  # noqa: A001  (the command is called `eval`)
    data: Annotated[
        list[str], typer.Option(help=f"BENCHMARK=FOLDER, repeatable; benchmarks: {_BENCHMARKS}.", show_default=False)
    ],
    output: Annotated[
        Path, typer.Option("--out", help="Run folder (created; re-running it resumes the run, never replaces it).")
    ],
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per batched model call.")] = 8,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N items of each benchmark.")] = None,
    prompts: Annotated[
        str | None,
        typer.Option(help="Prompt set: short or plain (default: the one for the model's variant, see the README)."),
    ] = None,
    open_metric: Annotated[str, typer.Option(help="Open-question score in the 'all' column: recall, f1, exact.")] = (
        "recall"
    ),
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress on stderr.")] = True,
    *,
    model: ModelOptions,
    sampling: SamplingOptions,
) -> None:
    """Answer benchmark questions and score them (closed, open and multiple-choice; Table-1 columns), resumably:
    predictions.jsonl, run.json, metrics.json and metrics.md in the run folder."""
    from ..evaluation import PROMPT_SETS, load_benchmark, metrics_markdown, model_predictor, prompts_for, run_eval
    from ..io.atomic import check_folder

    check_folder(output)  # created, or added to when resumed; before the model loads
    if prompts is not None and prompts not in PROMPT_SETS:
        raise ValueError(f"--prompts {prompts!r}: use one of {', '.join(PROMPT_SETS)}")
    roots = _pairs(data)
    items = []
    for name, root in roots.items():
        items += load_benchmark(name, root)[:limit]
    settings = sampling.kwargs()
    run_info = {"model": model.model, "weights": _weight_hashes(model.model), "sampling": settings}
    hg = model.load()
    chosen = PROMPT_SETS[prompts] if prompts is not None else prompts_for(hg.config.name)
    metrics = run_eval(
        model_predictor(hg.answer, **settings),
        items,
        output,
        batch_size=batch_size,
        run_info=run_info,
        prompts=chosen,
        open_metric=open_metric,
        progress=progress,
    )
    typer.echo(metrics_markdown(metrics, json.loads((output / "run.json").read_text())))


@command
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders written by `healthgpt eval`.", exists=True)],
    label: Annotated[list[str] | None, typer.Option(help="A label per run (default: folder names).")] = None,
) -> None:
    """Put several evaluation runs side by side as markdown tables."""
    from ..evaluation import compare_runs

    typer.echo(compare_runs(runs, labels=label))


@command
def score_images(
    outputs: Annotated[
        Path, typer.Argument(help="Folder of generated images (or code files) named like the targets, or one file.")
    ],
    targets: Annotated[Path, typer.Argument(help="Folder of reference images, or one file.", exists=True)],
    mode: Annotated[str, typer.Option(help="Compare as L (grayscale) or RGB.")] = "L",
    vqgan: Annotated[Path | None, typer.Option(help="VQGAN to decode code files with.")] = None,
) -> None:
    """SSIM (x100), PSNR (dB) and MSE (8-bit) of paired images, as the paper's Tables 2, 3 and 11 report them: files
    of two folders paired by name, or two files."""
    from ..evaluation import score_image_pairs

    decode = None
    if vqgan is not None:
        from ..checkpoints import load_vqgan

        model = load_vqgan(vqgan).eval()
        decode = model.codes_to_pil
    typer.echo(jsonout.dumps(score_image_pairs(outputs, targets, decode=decode, mode=mode), indent=2))
