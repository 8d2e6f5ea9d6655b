"""Loading and saving HealthGPT weights strictly, from the official release or from our own bundle.

Official layout (REFERENCE §2.4, §8): a base LLM folder, a CLIP folder, `torch.save` H-LoRA files keyed from the
published PeftModel root (`base_model.model.model.layers.{i}.….lora_{A,B,route}.weight`,
`base_model.model.model.mm_projector.{0,2}.*`), the fusion file (`base_model.model.model.embed_tokens.weight`,
`base_model.model.lm_head.weight`) and taming's VQGAN; `healthgpt.hub` finds them locally or on the Hub.
Our bundle: `config.json` (HealthGPTConfig), `bundle.json` (what is included or referenced) and safetensors files
with the same official keys, so one mapping serves both.

Keys map deterministically: an official name minus `base_model.model.` is our module path. Rank and expert count
are read from the shapes and checked against the config; every expected key must be present and every key used.
`.bin` files are read with `torch.load(weights_only=True)` (no code in them runs), all files memory-mapped, so
loading in the stored dtype never holds two copies of the weights.

The fusion layer (`fusion=`). The published code uses the stage-2 embedding table and head only for generation;
comprehension runs on the base rows (image rows mean-initialised). With both plugins in one model:
* "generation" (default, published behaviour): the generation plugin gets its own copy of both tables, chosen per
  sample by the same selection as the H-LoRA plugins (`PluginTable`); comprehension keeps the base tables;
* "all": the fusion tables replace the base tables for every plugin (the paper's shared stage-2 layer);
* "none": the fusion file is not loaded (generation then sees mean-initialised image rows).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .config import GENERATION, VARIANTS, HealthGPTConfig, LLMConfig, VisionConfig
from .errors import CheckpointError
from .hlora import HLoRAStateError, PluginSelection, infer_plugin_shape
from .hub import OfficialFiles, WeightsNotFoundError, is_repo_id, resolve_official_files, variant_of_hub_id
from .io.atomic import atomic_target
from .model import HealthGPTModel, build_model
from .quantize import base_linears, check_mode, format_memory, is_quantized, memory_by_part, quantize_base
from .tokens import PromptTokenizer
from .vision import ImagePreprocessor, VisionEncoder
from .vqgan import VQGAN, load_taming_checkpoint

log = logging.getLogger(__name__)

OFFICIAL_PREFIX = "base_model.model."
PROJECTOR_PREFIX = OFFICIAL_PREFIX + "model.mm_projector."
EMBED_KEY = OFFICIAL_PREFIX + "model.embed_tokens.weight"
HEAD_KEY = OFFICIAL_PREFIX + "lm_head.weight"
FUSION_MODES = ("generation", "all", "none")
MANIFEST = "bundle.json"
_MANIFEST_KEYS = ("format", "version", "dtype", "llm", "vision", "plugins", "plugin_tables", "vqgan")
BUNDLE_FORMAT = "healthgpt-bundle"
BUNDLE_VERSION = 1
EMBEDDED = ("nano",)  # bundles shipped in the package (`healthgpt/assets/<name>/`), loaded by name

__all__ = [
    "CheckpointError",
    "FUSION_MODES",
    "LoadedModel",
    "PluginTable",
    "WeightsNotFoundError",
    "check_keys",
    "convert_official",
    "load",
    "load_base_parts",
    "load_bundle",
    "load_official",
    "load_state_file",
    "official_plugin_parameters",
    "resolve_dtype",
    "save_bundle",
]


@dataclass
class LoadedModel:
    """Everything the `HealthGPT` facade is made of."""

    model: HealthGPTModel
    tokenizer: PreTrainedTokenizerBase
    config: HealthGPTConfig
    preprocessor: ImagePreprocessor
    prompts: PromptTokenizer
    vqgan: VQGAN | None = None


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----- files -------------------------------------------------------------------------------------------------------
def load_state_file(path: str | Path) -> dict[str, Tensor]:
    """A memory-mapped tensor dict from a `.safetensors` file or a `torch.save` file (`.bin`/`.pt`, read with
    `weights_only=True`: only tensors are unpickled, no code runs). Tensors with NaN or inf are refused."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: weight file not found; check the path (or download it from the Hub)")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # torch reports bytes that are no pickle at all the same way
            raise CheckpointError(f"{path}: not a weight file (unreadable bytes); download or write it again") from e
        raise CheckpointError(
            f"{path}: holds Python objects other than tensors ({found.group(1)}); refusing to unpickle them, as that "
            "could run code. Fix: save its tensors as .safetensors with the tool that wrote it"
        ) from e
    except Exception as e:  # torch.load raises many types (KeyError, RuntimeError, ...) on bytes that are no weights
        raise CheckpointError(
            f"{path}: cannot read the weights ({type(e).__name__}: {e}); the file may be truncated or not a "
            "weight file — download or write it again"
        ) from e
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    check_finite(state, str(path))
    return dict(state)


def check_finite(state: Mapping[str, Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf: the model would answer nothing or noise instead of failing."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{source}: tensor {key} holds NaN or infinite values; the file is damaged or comes from a diverged "
                "run: use another checkpoint"
            )


def _listing(what: str, items: Sequence[str], first: int = 5) -> str:
    more = f", ... ({len(items) - first} more)" if len(items) > first else ""
    return f"{len(items)} {what}: " + ", ".join(items[:first]) + more


def check_keys(state: Mapping[str, Tensor], expected: Mapping[str, torch.Size], source: str, what: str) -> None:
    """Raise `CheckpointError` unless `state` has exactly the `expected` keys with the expected shapes; the message
    lists the first missing, unused and mis-shaped keys with their counts."""
    missing = sorted(expected.keys() - state.keys())
    unused = sorted(state.keys() - expected.keys())
    wrong = [
        f"{k} (file {list(state[k].shape)}, model {list(s)})"
        for k, s in expected.items()
        if k in state and state[k].shape != s
    ]
    problems = [
        _listing(name, items)
        for name, items in (("missing", missing), ("unused", unused), ("with the wrong shape", wrong))
        if items
    ]
    if problems:
        raise CheckpointError(f"{source}: does not fit {what}: " + "; ".join(problems))


# ----- base model, vision tower, VQGAN -----------------------------------------------------------------------------
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


# ----- plugins -----------------------------------------------------------------------------------------------------
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


# ----- fusion layer ------------------------------------------------------------------------------------------------
class PluginTable(nn.Module):
    """The LLM's input embedding or output head, with whole replacement tables for some plugins (the generation
    plugin's fusion layer). The model's `PluginSelection` picks the table per call or per sample, as for H-LoRA.
    `weight` stays the base table, so the HF key names and `get_input_embeddings().weight` are unchanged."""

    def __init__(self, base: nn.Embedding | nn.Linear, selection: PluginSelection) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.padding_idx = getattr(base, "padding_idx", None)
        self.is_embedding = isinstance(base, nn.Embedding)
        self.tables = nn.ParameterDict()
        self.selection = selection

    def _lookup(self, x: Tensor, name: str | None) -> Tensor:
        weight = self.tables[name] if name is not None and name in self.tables else self.weight
        if self.is_embedding:
            return F.embedding(x, weight, self.padding_idx)  # [..., H]
        return F.linear(x, weight, self.bias)  # [..., V]

    def forward(self, x: Tensor) -> Tensor:
        active = self.selection.active
        if active is None or isinstance(active, str):
            return self._lookup(x, active)
        if isinstance(active, Tensor):  # per-row plugin indices (compiled decode): each row keeps its own table
            out = self._lookup(x, None)
            for index, name in enumerate(self.selection.names):
                if name in self.tables:
                    keep = (active == index).view(-1, *[1] * (out.dim() - 1))
                    out = torch.where(keep, self._lookup(x, name), out)
            return out
        if len(active) != x.shape[0]:
            raise ValueError(f"per-sample plugin selection has {len(active)} entries but the input has {x.shape[0]}")
        out = self._lookup(x, None)
        for name, rows in self.selection.groups(x.device):
            if name in self.tables:
                out = out.index_copy(0, rows, self._lookup(x.index_select(0, rows), name))
        return out


def _tables(model: HealthGPTModel) -> dict[str, nn.Module]:
    return {EMBED_KEY: model.llm.get_input_embeddings(), HEAD_KEY: model.llm.get_output_embeddings()}


def set_plugin_tables(model: HealthGPTModel, plugin: str, state: Mapping[str, Tensor]) -> None:
    """Give `plugin` its own embedding table and head (`state` keyed `EMBED_KEY`, `HEAD_KEY`), cast to the base
    tables' dtype and device (no copy when they already match, e.g. memory-mapped from a bundle)."""
    setters = {EMBED_KEY: model.llm.set_input_embeddings, HEAD_KEY: model.llm.set_output_embeddings}
    for key, module in _tables(model).items():
        if not isinstance(module, PluginTable):
            module = PluginTable(module, model.hlora.selection)
            setters[key](module)
        table = state[key].to(dtype=module.weight.dtype, device=module.weight.device)
        module.tables[plugin] = nn.Parameter(table, requires_grad=False)


def load_fusion_state(model: HealthGPTModel, state: Mapping[str, Tensor], source: str, fusion: str) -> None:
    """Apply the fusion tables as `fusion` says ("generation": the generation plugin's own tables; "all": into the
    base tables)."""
    bases = {k: m.weight for k, m in _tables(model).items()}
    check_keys(state, {k: w.shape for k, w in bases.items()}, source, "the fusion layer (embedding table and head)")
    if fusion == "all":
        for key, weight in bases.items():
            _assign(weight, state[key])
    else:
        set_plugin_tables(model, GENERATION, state)


# ----- loading -----------------------------------------------------------------------------------------------------
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


def load(
    source: str | Path | HealthGPTConfig | None = None,
    *,
    variant: str | HealthGPTConfig | None = None,
    base_model: str | Path | None = None,
    vision_tower: str | Path | None = None,
    plugins: Sequence[str] | None = None,
    plugin_files: Mapping[str, str | Path] | None = None,
    fusion_file: str | Path | None = None,
    vqgan: str | Path | None = None,
    fusion: str = "generation",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    system_prompt: str | None = None,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a HealthGPT from our bundle or from the official layout; what `HealthGPT.from_pretrained` calls.

    `source`: a bundle folder (has `bundle.json`); a folder holding the official H-LoRA files; a variant name
    (`m3`, `l14`, `xl32`) or config; a variant's Hub id (`lintw/HealthGPT-M3`, ...); or None with `variant=`.
    Official layout: `plugins` (default: the keys of `plugin_files`, else all of the variant's) each come from
    `plugin_files`, the source folder or the Hub, as do `base_model`, `vision_tower` (folders or Hub ids) and the
    fusion file (needed by the generation plugin unless `fusion="none"`); `vqgan` is a VQGAN folder or taming
    `last.ckpt` (not on the Hub; without it images cannot be decoded). `dtype` defaults to the variant's (float16)
    or the bundle's. `device_map="auto"` spreads the LLM over the GPUs through accelerate (vision tower, projectors
    and VQGAN go to the embedding's device). `system_prompt` replaces the template's published default.
    `"nano"` (unless a folder of that name exists) is the embedded nano bundle, trained by `healthgpt.recipes.nano`.
    `quantize` ("int8", "int4", "nf4") stores the base LLM's linears weight-only in that format (see
    `healthgpt.quantize`); plugins, projectors, tables and head stay in `dtype`.
    """
    if isinstance(source, str) and source.lower() in EMBEDDED and not Path(source).exists():
        source = embedded_bundle(source.lower())
    folder: Path | None = None
    if isinstance(source, (str, Path)) and (Path(source) / MANIFEST).is_file():
        extra = dict(variant=variant, plugins=plugins, plugin_files=plugin_files, fusion_file=fusion_file, vqgan=vqgan)
        given = sorted(k for k, v in extra.items() if v is not None)
        if given or fusion != "generation":
            raise ValueError(f"{source} is a bundle; {', '.join(given) or 'fusion'} apply only to the official layout")
        return load_bundle(
            source,
            dtype=dtype,
            device=device,
            device_map=device_map,
            system_prompt=system_prompt,
            base_model=base_model,
            vision_tower=vision_tower,
            quantize=quantize,
        )
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        folder = Path(source)
    elif source is not None:
        if variant is not None:
            raise ValueError(f"give the variant once: source={source!r} and variant={variant!r}")
        variant = source
    config = _variant(variant, folder)
    wanted = list(plugins or plugin_files or config.plugins)
    need_fusion = fusion == "all" or (fusion == "generation" and GENERATION in wanted)
    files = resolve_official_files(
        config,
        wanted,
        need_fusion=need_fusion,
        base_model=base_model,
        vision_tower=vision_tower,
        plugin_files=plugin_files,
        fusion_file=fusion_file,
        folder=folder,
        cache_dir=cache_dir,
        revision=revision,
    )
    return load_official(
        config,
        files,
        vqgan=vqgan,
        fusion=fusion,
        dtype=dtype,
        device=device,
        device_map=device_map,
        system_prompt=system_prompt,
        quantize=quantize,
    )


def embedded_bundle(name: str) -> Path:
    """The folder of a bundle shipped inside the package (`EMBEDDED`)."""
    folder = Path(__file__).resolve().parent / "assets" / name
    if not (folder / MANIFEST).is_file():
        raise WeightsNotFoundError(
            f"the embedded {name} model is missing from {folder.parent}: reinstall healthgpt, or train it with "
            f"healthgpt.recipes.{name}.run(<folder>) and load that folder"
        )
    return folder


def _variant(variant: str | Path | HealthGPTConfig | None, folder: Path | None) -> HealthGPTConfig:
    """The config of a variant name, Hub id or config; for an official folder alone, the variant whose released
    file names it holds."""
    if isinstance(variant, HealthGPTConfig):
        return variant
    if variant is None:
        if folder is None:
            raise ValueError("give a source (bundle folder, official folder, variant name or Hub id) or variant=")
        matches = [
            v
            for v in VARIANTS.values()
            if any((folder / name).is_file() for key, name in v.official_files.items() if key != "fusion")
        ]
        if len(matches) != 1:
            raise ValueError(f"{folder}: cannot tell the variant from the files there; pass variant='m3'|'l14'|'xl32'")
        return matches[0]
    variant = str(variant)
    config = variant_of_hub_id(variant, VARIANTS) if is_repo_id(variant) else VARIANTS.get(variant.lower())
    if config is None:
        hub_ids = ", ".join(v.hub_id for v in VARIANTS.values() if v.hub_id)
        raise ValueError(f"{variant}: not a folder, a variant name ({', '.join(VARIANTS)}) nor a Hub id ({hub_ids})")
    return config


# ----- our bundle --------------------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> dict[str, int]:
    """Sizes of a transformers folder's weight files: a cheap check that a referenced base did not change."""
    return {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}


def _base_table(folder: Path, key: str) -> Tensor | None:
    """One tensor of a safetensors transformers folder (sharded or not), or None if it is not there."""
    index = folder / "model.safetensors.index.json"
    name = json.loads(index.read_text())["weight_map"].get(key) if index.is_file() else "model.safetensors"
    if name is None or not (folder / name).is_file():
        return None
    with safe_open(folder / name, "pt") as f:
        return f.get_tensor(key) if key in f.keys() else None


def _first_changed_row(model: HealthGPTModel, base: Path | None) -> int:
    """From which row the embedding/head tables must be stored: the image-token rows (which loading re-initialises),
    or all rows if the tables before them differ from the referenced base (fusion="all", trained tables)."""
    rows = model.llm.get_input_embeddings().weight.shape[0]
    start = model.image_vocab.start_id if model.image_vocab is not None else rows
    if base is None:
        return start
    names = {id(p): n for n, p in model.llm.named_parameters()}
    for module in _tables(model).values():
        stored = _base_table(base, names[id(module.weight)])
        n = min(start, stored.shape[0]) if stored is not None else 0
        if stored is None or n < start or not torch.equal(module.weight[:n].cpu(), stored[:n].to(module.weight.dtype)):
            return 0
    return start


def save_bundle(
    directory: str | Path,
    model: HealthGPTModel,
    tokenizer: PreTrainedTokenizerBase,
    config: HealthGPTConfig,
    preprocessor: ImagePreprocessor,
    *,
    vqgan: VQGAN | None = None,
    include_base: bool = False,
) -> Path:
    """Write our bundle into the new folder `directory` (atomically: a temporary folder, then a rename).

    Base LLM and CLIP are referenced by their folders (`config.llm.source`, `config.vision.source`) or, with
    `include_base`, written into `llm/` and `vision/`. Always written: `config.json`, `bundle.json`, the tokenizer,
    one safetensors file per plugin and per plugin table in the official key layout, the changed embedding/head
    rows (`vocab.safetensors`) and the VQGAN."""
    directory = Path(directory)
    llm_dir, vision_dir = Path(config.llm.source), Path(config.vision.source)
    if include_base and any(is_quantized(linear.weight) for linear in base_linears(model).values()):
        raise CheckpointError(
            "the base LLM is quantized, and a bundle stores it in full precision: save without include_base (the "
            "bundle refers to the base folder), or load the model without quantize first"
        )
    if not include_base:
        for folder, what in ((llm_dir, "base LLM"), (vision_dir, "CLIP tower")):
            if not (folder / "config.json").is_file():
                raise CheckpointError(
                    f"the {what} was not loaded from a local folder ({folder}), so the bundle cannot refer to it; "
                    "copy the base weights in (--include-base; include_base=True in Python)"
                )
    first_row = _first_changed_row(model, None if include_base else llm_dir)
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "dtype": _dtype_name(model.llm.get_input_embeddings().weight.dtype),
        "llm": "llm" if include_base else {"path": str(llm_dir.resolve()), "weights": _weight_files(llm_dir)},
        "vision": "vision" if include_base else {"path": str(vision_dir.resolve())},
        "plugins": list(model.plugin_names),
        "plugin_tables": [],
        "vocab_first_row": first_row,
        "vqgan": vqgan is not None,
    }
    with atomic_target(directory, directory=True) as tmp:
        config.save(tmp / "config.json")
        tokenizer.save_pretrained(tmp / "tokenizer")
        sentencepiece = Path(getattr(tokenizer, "vocab_file", None) or "")
        if sentencepiece.suffix == ".model" and sentencepiece.is_file():
            shutil.copyfile(sentencepiece, tmp / "tokenizer" / "tokenizer.model")
        (tmp / "plugins").mkdir()
        for plugin in model.plugin_names:
            state = official_plugin_parameters(model, plugin)
            save_file(_contiguous(state), tmp / "plugins" / f"{plugin}.safetensors")
        tables = _tables(model)
        embed = tables[EMBED_KEY]
        for plugin in embed.tables if isinstance(embed, PluginTable) else ():
            state = {k: m.tables[plugin] for k, m in tables.items()}
            save_file(_contiguous(state), tmp / "plugins" / f"{plugin}.tables.safetensors")
            manifest["plugin_tables"].append(plugin)
        rows = {k: m.weight[first_row:] for k, m in tables.items()}
        if rows[EMBED_KEY].shape[0]:
            save_file(_contiguous(rows), tmp / "vocab.safetensors", metadata={"first_row": str(first_row)})
        if include_base:
            _save_base(model, preprocessor, tmp)
        if vqgan is not None:
            vqgan.save(tmp / "vqgan")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _contiguous(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _save_base(model: HealthGPTModel, preprocessor: ImagePreprocessor, folder: Path) -> None:
    """The LLM's own weights (without plugins and plugin tables, HF key names) and the CLIP tower, as transformers
    folders."""
    plugin_params = {id(p) for layer in model.hlora.layers.values() for p in layer.plugins.parameters()}
    plugin_params |= {id(p) for m in _tables(model).values() if isinstance(m, PluginTable) for p in m.tables.values()}
    state = {
        name.replace(".base_layer.", "."): p.detach()
        for name, p in model.llm.named_parameters(remove_duplicate=False)
        if id(p) not in plugin_params
    }
    with _no_progress_bars():
        model.llm.save_pretrained(folder / "llm", state_dict=state)
        model.vision.tower.save_pretrained(folder / "vision")
    preprocessor.processor.save_pretrained(folder / "vision")


def load_bundle(
    directory: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    system_prompt: str | None = None,
    base_model: str | Path | None = None,
    vision_tower: str | Path | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a bundle written by `save_bundle`, strictly; `base_model` / `vision_tower` replace the folders a bundle
    refers to (when they moved); `quantize` as in `load`."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory}: not a HealthGPT bundle ({e})") from e
    missing = [k for k in _MANIFEST_KEYS if k not in manifest] if isinstance(manifest, dict) else list(_MANIFEST_KEYS)
    if missing:
        raise CheckpointError(
            f"{directory / MANIFEST}: not a bundle manifest (no {', '.join(missing)}); write the bundle again with "
            "`healthgpt convert`"
        )
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != BUNDLE_VERSION:
        raise CheckpointError(
            f"{directory}: bundle format {manifest.get('format')!r} version {manifest.get('version')!r} is not "
            f"{BUNDLE_FORMAT!r} version {BUNDLE_VERSION}"
        )
    config = HealthGPTConfig.load(directory / "config.json")
    llm_dir = _bundle_part(directory, manifest["llm"], base_model, "base_model")
    vision_dir = _bundle_part(directory, manifest["vision"], vision_tower, "vision_tower")
    recorded = manifest["llm"].get("weights") if isinstance(manifest["llm"], dict) else None
    if recorded is not None and base_model is None and _weight_files(llm_dir) != recorded:
        raise CheckpointError(
            f"{directory}: the base model at {llm_dir} changed since the bundle was written (weight files "
            f"{_weight_files(llm_dir)}, recorded {recorded}); give the original folder (--base-model; base_model= "
            "in Python)"
        )
    torch_dtype = resolve_dtype(dtype or manifest["dtype"])
    if device_map is None:
        check_mode(quantize, device, torch_dtype)
    model, tokenizer, prompts, pre, config = _assemble(
        config, manifest["plugins"], llm_dir, vision_dir, torch_dtype, device_map, directory / "tokenizer"
    )
    vocab = directory / "vocab.safetensors"
    if vocab.is_file():
        _load_rows(model, load_state_file(vocab), int(manifest["vocab_first_row"]), str(vocab))
    for plugin in manifest["plugins"]:
        path = directory / "plugins" / f"{plugin}.safetensors"
        load_plugin_state(model, plugin, load_state_file(path), str(path))
    for plugin in manifest["plugin_tables"]:
        path = directory / "plugins" / f"{plugin}.tables.safetensors"
        state = load_state_file(path)
        check_keys(state, {k: m.weight.shape for k, m in _tables(model).items()}, str(path), "the plugin tables")
        set_plugin_tables(model, plugin, state)
    vq = VQGAN.load(directory / "vqgan") if manifest["vqgan"] else None
    if system_prompt is not None:
        config = config.replace(system_prompt=system_prompt)
    _place(model, vq, device, device_map, quantize)
    return LoadedModel(model, tokenizer, config, pre, prompts, vq)


def _bundle_part(directory: Path, entry: str | dict, override: str | Path | None, argument: str) -> Path:
    """The folder of an included (`"llm"`) or referenced (`{"path": ...}`) part of a bundle."""
    if override is not None:
        return Path(override)
    if isinstance(entry, str):
        return directory / entry
    path = Path(entry["path"])
    if not (path / "config.json").is_file():
        flag = "--" + argument.replace("_", "-")
        raise WeightsNotFoundError(
            f"{directory}: the bundle refers to {path}, which is gone; give its folder ({flag}; {argument}= in Python)"
        )
    return path


def _load_rows(model: HealthGPTModel, state: Mapping[str, Tensor], first_row: int, source: str) -> None:
    """Copy stored embedding/head rows `first_row:` into the base tables."""
    bases = {k: m.weight for k, m in _tables(model).items()}
    check_keys(state, {k: w[first_row:].shape for k, w in bases.items()}, source, "the embedding/head rows")
    with torch.no_grad():
        for key, weight in bases.items():
            weight[first_row:].copy_(state[key])


def convert_official(
    output_dir: str | Path, source: str | Path | None = None, *, include_base: bool = False, **kw: Any
) -> Path:
    """Turn the official files into a bundle at `output_dir` (arguments as `load`); returns the bundle's path."""
    if isinstance(source, (str, Path)) and (Path(source) / MANIFEST).is_file():
        raise ValueError(f"{source} is already a bundle")
    loaded = load(source, **kw)
    return save_bundle(
        output_dir,
        loaded.model,
        loaded.tokenizer,
        loaded.config,
        loaded.preprocessor,
        vqgan=loaded.vqgan,
        include_base=include_base,
    )
