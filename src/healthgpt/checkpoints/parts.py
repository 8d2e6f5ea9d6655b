"""The parts every HealthGPT is assembled from: base LLM, CLIP tower, VQGAN, read from their folders, then put
together with fresh or to-be-loaded plugins and placed on a device."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..config import HealthGPTConfig, LLMConfig, VisionConfig
from ..errors import CheckpointError
from ..hub import WeightsNotFoundError
from ..model import HealthGPTModel, build_model
from ..quantize import format_memory, memory_by_part, quantize_base
from ..tokens import PromptTokenizer
from ..vision import ImagePreprocessor, VisionEncoder
from ..vqgan import VQGAN, load_taming_checkpoint
from .files import _dtype_name

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """Everything the `HealthGPT` facade is made of."""

    model: HealthGPTModel
    tokenizer: PreTrainedTokenizerBase
    config: HealthGPTConfig
    preprocessor: ImagePreprocessor
    prompts: PromptTokenizer
    vqgan: VQGAN | None = None


def load_base_llm(
    path: Path, dtype: torch.dtype, *, device_map: str | dict | None = None, tokenizer_path: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, PromptTokenizer]:
    """The causal LM (memory-mapped, meta-initialised by transformers), its tokenizer, and the prompt tokenizer that
    reproduces the published ids (the SentencePiece `tokenizer.model`, when the folder has one)."""
    _require(path, "config.json", "base LLM")
    tokenizer_path = tokenizer_path or _tokenizer_folder(path)
    with _unreadable_as_checkpoint_error(path, "base LLM"), _no_progress_bars():
        llm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    sentencepiece = tokenizer_path / "tokenizer.model"
    prompts = PromptTokenizer(tokenizer, sentencepiece_model=sentencepiece if sentencepiece.is_file() else None)
    return llm, tokenizer, prompts


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def _tokenizer_folder(llm_dir: Path) -> Path:
    """The base LLM's tokenizer: in its folder, else in a `tokenizer/` beside it (a bundle's layout, e.g. the shipped
    nano model's `llm/`), so a bundle's base folder can be fine-tuned from."""
    for folder in (llm_dir, llm_dir.parent / "tokenizer"):
        if any((folder / name).is_file() for name in _TOKENIZER_FILES):
            return folder
    raise WeightsNotFoundError(
        f"{llm_dir}: no tokenizer ({', '.join(_TOKENIZER_FILES)}) here or in {llm_dir.parent / 'tokenizer'}; "
        "copy the base model's tokenizer files into the folder"
    )


def load_vision_tower(path: Path, dtype: torch.dtype) -> tuple[VisionEncoder, ImagePreprocessor]:
    """The CLIP vision tower (from a full CLIP or a CLIPVisionModel folder) and its image preprocessing."""
    _require(path, "config.json", "CLIP vision tower")
    _require(path, "preprocessor_config.json", "CLIP vision tower")
    with _unreadable_as_checkpoint_error(path, "CLIP vision tower"), _no_progress_bars():
        tower = CLIPVisionModel.from_pretrained(path, dtype=dtype)
    return VisionEncoder(tower), ImagePreprocessor.from_pretrained(str(path))


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" / "Writing model shards" bars (local folders: no download to follow).

    transformers offers only a process-wide switch, so it is turned off for the call and back on after."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_vqgan(path: str | Path) -> VQGAN:
    """A VQGAN from a folder written by `VQGAN.save`, a folder with taming's `last.ckpt` + `model.yaml`, or a
    `.ckpt` file (its `model.yaml` beside it)."""
    path = Path(path)
    if (path / "vqgan.json").is_file():
        return VQGAN.load(path)
    if path.is_dir():
        return load_taming_checkpoint(path / "last.ckpt", path / "model.yaml")
    return load_taming_checkpoint(path)


@contextmanager
def _unreadable_as_checkpoint_error(folder: Path, what: str) -> Iterator[None]:
    """Turn transformers' errors on damaged weight files (safetensors' own error type) into a `CheckpointError`."""
    try:
        yield
    except SafetensorError as e:
        raise CheckpointError(
            f"{folder}: the {what} weights cannot be read ({e}); the file may be truncated: download or copy it again"
        ) from e


def _require(folder: Path, name: str, what: str) -> None:
    if not (folder / name).is_file():
        raise WeightsNotFoundError(f"{folder}: no {name} here, so this is not a {what} folder")


def _llm_config(llm: PreTrainedModel, source: str) -> LLMConfig:
    """The LLM part of the config as read from the loaded model (before any vocabulary change)."""
    c = llm.config
    return LLMConfig(
        arch=c.model_type,
        source=source,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        vocab_rows=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=float(c.rope_parameters["rope_theta"]),
    )


def _vision_config(vision: VisionEncoder, pre: ImagePreprocessor, source: str) -> VisionConfig:
    c = vision.tower.config
    return VisionConfig(
        source=source,
        image_size=c.image_size,
        patch_size=c.patch_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        image_mean=tuple(pre.processor.image_mean),
        image_std=tuple(pre.processor.image_std),
    )


def _warn_if_differs(name: str, found: Any, expected: Any, what: str) -> None:
    """Log the shape fields in which a loaded part differs from the variant's numbers (a wrong folder, or a test)."""
    names = [f.name for f in dataclasses.fields(found)]
    keys = [k for k in names if k != "source" and getattr(found, k) != getattr(expected, k)]
    if keys:
        diffs = ", ".join(f"{k} {getattr(found, k)} (variant: {getattr(expected, k)})" for k in keys)
        log.warning("the %s loaded for %s differs from the variant's: %s", what, name, diffs)


def load_base_parts(
    llm_dir: Path,
    vision_dir: Path,
    dtype: torch.dtype,
    device_map: str | dict | None = None,
    tokenizer_dir: Path | None = None,
) -> tuple[VisionEncoder, ImagePreprocessor, PreTrainedModel, PreTrainedTokenizerBase, PromptTokenizer]:
    """The CLIP tower with its preprocessing and the base LLM with its tokenizers, the parts every HealthGPT is
    assembled from (a loaded release here, a training run's fresh start in `training.loop.build_healthgpt`)."""
    # CLIP first: its fp32 -> dtype conversion peaks before the LLM's weights are resident.
    vision, pre = load_vision_tower(vision_dir, dtype)
    llm, tokenizer, prompts = load_base_llm(llm_dir, dtype, device_map=device_map, tokenizer_path=tokenizer_dir)
    return vision, pre, llm, tokenizer, prompts


def _assemble(
    config: HealthGPTConfig,
    plugins: Sequence[str],
    llm_dir: Path,
    vision_dir: Path,
    dtype: torch.dtype,
    device_map: str | dict | None,
    tokenizer_dir: Path | None = None,
) -> tuple[HealthGPTModel, PreTrainedTokenizerBase, PromptTokenizer, ImagePreprocessor, HealthGPTConfig]:
    """Base LLM + CLIP + fresh plugins and projectors; the config's shapes are those of the loaded models."""
    unknown = sorted(set(plugins) - set(config.plugins))
    if unknown:
        raise ValueError(f"{config.name} has no plugin(s) {unknown}; it has {sorted(config.plugins)}")
    vision, pre, llm, tokenizer, prompts = load_base_parts(llm_dir, vision_dir, dtype, device_map, tokenizer_dir)
    llm_cfg, vision_cfg = _llm_config(llm, str(llm_dir)), _vision_config(vision, pre, str(vision_dir))
    config = config.replace(
        llm=llm_cfg,
        vision=vision_cfg,
        plugins={k: v for k, v in config.plugins.items() if k in plugins},
        dtype=_dtype_name(dtype),
    )
    # Every plugin's weights are loaded strictly next, so they need no training initialisation.
    model = build_model(config, llm, vision, tokenizer, init_adapters=False)
    return model, tokenizer, prompts, pre, config


def _place(
    model: HealthGPTModel, vqgan: VQGAN | None, device: str | torch.device, device_map: Any, quantize: str | None
) -> None:
    """Quantize the base linears (`quantize`), then move to `device`; with a `device_map` the LLM is already
    dispatched (and quantized where it is) and the rest joins its embedding. Logs the memory by part."""
    quantize_base(model, quantize, device if device_map is None else None)
    if device_map is not None:
        device = model.llm.get_input_embeddings().weight.device
        model.vision.to(device)
        model.projectors.to(device)
    else:
        model.to(device)
    if vqgan is not None:
        vqgan.to(device)
    log.info("memory by part: %s", format_memory(memory_by_part(model, vqgan)))
