"""One training stage on accelerate: the same code on CPU, one GPU, DDP, DeepSpeed ZeRO-2/3 or FSDP.

Data order is a function of (seed, epoch) alone and each optimizer step takes the next `global_batch_size`
samples, split over processes and accumulation steps; the loss of a step is the mean cross-entropy over all
supervised tokens of the global batch (each micro-batch sums its token losses and divides by the global count),
so the loss curve does not depend on how the batch is split. Launch with `accelerate launch` for several
processes (configs in `healthgpt/training/configs/`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from healthgpt import jsonout
from healthgpt.api import HealthGPT
from healthgpt.checkpoints import load_base_parts, load_vqgan, resolve_dtype
from healthgpt.config import PluginConfig, get_variant
from healthgpt.data.collate import collate, num_supervised
from healthgpt.data.image_codes import ImageCodeCache
from healthgpt.data.records import load_records
from healthgpt.data.samples import DataReport, SampleBuilder, TrainingDataset, build_samples
from healthgpt.io.atomic import write_atomic
from healthgpt.model import build_model
from healthgpt.quantize import quantize_base
from healthgpt.training.checkpointing import (
    WEIGHTS,
    checkpoints,
    load_checkpoint,
    load_tensors,
    merge_stage_outputs,
    save_checkpoint,
    save_stage_output,
    trainable_filter,
)
from healthgpt.training.stages import Recipe, RecipeError, StageConfig, load_recipe, prepare_stage
from healthgpt.training.steps import StepBatchSampler, lr_lambda, peak_memory, write_loss_plot

log = logging.getLogger(__name__)

OUTPUT = "output"
METRICS = "metrics.json"
LOSS_PLOT = "loss.png"


@dataclass(frozen=True)
class TrainResult:
    """Where a finished stage wrote its output, and how it went."""

    output: Path
    steps: int
    final_loss: float
    metrics_file: Path


def build_healthgpt(recipe: Recipe) -> HealthGPT:
    """The starting model: a whole trained model (`model.init`), the base LLM and CLIP tower from `recipe.model` with
    fresh projectors and plugins, or the variant with random weights."""
    spec = recipe.model
    if spec.init is not None:
        if spec.base_llm is not None or spec.vision_tower is not None or spec.plugins:
            raise RecipeError(
                "model.init starts from a whole model: leave model.base_llm, vision_tower and plugins unset"
            )
        return HealthGPT.from_pretrained(spec.init, dtype=spec.dtype)
    config = get_variant(spec.variant)
    if spec.plugins:
        extra = {name: PluginConfig(**values) for name, values in spec.plugins.items()}
        config = config.replace(plugins={**config.plugins, **extra})
    if spec.base_llm is None:
        model = HealthGPT.random(config, seed=spec.seed)
    else:
        if spec.vision_tower is None:
            raise RecipeError("model.base_llm is set but model.vision_tower is not; give both folders")
        dtype = resolve_dtype(spec.dtype)
        vision, pre, llm, tokenizer, prompts = load_base_parts(Path(spec.base_llm), Path(spec.vision_tower), dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)  # fresh projectors and plugins: the same on every process
            core = build_model(config, llm, vision, tokenizer)
        model = HealthGPT(core, tokenizer, config, pre, prompts)
    dtype = resolve_dtype(spec.dtype)
    if dtype != torch.float32:
        model.model.to(dtype)
    return model


def _enable_checkpointing(llm: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant); transformers >= 5.x renamed the method."""
    enable = getattr(llm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def stage_outputs(recipe: Recipe, sources: Sequence[str]) -> list[Path]:
    """Output folders of stages named in `sources` (under the recipe's output_dir); other entries are folders."""
    return [Path(recipe.output_dir) / src / OUTPUT if src in recipe.stages else Path(src) for src in sources]


def _dataset(recipe: Recipe, stage: StageConfig, hg: HealthGPT) -> tuple[TrainingDataset, DataReport]:
    data = recipe.data
    if not stage.data:
        raise RecipeError("the stage has no data files: set stages.<name>.data (or --train.data=[...])")
    found = load_records(stage.data, image_folder=data.image_folder, on_error=data.on_error, field_map=data.field_map)
    codes = ImageCodeCache.open(data.code_cache) if data.code_cache else None
    if codes is not None and hg.model.image_vocab is not None and codes.num_codes != hg.model.image_vocab.num_codes:
        raise RecipeError(
            f"{data.code_cache} holds {codes.num_codes}-code VQ codes; this model has "
            f"{hg.model.image_vocab.num_codes} code tokens"
        )
    builder = SampleBuilder(
        hg.prompts,
        hg.template,
        num_patches=hg.model.num_patches,
        image_vocab=hg.model.image_vocab,
        num_image_tokens=codes.num_tokens if codes else hg.config.vq.num_image_tokens,
        max_length=min(data.max_length, hg.context_length),
        overlong=data.overlong,
        system=hg.config.system_prompt,
        generation_text=data.generation_text,
    )
    specs, report = build_samples(found, builder, tasks=stage.tasks, codes=codes, on_error=data.on_error)
    return TrainingDataset(specs, hg.preprocessor, hg.model.num_patches, hg.model.image_vocab, codes), report


def run_stage(recipe: Recipe, name: str, *, resume: bool = False, healthgpt: HealthGPT | None = None) -> TrainResult:
    """Train stage `name` of `recipe` from the outputs of its `init_from` stages; write checkpoints, metrics,
    loss plot, TensorBoard logs and the stage output under `<output_dir>/<name>/`. `healthgpt` (default: built
    from `recipe.model`) is trained in place. Reads as a recipe: setup, then one `_train_step` per step, then save."""
    stage, engine = recipe.stage(name), recipe.engine
    out = Path(recipe.output_dir) / name
    ckpt_root = out / "checkpoints"
    accelerator, accumulation, tracking = _setup_accelerator(recipe, stage, out)
    if not resume and (checkpoints(ckpt_root) or (out / OUTPUT).exists()):
        raise RecipeError(
            f"{out} already holds a run of {name}; resume it (--resume; resume=True in Python) or choose another "
            "output_dir"
        )
    hg = healthgpt or build_healthgpt(recipe)
    sources = stage_outputs(recipe, stage.init_from)
    groups, trained, inherited = _setup_model(recipe, stage, hg, sources, accelerator.device)
    dataset, report = _dataset(recipe, stage, hg)
    steps_per_epoch = len(dataset) // stage.global_batch_size
    if steps_per_epoch == 0:
        raise RecipeError(f"{len(dataset)} usable samples, fewer than one global batch ({stage.global_batch_size})")
    total = stage.max_steps or max(1, math.ceil(stage.epochs * steps_per_epoch))
    model, optimizer, scheduler = _setup_optimizer(stage, engine.micro_batch_size, hg.model, groups, accelerator, total)
    settings = {
        "stage": name,
        "config": asdict(stage),
        "world_size": accelerator.num_processes,
        "micro_batch_size": engine.micro_batch_size,
        "samples": len(dataset),
        "seed": engine.seed,
    }
    start, history = _resume(accelerator, ckpt_root if resume else None, model, scheduler, settings, engine.seed, total)
    if tracking:
        accelerator.init_trackers("tensorboard")
    elif accelerator.is_main_process:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
    batches = iter(_loader(recipe, stage, dataset, accelerator, hg.pad_id, start, total))
    params = [p for p in model.parameters() if p.requires_grad]
    if accelerator.is_main_process:
        log.info(
            "%s: %d samples, %d steps (%d per epoch), global batch %d = %d process(es) x %d micro x %d "
            "accumulation; data %s",
            name,
            len(dataset),
            total,
            steps_per_epoch,
            stage.global_batch_size,
            accelerator.num_processes,
            engine.micro_batch_size,
            accumulation,
            json.dumps(report.to_dict()["by_task"]),
        )
    bar = tqdm(total=total, initial=start, desc=name, unit="step", disable=not accelerator.is_main_process)
    began = time.perf_counter()
    for step in range(start, total):
        tic = time.perf_counter()
        micro = [next(batches) for _ in range(accumulation)]
        loss, n_global, tokens = _train_step(accelerator, model, micro, params, stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - tic
        row = {
            "step": step + 1,
            "loss": loss,
            "lr": scheduler.get_last_lr()[-1],
            "samples_per_s": stage.global_batch_size / elapsed,
            "tokens_per_s": tokens / elapsed,
            "supervised_tokens": n_global,
        }
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
        if tracking and (step + 1) % engine.log_every == 0:
            accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
        if (step + 1) % engine.save_every == 0 or step + 1 == total:
            state = {"step": step + 1, "history": history, "settings": settings}
            save_checkpoint(accelerator, ckpt_root, state, engine.keep_checkpoints, scheduler)
    bar.close()
    elapsed = time.perf_counter() - began

    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        origins = {**inherited, **{k: name for k in trained}}  # what this output holds, by the stage that trained it
        info = {"stage": name, "recipe": recipe.to_dict(), "init_from": [str(s) for s in sources], "steps": total}
        save_stage_output(out / OUTPUT, {k: v for k, v in state.items() if k in origins}, origins, info)
        hg.config.save(out / OUTPUT / "config.json")
        run = {"steps": total, "accumulation": accumulation, "global_batch_size": stage.global_batch_size}
        metrics = _stage_metrics(
            {**settings, **run}, history, elapsed, report, out / "tensorboard" if tracking else None
        )
        write_atomic(out / METRICS, jsonout.dumps(metrics, indent=1) + "\n")
        write_loss_plot(history, out / LOSS_PLOT, f"HealthGPT {name}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    hg.model.eval()  # the model is ready to answer (no H-LoRA dropout)
    final = history[-1]["loss"] if history else float("nan")
    return TrainResult(out / OUTPUT, total, final, out / METRICS)


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


def _setup_accelerator(recipe: Recipe, stage: StageConfig, out: Path) -> tuple[Accelerator, int, bool]:
    """(accelerator, gradient accumulation steps, whether TensorBoard logs): the global batch must split evenly into
    micro-batches over the processes."""
    engine = recipe.engine
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    accelerator = Accelerator(
        mixed_precision=engine.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with="tensorboard" if tensorboard else None,
        project_dir=str(out),
    )
    world = accelerator.num_processes
    per_step = engine.micro_batch_size * world
    if stage.global_batch_size % per_step:
        raise RecipeError(
            f"global_batch_size {stage.global_batch_size} is not a multiple of micro_batch_size "
            f"{engine.micro_batch_size} x {world} process(es)"
        )
    accumulation = stage.global_batch_size // per_step
    accelerator.gradient_accumulation_steps = accumulation  # also fills DeepSpeed's "auto"
    return accelerator, accumulation, tensorboard


def _setup_model(
    recipe: Recipe, stage: StageConfig, hg: HealthGPT, sources: Sequence[Path], device: torch.device
) -> tuple[list[dict[str, Any]], list[str], dict[str, str]]:
    """Load the `init_from` outputs, quantize the frozen base if asked, freeze all but the stage's selections (in
    fp32) and switch to training: (optimizer parameter groups, trained names, inherited names -> their stage)."""
    model = hg.model
    inherited: dict[str, str] = {}
    if sources:
        tensors, inherited = merge_stage_outputs(sources)
        load_tensors(model, tensors, ", ".join(map(str, sources)))
    if recipe.model.quantize is not None and hg.quantization is None:
        # QLoRA-style: the frozen base linears are stored quantized; what trains stays in full precision.
        quantize_base(model, recipe.model.quantize, device, training=True)
        hg.quantization = recipe.model.quantize
    groups = prepare_stage(model, stage)
    for group in groups:
        for p in group["params"]:
            p.data = p.data.float()  # fp32 master weights for what trains, whatever the storage dtype
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    if recipe.engine.gradient_checkpointing:
        _enable_checkpointing(model.llm)
    model.train()
    return groups, trained, inherited


def _setup_optimizer(
    stage: StageConfig,
    micro_batch_size: int,
    model: torch.nn.Module,
    groups: list[dict[str, Any]],
    accelerator: Accelerator,
    total: int,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, LambdaLR]:
    """AdamW and the warm-up schedule over `total` steps, prepared by accelerate (DDP or DeepSpeed)."""
    accumulation = accelerator.gradient_accumulation_steps
    warmup = round(stage.warmup_ratio * total)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    scheduler = LambdaLR(optimizer, partial(lr_lambda, warmup=warmup, total=total, schedule=stage.schedule))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds_config["gradient_clipping"] = stage.max_grad_norm
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.gradient_accumulation_steps != accumulation:
        raise RecipeError(
            f"the DeepSpeed config fixes gradient_accumulation_steps to {accelerator.gradient_accumulation_steps}, "
            f'but this stage needs {accumulation}: set it to "auto"'
        )
    trainable_filter(accelerator)
    return model, optimizer, scheduler


def _resume(
    accelerator: Accelerator,
    ckpt_root: Path | None,
    model: torch.nn.Module,
    scheduler: LambdaLR,
    settings: dict[str, Any],
    seed: int,
    total: int,
) -> tuple[int, list[dict[str, Any]]]:
    """(first step, loss history): from the last checkpoint under `ckpt_root` (None: a fresh run) when there is one,
    written with the same settings; else step 0 with the seed set."""
    found = checkpoints(ckpt_root) if ckpt_root is not None else []
    if not found:
        set_seed(seed, device_specific=True)
        return 0, []
    state = load_checkpoint(accelerator, found[-1], model, scheduler)
    if state["settings"] != json.loads(json.dumps(settings)):
        raise RecipeError(f"{found[-1]} was written with other settings; resume with the same recipe and world")
    log.info("resuming %s from %s (step %d of %d)", settings["stage"], found[-1], int(state["step"]), total)
    return int(state["step"]), list(state["history"])


def _loader(
    recipe: Recipe,
    stage: StageConfig,
    dataset: TrainingDataset,
    accelerator: Accelerator,
    pad_id: int,
    start: int,
    total: int,
) -> DataLoader:
    """This process's micro-batches for steps `start`..`total`, in the seeded order every process agrees on."""
    engine = recipe.engine
    sampler = StepBatchSampler(
        len(dataset),
        stage.global_batch_size,
        engine.micro_batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        engine.seed,
        start,
        total,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=recipe.data.num_workers,
        collate_fn=partial(collate, pad_id=pad_id),
        generator=torch.Generator().manual_seed(engine.seed),  # iter() must not draw from the restored global RNG
    )


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


def export_model(
    config_file: str | Path | None,
    directory: str | Path,
    *,
    stages: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    include_base: bool = False,
    vqgan: str | Path | None = None,
) -> Path:
    """Assemble the trained model from stage outputs (merged as `init_from` merges them) and write it as a bundle
    that `HealthGPT.from_pretrained` loads; `vqgan` is the tokenizer folder the codes were made with. `stages`
    defaults to the stage-3 runs that have an output (one is enough when fine-tuning one plugin of `model.init`).
    The base is built in full precision even when the stages trained over a quantized one (`model.quantize`): the
    trained tensors are full precision, so the bundle loads with or without `quantize`."""
    recipe = load_recipe(config_file, overrides)
    if stages is None:
        stages = [name for name in ("stage3_comprehension", "stage3_generation") if name in recipe.stages]
        done = [name for name in stages if (stage_outputs(recipe, [name])[0] / WEIGHTS).is_file()]
        if not done:
            raise RecipeError(f"{recipe.output_dir}: no stage-3 output yet; train stage3_comprehension or _generation")
        stages = done
    hg = build_healthgpt(recipe)
    sources = stage_outputs(recipe, stages)
    tensors, _ = merge_stage_outputs(sources)
    load_tensors(hg.model, tensors, ", ".join(map(str, sources)))
    if vqgan is not None:
        hg.vqgan = load_vqgan(vqgan).eval()
    return hg.save_pretrained(directory, include_base=include_base)
