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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import EMBEDDED, GENERATION, VARIANTS, HealthGPTConfig
from ..errors import CheckpointError
from ..fusion import PluginTable, set_plugin_tables
from ..hub import WeightsNotFoundError, is_repo_id, resolve_official_files, variant_of_hub_id
from ..state_keys import check_keys
from .bundle import MANIFEST, load_bundle, save_bundle
from .files import check_finite, load_state_file, resolve_dtype
from .official import (
    EMBED_KEY,
    FUSION_MODES,
    HEAD_KEY,
    OFFICIAL_PREFIX,
    load_official,
    load_plugin_state,
    official_plugin_parameters,
)
from .parts import LoadedModel, load_base_llm, load_base_parts, load_vision_tower, load_vqgan

__all__ = [
    "EMBED_KEY",
    "FUSION_MODES",
    "HEAD_KEY",
    "OFFICIAL_PREFIX",
    "CheckpointError",
    "LoadedModel",
    "PluginTable",
    "WeightsNotFoundError",
    "check_finite",
    "check_keys",
    "convert_official",
    "embedded_bundle",
    "load",
    "load_base_llm",
    "load_base_parts",
    "load_bundle",
    "load_official",
    "load_plugin_state",
    "load_state_file",
    "load_vision_tower",
    "load_vqgan",
    "official_plugin_parameters",
    "resolve_dtype",
    "save_bundle",
    "set_plugin_tables",
]


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
    placement = dict(dtype=dtype, device=device, device_map=device_map, system_prompt=system_prompt, quantize=quantize)
    if isinstance(source, str) and source.lower() in EMBEDDED and not Path(source).exists():
        source = embedded_bundle(source.lower())
    if isinstance(source, (str, Path)) and (Path(source) / MANIFEST).is_file():
        extra = dict(variant=variant, plugins=plugins, plugin_files=plugin_files, fusion_file=fusion_file, vqgan=vqgan)
        given = sorted(k for k, v in extra.items() if v is not None)
        if given or fusion != "generation":
            raise ValueError(f"{source} is a bundle; {', '.join(given) or 'fusion'} apply only to the official layout")
        return load_bundle(source, base_model=base_model, vision_tower=vision_tower, **placement)
    folder, config = _official_source(source, variant)
    wanted = list(plugins or plugin_files or config.plugins)
    files = resolve_official_files(
        config,
        wanted,
        need_fusion=fusion == "all" or (fusion == "generation" and GENERATION in wanted),
        base_model=base_model,
        vision_tower=vision_tower,
        plugin_files=plugin_files,
        fusion_file=fusion_file,
        folder=folder,
        cache_dir=cache_dir,
        revision=revision,
    )
    return load_official(config, files, vqgan=vqgan, fusion=fusion, **placement)


def _official_source(
    source: str | Path | HealthGPTConfig | None, variant: str | HealthGPTConfig | None
) -> tuple[Path | None, HealthGPTConfig]:
    """(the folder holding official files, or None; the variant's config) of a `source` that is not a bundle."""
    folder: Path | None = None
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        folder = Path(source)
    elif source is not None:
        if variant is not None:
            raise ValueError(f"give the variant once: source={source!r} and variant={variant!r}")
        variant = source
    return folder, _variant(variant, folder)


def embedded_bundle(name: str) -> Path:
    """The folder of a bundle shipped inside the package (`EMBEDDED`)."""
    folder = Path(__file__).resolve().parents[1] / "assets" / name
    if not (folder / MANIFEST).is_file():
        raise WeightsNotFoundError(
            f"the embedded {name} model is missing from {folder.parent}: reinstall healthgpt, or train it with "
            f"healthgpt.recipes.nano.run(<folder>, variant={name!r}) and load <folder>/model"
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
