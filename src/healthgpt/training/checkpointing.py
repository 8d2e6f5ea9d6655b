"""Checkpoints that lose nothing, and stage outputs that chain.

Resumable checkpoints (`<stage>/checkpoints/step_XXXXXXXX/`) hold the trainable weights, optimizer, scheduler,
every process's RNG states (through `Accelerator.save_state`, which also handles DeepSpeed and FSDP) and
`trainer_state.json` (step, data position, loss history, settings). Each is written into a temporary folder and
renamed when complete, so a run killed at any moment resumes from the last whole checkpoint.

A stage output (`<stage>/output/`) holds `weights.safetensors`: every tensor this stage trained or inherited from
the stages it started from, with the stage that last trained each tensor recorded in the file's metadata, so
outputs of parallel stages (stage 3 comprehension and generation) merge without ambiguity.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from healthgpt.errors import CheckpointError
from healthgpt.io.atomic import atomic_target

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
STAGE_FILE = "stage.json"
TRAINER_STATE = "trainer_state.json"
ACCELERATE_WEIGHTS = "model.safetensors"
_PREFIX = "step_"


def save_stage_output(
    directory: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    origins: Mapping[str, str],
    info: Mapping[str, Any],
) -> None:
    """Write `weights.safetensors` (with per-tensor origins in its metadata) and `stage.json`, as one atomic folder
    (an existing output is replaced only once the new one is complete)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    with atomic_target(staging, directory=True) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"origins": json.dumps(dict(origins), sort_keys=True)})
        (tmp / STAGE_FILE).write_text(json.dumps(dict(info), indent=2, default=str) + "\n")
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)


def read_stage_output(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, origins) of a stage output folder."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{directory}: no stage output ({WEIGHTS} missing); run that stage first")
    with safe_open(str(path), framework="pt") as f:
        origins = json.loads((f.metadata() or {}).get("origins", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, origins


def merge_stage_outputs(sources: Sequence[str | os.PathLike[str]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Merge stage outputs: a tensor in several takes the value from the output whose own stage trained it;
    tensors none of them trained must agree exactly."""
    merged: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}
    owner: dict[str, str] = {}  # key -> source that trained it
    for source in sources:
        tensors, source_origins = read_stage_output(source)
        stage = json.loads((Path(source) / STAGE_FILE).read_text()).get("stage")
        for key, value in tensors.items():
            trained_here = source_origins.get(key) == stage
            if key in merged:
                if trained_here and key in owner:
                    raise CheckpointError(f"{key} was trained by both {owner[key]} and {source}; merge one of them")
                if not trained_here and key not in owner and not torch.equal(merged[key], value):
                    raise CheckpointError(f"{key} differs between the stage outputs and none of them trained it")
                if not trained_here:
                    continue
            merged[key], origins[key] = value, source_origins.get(key, str(source))
            if trained_here:
                owner[key] = str(source)
    return merged, origins


def load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `model` by state-dict key; every key must exist with the same shape."""
    own = model.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    mismatched = [
        f"{k}: {list(own[k].shape)} vs {list(v.shape)}"
        for k, v in tensors.items()
        if k in own and own[k].shape != v.shape
    ]
    if unexpected or mismatched:
        raise CheckpointError(
            f"{source} does not fit this model: unexpected keys {unexpected[:5]}, shape mismatches {mismatched[:5]}"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)


def checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary folders of interrupted saves are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def save_checkpoint(
    accelerator: Accelerator, root: str | os.PathLike[str], state: Mapping[str, Any], keep: int
) -> Path | None:
    """Save everything needed to resume after `state["step"]` optimizer steps; all processes must call it."""
    root = Path(root)
    final = root / f"{_PREFIX}{int(state['step']):08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(dict(state), indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(root)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def trainable_filter(accelerator: Accelerator) -> None:
    """Make `save_state` store only the parameters that require grad (the frozen base is rebuilt, not saved)."""

    def hook(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        for model, state in zip(models, weights, strict=False):
            keep = {name for name, p in model.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in keep]:
                del state[key]

    accelerator.register_save_state_pre_hook(hook)


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike[str], model: nn.Module) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states from `path`; returns its trainer state. The saved
    weights must be exactly the model's trainable parameters."""
    path = Path(path)
    weights = path / ACCELERATE_WEIGHTS
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            saved = set(f.keys())
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if saved != trainable:
            raise CheckpointError(
                f"{path} holds other trainable weights than this stage trains "
                f"(missing {sorted(trainable - saved)[:5]}, extra {sorted(saved - trainable)[:5]})"
            )
    accelerator.load_state(str(path), strict=False)
    return json.loads((path / TRAINER_STATE).read_text())
