"""One training stage on accelerate: the same code on CPU, one GPU, DDP, DeepSpeed ZeRO-2/3 or FSDP.

Data order is a function of (seed, epoch) alone and each optimizer step takes the next `global_batch_size`
samples, split over processes and accumulation steps; the loss of a step is the mean cross-entropy over all
supervised tokens of the global batch (each micro-batch sums its token losses and divides by the global count),
so the loss curve does not depend on how the batch is split. Launch with `accelerate launch` for several
processes (configs in `healthgpt/training/configs/`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from healthgpt import jsonout
from healthgpt.api import HealthGPT
from healthgpt.data.collate import num_supervised
from healthgpt.data.samples import DataReport
from healthgpt.io.atomic import write_atomic
from healthgpt.tokens import ImageVocab
from healthgpt.training.assemble import OUTPUT, build_healthgpt, export_model, stage_outputs
from healthgpt.training.checkpointing import checkpoints, save_checkpoint, save_stage_output
from healthgpt.training.setup import (
    resume_run,
    setup_accelerator,
    setup_dataset,
    setup_loader,
    setup_model,
    setup_optimizer,
)
from healthgpt.training.stages import Recipe, RecipeError, StageConfig, load_recipe
from healthgpt.training.steps import corrupt_codes, peak_memory, write_loss_plot

__all__ = ["LOSS_PLOT", "METRICS", "OUTPUT", "TrainResult", "build_healthgpt", "export_model", "run_stage", "train"]

log = logging.getLogger(__name__)

METRICS = "metrics.json"
LOSS_PLOT = "loss.png"


@dataclass(frozen=True)
class TrainResult:
    """Where a finished stage wrote its output, and how it went."""

    output: Path
    steps: int
    final_loss: float
    metrics_file: Path


@dataclass
class _Run:
    """What the steps of one stage share once it is set up: the prepared model, optimizer and schedule, where
    checkpoints go, the settings a resume must match and the loss history."""

    accelerator: Accelerator
    model: torch.nn.Module
    params: list[torch.nn.Parameter]  # the trained ones, for gradient clipping
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    ckpt_root: Path
    settings: dict[str, Any]
    history: list[dict[str, Any]]
    tracking: bool
    codes: ImageVocab | None  # the image-code tokens, where the stage corrupts them (`StageConfig.code_noise`)


def run_stage(recipe: Recipe, name: str, *, resume: bool = False, healthgpt: HealthGPT | None = None) -> TrainResult:
    """Train stage `name` of `recipe` from the outputs of its `init_from` stages; write checkpoints, metrics,
    loss plot, TensorBoard logs and the stage output under `<output_dir>/<name>/`. `healthgpt` (default: built
    from `recipe.model`) is trained in place. Reads as a recipe: setup, then one `_train_step` per step, then save."""
    stage, engine = recipe.stage(name), recipe.engine
    out = Path(recipe.output_dir) / name
    accelerator, accumulation, tracking = setup_accelerator(recipe, stage, out)
    _refuse_to_overwrite(out, name, resume)
    hg = healthgpt or build_healthgpt(recipe)
    codes = _noised_codes(hg, stage, name)
    sources = stage_outputs(recipe, stage.init_from)
    groups, trained, inherited = setup_model(recipe, stage, hg, sources, accelerator.device)
    dataset, report = setup_dataset(recipe, stage, hg)
    total = _total_steps(stage, len(dataset))
    model, optimizer, scheduler = setup_optimizer(stage, engine.micro_batch_size, hg.model, groups, accelerator, total)
    settings = {
        **{"stage": name, "config": asdict(stage), "world_size": accelerator.num_processes},
        **{"micro_batch_size": engine.micro_batch_size, "samples": len(dataset), "seed": engine.seed},
    }
    ckpt_root = out / "checkpoints"
    start, history = resume_run(
        accelerator, ckpt_root if resume else None, model, scheduler, settings, engine.seed, total
    )
    params = [p for p in model.parameters() if p.requires_grad]
    run = _Run(accelerator, model, params, optimizer, scheduler, ckpt_root, settings, history, tracking, codes)
    _start_logging(run, stage, total, accumulation, report)
    batches = iter(setup_loader(recipe, stage, dataset, accelerator, hg.pad_id, start, total))
    began = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=name, unit="step", disable=not accelerator.is_main_process)
    for step in range(start, total):
        _optimizer_step(run, stage, batches, accumulation, step)
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", samples_s=f"{history[-1]['samples_per_s']:.1f}")
        _log_and_checkpoint(run, recipe, step + 1, total)
    bar.close()
    run_info = {"steps": total, "accumulation": accumulation, "global_batch_size": stage.global_batch_size}
    metrics = _stage_metrics(
        {**settings, **run_info},
        history,
        time.perf_counter() - began,
        report,
        out / "tensorboard" if tracking else None,
    )
    origins = {**inherited, **{k: name for k in trained}}  # what this output holds, by the stage that trained it
    info = {"stage": name, "recipe": recipe.to_dict(), "init_from": [str(s) for s in sources], "steps": total}
    _save_output(run, hg, out, origins, info, metrics)
    hg.model.eval()  # the model is ready to answer (no H-LoRA dropout)
    final = history[-1]["loss"] if history else float("nan")
    return TrainResult(out / OUTPUT, total, final, out / METRICS)


def _noised_codes(hg: HealthGPT, stage: StageConfig, name: str) -> ImageVocab | None:
    """The image vocabulary whose codes the stage corrupts, None without `code_noise`; a clear error for a model with
    no image codes."""
    if not stage.code_noise:
        return None
    vocab = hg.model.image_vocab
    if vocab is None:
        raise RecipeError(f"{name}: code_noise needs a model with image-code tokens; set {name}.code_noise=0")
    return vocab


def _with_code_noise(run: _Run, micro: list[dict[str, Any]], rate: float, step: int) -> list[dict[str, Any]]:
    """The micro-batches with their code inputs corrupted (`corrupt_codes`); a row's stream is (seed, step, its
    place in the global batch), so the loss curve does not depend on how the batch is split."""
    assert run.codes is not None  # set by _noised_codes whenever the stage has code_noise
    seed, size = run.settings["seed"], run.settings["micro_batch_size"]
    first = run.accelerator.process_index * len(micro) * size
    out = []
    for j, b in enumerate(micro):
        seeds = [(seed, step, first + j * size + k) for k in range(b["input_ids"].shape[0])]
        out.append({**b, "input_ids": corrupt_codes(b["input_ids"], run.codes, rate, seeds)})
    return out


def _refuse_to_overwrite(out: Path, name: str, resume: bool) -> None:
    """A fresh run must not land on an earlier run's checkpoints or output."""
    if not resume and (checkpoints(out / "checkpoints") or (out / OUTPUT).exists()):
        raise RecipeError(
            f"{out} already holds a run of {name}; resume it (--resume; resume=True in Python) or choose another "
            "output_dir"
        )


def _total_steps(stage: StageConfig, samples: int) -> int:
    """Optimizer steps of the stage: `max_steps`, else its epochs over whole global batches."""
    steps_per_epoch = samples // stage.global_batch_size
    if steps_per_epoch == 0:
        raise RecipeError(f"{samples} usable samples, fewer than one global batch ({stage.global_batch_size})")
    return stage.max_steps or max(1, math.ceil(stage.epochs * steps_per_epoch))


def _start_logging(run: _Run, stage: StageConfig, total: int, accumulation: int, report: DataReport) -> None:
    """Start TensorBoard (or say why not) and log the plan of the run: samples, steps, batch split, data."""
    accelerator, settings = run.accelerator, run.settings
    if run.tracking:
        accelerator.init_trackers("tensorboard")
    elif accelerator.is_main_process:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
    if accelerator.is_main_process:
        log.info(
            "%s: %d samples, %d steps (%d per epoch), global batch %d = %d process(es) x %d micro x %d "
            "accumulation; data %s",
            settings["stage"],
            settings["samples"],
            total,
            settings["samples"] // stage.global_batch_size,
            stage.global_batch_size,
            accelerator.num_processes,
            settings["micro_batch_size"],
            accumulation,
            json.dumps(report.to_dict()["by_task"]),
        )


def _optimizer_step(
    run: _Run, stage: StageConfig, batches: Iterator[dict[str, Any]], accumulation: int, step: int
) -> None:
    """One optimizer step over the next global batch (`accumulation` micro-batches); its row (loss, lr, rates, the
    loading of the batch timed too) joins the history."""
    tic = time.perf_counter()
    micro = [next(batches) for _ in range(accumulation)]
    if stage.code_noise:
        micro = _with_code_noise(run, micro, stage.code_noise, step)
    loss, n_global, tokens = _train_step(run.accelerator, run.model, micro, run.params, stage.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - tic
    run.history.append(
        {
            "step": step + 1,
            "loss": loss,
            "lr": run.scheduler.get_last_lr()[-1],
            "samples_per_s": stage.global_batch_size / elapsed,
            "tokens_per_s": tokens / elapsed,
            "supervised_tokens": n_global,
        }
    )


def _log_and_checkpoint(run: _Run, recipe: Recipe, done: int, total: int) -> None:
    """After step `done`: its row to TensorBoard every `log_every` steps, a checkpoint every `save_every` and last."""
    engine = recipe.engine
    if run.tracking and done % engine.log_every == 0:
        run.accelerator.log({k: v for k, v in run.history[-1].items() if k != "step"}, step=done)
    if done % engine.save_every == 0 or done == total:
        state = {"step": done, "history": run.history, "settings": run.settings}
        save_checkpoint(run.accelerator, run.ckpt_root, state, engine.keep_checkpoints, run.scheduler)


def _save_output(
    run: _Run, hg: HealthGPT, out: Path, origins: dict[str, str], info: dict[str, Any], metrics: dict[str, Any]
) -> None:
    """Write the stage output (the tensors named in `origins`), its config, metrics and loss plot; end the run."""
    accelerator = run.accelerator
    state = accelerator.get_state_dict(run.model)  # every process takes part (ZeRO-3 gathers the shards)
    if accelerator.is_main_process:
        save_stage_output(out / OUTPUT, {k: v for k, v in state.items() if k in origins}, origins, info)
        hg.config.save(out / OUTPUT / "config.json")
        write_atomic(out / METRICS, jsonout.dumps(metrics, indent=1) + "\n")
        write_loss_plot(run.history, out / LOSS_PLOT, f"HealthGPT {info['stage']}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _stage_metrics(
    settings: dict[str, Any],
    history: list[dict[str, Any]],
    elapsed: float,
    report: DataReport,
    tensorboard: Path | None,
) -> dict[str, Any]:
    """What `metrics.json` records of a finished stage: its settings, the loss history and rates, memory, data."""
    return {
        **settings,
        "final_loss": history[-1]["loss"] if history else None,
        "elapsed_s_this_run": elapsed,
        "mean_samples_per_s": float(np.mean([h["samples_per_s"] for h in history])) if history else None,
        "peak_memory": peak_memory(),
        "data": report.to_dict(),
        "history": history,
        "tensorboard": str(tensorboard) if tensorboard is not None else None,
    }


def _train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    micro: list[dict[str, Any]],
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
) -> tuple[float, int, int]:
    """Forward and backward over one global batch's micro-batches (the loss averaged over all its supervised tokens,
    on every process), then gradient clipping: (loss, supervised tokens, tokens). The caller steps the optimizer."""
    world, accumulation = accelerator.num_processes, len(micro)
    hlora = accelerator.unwrap_model(model).hlora
    counts = torch.tensor(
        [sum(num_supervised(b["labels"]) for b in micro), sum(int(b["attention_mask"].sum()) for b in micro)],
        device=accelerator.device,
    )
    n_global, tokens = accelerator.reduce(counts, reduction="sum").tolist()
    step_loss = torch.zeros((), device=accelerator.device)
    for j, b in enumerate(micro):
        sync = contextlib.nullcontext() if j == accumulation - 1 else accelerator.no_sync(model)
        # The plugin selection must hold through backward too: checkpointed layers are recomputed there.
        with sync, hlora.use(b["plugins"]):
            pixels = b["pixel_values"]
            output = model(
                input_ids=b["input_ids"].to(accelerator.device),
                plugins=b["plugins"],
                pixel_values=None if pixels is None else pixels.to(accelerator.device),
                attention_mask=b["attention_mask"].to(accelerator.device),
                labels=b["labels"].to(accelerator.device),
                num_items_in_batch=max(n_global, 1),
                use_cache=False,
            )
            # sum over this micro-batch / global count; x world undoes DDP's mean, x accumulation accelerate's
            accelerator.backward(output.loss * world * accumulation)
        step_loss += output.loss.detach().float()
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    return accelerator.reduce(step_loss, reduction="sum").item(), n_global, tokens


def train(
    stage: str,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
) -> TrainResult:
    """Run one stage (`stage1_comprehension`, `stage1_generation`, `stage2`, `stage3_comprehension`,
    `stage3_generation`, or any stage the recipe defines) of the recipe in `config_file` with dotted `overrides`
    (`["stage3.lr=2e-4", "--train.max_steps=10"]`); `resume` continues from the last checkpoint."""
    return run_stage(load_recipe(config_file, overrides, stage), stage, resume=resume)
