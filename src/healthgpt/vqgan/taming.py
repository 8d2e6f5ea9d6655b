"""Reading taming's released files: a Lightning `last.ckpt` (weights-only, with an allow-list) and its `model.yaml`."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from healthgpt.errors import CheckpointError

from .model import VQGAN, build_loaded

# model.yaml `model.target` -> our quantizer name; any other target is refused.
TAMING_TARGETS = {"taming.models.vqgan.GumbelVQ": "gumbel", "taming.models.vqgan.VQModel": "vq"}
# Lightning checkpoints written by PyTorch Lightning 1.x key their callback states by the callback *class*
# (the gumbel f8 `last.ckpt` does); these names unpickle to an inert stand-in, never to Lightning code.
LIGHTNING_CLASS_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)


def load_taming_checkpoint(ckpt_path: str | Path, yaml_path: str | Path | None = None) -> VQGAN:
    """A VQGAN from a taming Lightning `last.ckpt` and its `model.yaml` (default: beside the checkpoint as
    HealthGPT ships it, else `../configs/model.yaml` as taming's released logs do). `loss.*` keys
    (discriminator, perceptual loss) are ignored; every other key must match exactly."""
    ckpt_path = Path(ckpt_path)
    arch = arch_from_taming_yaml(_find_model_yaml(ckpt_path) if yaml_path is None else Path(yaml_path))
    checkpoint = _torch_load(ckpt_path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{ckpt_path}: not a Lightning checkpoint (no 'state_dict' dict inside)")
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("loss.")}
    return build_loaded(arch, state, str(ckpt_path))


def _find_model_yaml(ckpt_path: Path) -> Path:
    candidates = (ckpt_path.with_name("model.yaml"), ckpt_path.parent.parent / "configs" / "model.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = " or ".join(map(str, candidates))
    raise CheckpointError(f"{ckpt_path}: no model.yaml at {tried}; pass yaml_path=<taming model.yaml>")


def arch_from_taming_yaml(yaml_path: str | Path) -> dict[str, Any]:
    """VQGAN constructor arguments from a taming `model.yaml` (`model.target`, `model.params`)."""
    try:
        model = yaml.safe_load(Path(yaml_path).read_text())["model"]
        target = model["target"]
        if target not in TAMING_TARGETS:
            known = ", ".join(TAMING_TARGETS)
            raise CheckpointError(f"{yaml_path}: model.target {target!r} is not one of {known}")
        params = model["params"]
        dd = params["ddconfig"]
        for key, needed in (("double_z", False), ("in_channels", 3), ("out_ch", 3)):  # no usable defaults
            if dd[key] != needed:
                raise CheckpointError(f"{yaml_path}: ddconfig.{key}={dd[key]!r} unsupported (needs {needed})")
        if params.get("remap") is not None:
            raise CheckpointError(f"{yaml_path}: codebook remapping (params.remap) is unsupported")
        return dict(
            num_codes=params["n_embed"],
            embed_dim=params["embed_dim"],
            z_channels=dd["z_channels"],
            ch=dd["ch"],
            ch_mult=list(dd["ch_mult"]),
            num_res_blocks=dd["num_res_blocks"],
            attn_resolutions=list(dd["attn_resolutions"]),
            image_size=dd["resolution"],
            quantizer=TAMING_TARGETS[target],
            dropout=dd.get("dropout", 0.0),
            kl_weight=params.get("kl_weight", 1e-8),
        )
    except OSError as e:
        raise CheckpointError(f"{yaml_path}: cannot read the taming model.yaml ({e}); pass yaml_path") from e
    except (KeyError, TypeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{yaml_path}: not a taming model.yaml, missing or malformed field {e}") from e


class _LightningStandIn:
    """Inert placeholder for Lightning classes found in checkpoints; it has no behaviour to run."""


def _allowed_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """The explicit allow-list for Lightning checkpoints: numpy scalars/dtypes, Lightning class stand-ins."""
    numpy_scalar = np.float64(0).__reduce__()[0]  # `numpy.(_)core.multiarray.scalar` in any numpy version
    numeric_dtypes = {type(np.dtype(c)) for c in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]}
    return [
        np.dtype,
        *numeric_dtypes,
        (numpy_scalar, "numpy.core.multiarray.scalar"),
        (numpy_scalar, "numpy._core.multiarray.scalar"),
        *((_LightningStandIn, name) for name in LIGHTNING_CLASS_NAMES),
    ]


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, then with the explicit allow-list; never arbitrary unpickling."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; pass the taming last.ckpt")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals(_allowed_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))  # torch's reason, first line, no advice
        reason = found.group(1) if found else str(e).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused by the weights-only loader and its allow-list of harmless classes ({reason}); "
            "if you trust its origin, save only {'state_dict': its tensors} with torch.save and pass that file"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from e
