"""The setup of one training stage: accelerate, the model's trained selection, data, optimizer and resumption."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from healthgpt.api import HealthGPT
from healthgpt.data.collate import collate
from healthgpt.data.image_codes import ImageCodeCache
from healthgpt.data.records import load_records
from healthgpt.data.samples import DataReport, SampleBuilder, TrainingDataset, build_samples
from healthgpt.quantize import quantize_base
from healthgpt.training.checkpointing import (
    checkpoints,
    load_checkpoint,
    load_tensors,
    merge_stage_outputs,
    trainable_filter,
)
from healthgpt.training.stages import Recipe, RecipeError, StageConfig, prepare_stage
from healthgpt.training.steps import StepBatchSampler, lr_lambda

log = logging.getLogger(__name__)


def setup_accelerator(recipe: Recipe, stage: StageConfig, out: Path) -> tuple[Accelerator, int, bool]:
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


def setup_model(
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


def _enable_checkpointing(llm: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant); transformers >= 5.x renamed the method."""
    enable = getattr(llm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def setup_dataset(recipe: Recipe, stage: StageConfig, hg: HealthGPT) -> tuple[TrainingDataset, DataReport]:
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
        images_after_text=hg.config.images_after_text,
    )
    twins = stage.condition_dropout > 0
    specs, report = build_samples(found, builder, tasks=stage.tasks, codes=codes, on_error=data.on_error, twins=twins)
    if twins and not report.twins:
        raise RecipeError(
            "condition_dropout is set but the stage's data has no one-turn generation records to drop the condition "
            "of: add generation data or set condition_dropout=0"
        )
    return TrainingDataset(specs, hg.preprocessor, hg.model.num_patches, hg.model.image_vocab, codes), report


def setup_optimizer(
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


def resume_run(
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


def setup_loader(
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
        twins=dataset.has_twin if stage.condition_dropout else None,
        twin_rate=stage.condition_dropout,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=recipe.data.num_workers,
        collate_fn=partial(collate, pad_id=pad_id),
        generator=torch.Generator().manual_seed(engine.seed),  # iter() must not draw from the restored global RNG
    )
