"""The official release's layout (REFERENCE §2.4, §8): H-LoRA and projector files keyed from the PeftModel root, the
fusion file, and their strict loading."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import GENERATION, HealthGPTConfig
from ..errors import CheckpointError
from ..fusion import set_plugin_tables
from ..hlora import HLoRAStateError, infer_plugin_shape
from ..hub import OfficialFiles
from ..model import HealthGPTModel
from ..quantize import check_mode
from ..state_keys import check_keys
from .files import load_state_file, resolve_dtype
from .parts import LoadedModel, _assemble, _place, _warn_if_differs, load_vqgan

log = logging.getLogger(__name__)

OFFICIAL_PREFIX = "base_model.model."
PROJECTOR_PREFIX = OFFICIAL_PREFIX + "model.mm_projector."
EMBED_KEY = OFFICIAL_PREFIX + "model.embed_tokens.weight"
HEAD_KEY = OFFICIAL_PREFIX + "lm_head.weight"
FUSION_MODES = ("generation", "all", "none")


def official_plugin_parameters(model: HealthGPTModel, plugin: str) -> dict[str, nn.Parameter]:
    """One plugin's H-LoRA and projector parameters under their official key names (§2.4): an official name minus
    `base_model.model.` is the path of the wrapped linear in the LLM."""
    if plugin not in model.hlora.configs:
        raise ValueError(f"unknown plugin {plugin!r}; this model has {list(model.hlora.configs)}")
    params = {
        f"{OFFICIAL_PREFIX}{path}.{name}": p
        for path, layer in model.hlora.layers.items()
        for name, p in layer.plugins[plugin].named_parameters()
    }
    return params | {PROJECTOR_PREFIX + name: p for name, p in model.projectors[plugin].named_parameters()}


def _assign(param: nn.Parameter, value: Tensor) -> None:
    """Give `param` the value: the file's own (memory-mapped) storage when dtype and device match, so no second
    copy is ever resident, else a cast copy."""
    with torch.no_grad():
        if value.dtype == param.dtype and value.device == param.device:
            param.data = value
        else:
            param.copy_(value)


def load_plugin_state(model: HealthGPTModel, plugin: str, state: Mapping[str, Tensor], source: str) -> None:
    """Strictly load one plugin (H-LoRA + projector) from official keys: rank and experts first, then keys, shapes."""
    cfg = model.hlora.configs[plugin]
    try:
        rank, experts = infer_plugin_shape({k: v for k, v in state.items() if ".lora_" in k})
    except HLoRAStateError as e:
        raise CheckpointError(f"{source}: {e}") from e
    if (rank, experts) != (cfg.rank, cfg.num_experts):
        raise CheckpointError(
            f"{source}: the file holds H-LoRA rank {rank} with {experts} experts, but plugin {plugin!r} is configured "
            f"with rank {cfg.rank} and {cfg.num_experts} experts; use the variant this file belongs to"
        )
    targets = official_plugin_parameters(model, plugin)
    check_keys(state, {k: v.shape for k, v in targets.items()}, source, f"plugin {plugin!r}")
    for key, target in targets.items():
        _assign(target, state[key])


def _tables(model: HealthGPTModel) -> dict[str, nn.Module]:
    return {EMBED_KEY: model.llm.get_input_embeddings(), HEAD_KEY: model.llm.get_output_embeddings()}


def load_fusion_state(model: HealthGPTModel, state: Mapping[str, Tensor], source: str, fusion: str) -> None:
    """Apply the fusion tables as `fusion` says ("generation": the generation plugin's own tables; "all": into the
    base tables)."""
    bases = {k: m.weight for k, m in _tables(model).items()}
    check_keys(state, {k: w.shape for k, w in bases.items()}, source, "the fusion layer (embedding table and head)")
    if fusion == "all":
        for key, weight in bases.items():
            _assign(weight, state[key])
    else:
        set_plugin_tables(model, GENERATION, state[EMBED_KEY], state[HEAD_KEY])


def load_official(
    config: HealthGPTConfig,
    files: OfficialFiles,
    *,
    vqgan: str | Path | None = None,
    fusion: str = "generation",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    system_prompt: str | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Load the official layout with one plugin per file in `files`; see the module docstring for `fusion`."""
    if fusion not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")
    torch_dtype = resolve_dtype(dtype or config.dtype)
    if device_map is None:  # refuse before loading; with a device map each linear's device is checked
        check_mode(quantize, device, torch_dtype)
    variant = config
    model, tokenizer, prompts, pre, config = _assemble(
        config, list(files.plugin_files), files.base_model, files.vision_tower, torch_dtype, device_map
    )
    _warn_if_differs(variant.name, config.llm, variant.llm, "base LLM")
    _warn_if_differs(variant.name, config.vision, variant.vision, "vision tower")
    for plugin, path in files.plugin_files.items():
        load_plugin_state(model, plugin, load_state_file(path), str(path))
    if files.fusion_file is not None and fusion != "none":
        if fusion == "generation" and GENERATION not in config.plugins:
            log.warning("%s: not loaded; with fusion='generation' only generation uses it", files.fusion_file)
        else:
            load_fusion_state(model, load_state_file(files.fusion_file), str(files.fusion_file), fusion)
    vq = load_vqgan(vqgan) if vqgan is not None else None
    if vq is not None:
        config = config.replace(vq=dataclasses.replace(config.vq, source=str(vqgan)))
    if system_prompt is not None:
        config = config.replace(system_prompt=system_prompt)
    _place(model, vq, device, device_map, quantize)
    return LoadedModel(model, tokenizer, config, pre, prompts, vq)
