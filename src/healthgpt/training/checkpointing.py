"""Checkpoints that lose nothing, and stage outputs that chain.

Resumable checkpoints (`<stage>/checkpoints/step_XXXXXXXX/`) hold the trainable weights and the optimizer (through
`Accelerator.save_state`, which also handles DeepSpeed and FSDP), the scheduler as JSON, every process's RNG states as
safetensors, and `trainer_state.json` (step, data position, loss history, settings and the SHA-256 of every other
file). A corrupt, changed, missing or extra file refuses the resume. The checksums catch damage, not tampering
(whoever can write the folder can rewrite them): what keeps code out is that nothing is unpickled except accelerate's
optimizer file, through torch's weights-only loader, on one process, DDP and FSDP with full state dicts. Under
DeepSpeed, and FSDP with sharded state dicts, accelerate hands the states to DeepSpeed's loader and
torch.distributed.checkpoint, which unpickle their files: resume those only from folders as trusted as the code
(README, Security). Each checkpoint is written into a temporary folder and renamed when complete, so a run killed
at any moment resumes from the last whole checkpoint; the next save removes what a killed one left.

A stage output (`<stage>/output/`) holds `weights.safetensors`: every tensor this stage trained or inherited from
the stages it started from, with the stage that last trained each tensor recorded in the file's metadata, so
outputs of parallel stages (stage 3 comprehension and generation) merge without ambiguity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from healthgpt.errors import CheckpointError
from healthgpt.io.atomic import atomic_target, match_umask, replacing

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
STAGE_FILE = "stage.json"
TRAINER_STATE = "trainer_state.json"
ACCELERATE_WEIGHTS = "model.safetensors"
SCHEDULER_STATE = "scheduler.json"
RNG_STATE = "rng_state_{}.safetensors"  # one per process
_ACCELERATE_RNG = "random_states_{}.pkl"  # accelerate's pickled copy, replaced by RNG_STATE
_PREFIX = "step_"
_TMP = ".tmp-"


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
    with replacing(directory) as target, atomic_target(target, directory=True) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"origins": json.dumps(dict(origins), sort_keys=True)})
        (tmp / STAGE_FILE).write_text(json.dumps(dict(info), indent=2, default=str) + "\n")


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
    accelerator: Accelerator,
    root: str | os.PathLike[str],
    state: Mapping[str, Any],
    keep: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Path | None:
    """Save everything needed to resume after `state["step"]` optimizer steps; all processes must call it."""
    root = Path(root)
    final = root / f"{_PREFIX}{int(state['step']):08d}"
    tmp = root / f"{_TMP}{final.name}"  # the same name on every process
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP}{_PREFIX}*"):  # what a killed run's save left
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        (tmp / _ACCELERATE_RNG.format(accelerator.process_index)).unlink(missing_ok=True)
        _save_rng_state(tmp / RNG_STATE.format(accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / SCHEDULER_STATE).write_text(json.dumps(scheduler.state_dict(), allow_nan=False) + "\n")
            match_umask(tmp)
            files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / TRAINER_STATE).write_text(json.dumps({**state, "files": files}, indent=1) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in checkpoints(root)[: -max(keep, 1)]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # an error, SIGTERM or Ctrl-C: no half-written checkpoint stays behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def load_checkpoint(
    accelerator: Accelerator,
    path: str | os.PathLike[str],
    model: nn.Module,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states from `path` after checking every file against the
    checksums in its trainer state; returns that state. The saved weights must be the model's trainable parameters."""
    path = Path(path)
    state = _read_json(path / TRAINER_STATE)
    _verify_files(path, state.get("files") if isinstance(state, dict) else None)
    weights = path / ACCELERATE_WEIGHTS
    if weights.is_file():
        saved = _tensor_names(weights)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if saved != trainable:
            raise CheckpointError(
                f"{path} holds other trainable weights than this stage trains "
                f"(missing {sorted(trainable - saved)[:5]}, extra {sorted(saved - trainable)[:5]})"
            )
    try:  # the optimizer file, through torch's weights-only loader with accelerate's allow-list of NumPy types
        accelerator.load_state(str(path), strict=False)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{_pickling_file(path)}: holds Python objects other than tensors, which are never unpickled "
            f"(tampered?); {_fix(path)}"
        ) from None
    scheduler.load_state_dict(_read_json(path / SCHEDULER_STATE))
    _load_rng_state(path / RNG_STATE.format(accelerator.process_index))
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: unreadable ({type(exc).__name__}); the checkpoint is corrupt: delete its folder to resume from "
            "the one before"
        ) from None


def _fix(folder: Path) -> str:
    return f"delete {folder} to resume from the checkpoint before it, or start the stage afresh"


def _pickling_file(folder: Path) -> Path:
    """The file of `folder` that a weights-only load refuses, as accelerate's did (the folder if none is found
    again); torch's own loader, as `accelerate.utils.load` exists only in later accelerate releases than our floor."""
    for file in sorted(folder.rglob("*.bin")):
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return file
    return folder


def _tensor_names(path: Path) -> set[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); {_fix(path.parent)}") from None


def _verify_files(folder: Path, files: Any) -> None:
    """Refuse a checkpoint whose files differ in any way from those its trainer state lists, or that holds the
    pickled files of accelerate that this project never writes (RNG and custom states)."""
    fix = _fix(folder)
    pickled = sorted(folder.glob("*.pkl"))
    if pickled:
        raise CheckpointError(f"{pickled[0]}: checkpoints of this project hold no pickled state (planted?); {fix}")
    if not isinstance(files, dict):
        raise CheckpointError(f"{folder}: {TRAINER_STATE} lists no file checksums (old or tampered); {fix}")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(present - set(files) - {TRAINER_STATE})
    if extra:
        raise CheckpointError(f"{folder / extra[0]}: not part of the checkpoint as written (planted?); {fix}")
    for name, digest in sorted(files.items()):
        file = folder / name
        if not file.is_file() or file.is_symlink():
            raise CheckpointError(f"{file}: missing from the checkpoint; {fix}")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file}: changed since it was written (corrupt or tampered checksum); {fix}")


def _save_rng_state(path: Path) -> None:
    """Python, NumPy, torch CPU and CUDA generator states as safetensors (the Python and NumPy scalars in its
    metadata), so resuming unpickles nothing."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(words),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python": [version, gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    save_file(tensors, str(path), metadata={"scalars": json.dumps(meta)})


def _load_rng_state(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["scalars"])
        tensors = load_file(str(path))
        version, gauss = meta["python"]
        kind, pos, has_gauss, cached = meta["numpy"]
        random.setstate((version, tuple(tensors["python"].tolist()), gauss))
        np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(tensors["torch"])
        cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: unusable RNG state ({type(exc).__name__}); the resume would not be exact: delete the checkpoint"
        ) from None
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
