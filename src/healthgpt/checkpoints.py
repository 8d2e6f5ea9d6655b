"""Loading the officially released HealthGPT files strictly: keys mapped deterministically onto our modules,
rank and expert count read from the tensors and checked, every expected key present and every key used.

The released `.bin` files are `torch.save` dicts keyed from the published PeftModel root (REFERENCE §2.4):
`base_model.model.model.layers.{i}.….lora_{A,B,route}.weight`, `base_model.model.model.mm_projector.{0,2}.*`,
and for the fusion file `base_model.model.model.embed_tokens.weight` / `base_model.model.lm_head.weight`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .hlora import HLoRAStateError, infer_plugin_shape
from .model import HealthGPTModel
from .vision import VisionEncoder

OFFICIAL_PREFIX = "base_model.model."
PROJECTOR_PREFIX = OFFICIAL_PREFIX + "model.mm_projector."
EMBED_KEY = OFFICIAL_PREFIX + "model.embed_tokens.weight"
HEAD_KEY = OFFICIAL_PREFIX + "lm_head.weight"


class CheckpointError(ValueError):
    """A weight file that is missing, unreadable, or does not fit the model; the message says which and why."""


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (`float32`, `bfloat16`, `float16`, or the published `FP32`/`FP16`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def _require_dir(path: str | Path, what: str, needed: str) -> Path:
    path = Path(path)
    if not (path / needed).is_file():
        raise CheckpointError(
            f"{path}: no {needed} here, so this is not a {what} folder; give the folder that "
            f"holds {needed} (download it with `huggingface-cli download`)"
        )
    return path


def load_base_llm(path: str | Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base causal LM and its tokenizer from a local transformers folder."""
    path = _require_dir(path, "base LLM", "config.json")
    llm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return llm, tokenizer


def load_vision_tower(path: str | Path, dtype: torch.dtype) -> VisionEncoder:
    """The CLIP vision tower from a local transformers folder (a full CLIP or a CLIPVisionModel checkpoint)."""
    path = _require_dir(path, "CLIP vision tower", "config.json")
    return VisionEncoder(CLIPVisionModel.from_pretrained(path, dtype=dtype))


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A tensor dict from a `.bin`/`.pt` (`torch.load(weights_only=True)`: no code runs) or `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found; check the path (or download it from the Hub)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for corrupt files; name the file instead
        raise CheckpointError(
            f"{path}: cannot read the weights ({type(e).__name__}: {e}); the file may be "
            "truncated or not a weight file — download it again"
        ) from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return dict(state)


def _describe(keys: list[str], first: int = 5) -> str:
    more = f" ... ({len(keys) - first} more)" if len(keys) > first else ""
    return ", ".join(keys[:first]) + more


def load_official_plugin(model: HealthGPTModel, plugin: str, path: str | Path) -> None:
    """Load an official H-LoRA file (`com_hlora_weights*.bin`, `gen_hlora_weights.bin`) into one plugin and its
    projector. Raises `CheckpointError` naming the file, the wrong rank/experts, or the missing/unused keys."""
    state = load_state_file(path)
    lora = {k[len(OFFICIAL_PREFIX) :]: v for k, v in state.items() if k.startswith(OFFICIAL_PREFIX) and ".lora_" in k}
    projector = {k[len(PROJECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
    unused = sorted(set(state) - {OFFICIAL_PREFIX + k for k in lora} - {PROJECTOR_PREFIX + k for k in projector})
    if unused:
        raise CheckpointError(f"{path}: {len(unused)} key(s) not used by plugin {plugin!r}: {_describe(unused)}")
    if not lora:
        raise CheckpointError(f"{path}: no H-LoRA tensors (keys '{OFFICIAL_PREFIX}…lora_A.weight') in the file")
    cfg = model.hlora.configs[plugin]
    try:
        rank, experts = infer_plugin_shape(lora)
    except HLoRAStateError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if (rank, experts) != (cfg.rank, cfg.num_experts):
        raise CheckpointError(
            f"{path}: the file holds H-LoRA rank {rank} with {experts} experts, but plugin {plugin!r} is configured "
            f"with rank {cfg.rank} and {cfg.num_experts} experts; use the variant this file belongs to"
        )
    try:
        model.hlora.load_plugin_state_dict(plugin, lora)
    except HLoRAStateError as e:
        raise CheckpointError(f"{path}: {e}") from e
    load_projector(model, plugin, projector, source=str(path))


def load_projector(model: HealthGPTModel, plugin: str, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load one plugin's `mlp2x_gelu` projector (`0.weight`, `0.bias`, `2.weight`, `2.bias`)."""
    target = model.projectors[plugin]
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(
            f"{source}: projector of plugin {plugin!r} is missing {', '.join('mm_projector.' + k for k in missing)}"
        )
    bad = [
        f"mm_projector.{k}: expected {list(own[k].shape)}, got {list(state[k].shape)}"
        for k in own
        if state[k].shape != own[k].shape
    ]
    if bad:
        raise CheckpointError(f"{source}: projector shape mismatch: {'; '.join(bad)}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


def load_official_fusion(model: HealthGPTModel, path: str | Path) -> None:
    """Load `fusion_layer_weights.bin`: the stage-2 embedding and output head (all rows, image codes included)."""
    state = load_state_file(path)
    expected = {EMBED_KEY: model.llm.get_input_embeddings().weight, HEAD_KEY: model.llm.get_output_embeddings().weight}
    missing = sorted(set(expected) - set(state))
    unused = sorted(set(state) - set(expected))
    if missing or unused:
        raise CheckpointError(
            f"{path}: fusion file keys do not fit: missing [{_describe(missing)}], unused [{_describe(unused)}]"
        )
    for key, weight in expected.items():
        if state[key].shape != weight.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {list(state[key].shape)}, the model needs "
                f"{list(weight.shape)}: the tokenizer must have the 8,195 image tokens added"
            )
    with torch.no_grad():
        for key, weight in expected.items():
            weight.copy_(state[key])
