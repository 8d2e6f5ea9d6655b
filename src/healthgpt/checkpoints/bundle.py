"""Our bundle: `config.json`, `bundle.json` (what is included or referenced) and safetensors files with the official
keys, written atomically and loaded strictly."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import (
    PreTrainedTokenizerBase,
)

from ..config import HealthGPTConfig
from ..errors import CheckpointError
from ..fusion import PluginTable, set_plugin_tables
from ..hub import WeightsNotFoundError
from ..io.atomic import atomic_target
from ..model import HealthGPTModel
from ..quantize import base_linears, check_mode, is_quantized
from ..state_keys import check_keys
from ..vision import ImagePreprocessor
from ..vqgan import VQGAN
from .files import _dtype_name, load_state_file, resolve_dtype
from .official import EMBED_KEY, HEAD_KEY, _tables, load_plugin_state, official_plugin_parameters
from .parts import LoadedModel, _assemble, _no_progress_bars, _place

MANIFEST = "bundle.json"
_MANIFEST_KEYS = ("format", "version", "dtype", "llm", "vision", "plugins", "plugin_tables", "vqgan")
BUNDLE_FORMAT = "healthgpt-bundle"
BUNDLE_VERSION = 1


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
    llm_dir = Path(config.llm.source)
    _check_savable(model, config, include_base)
    first_row = _first_changed_row(model, None if include_base else llm_dir)
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "dtype": _dtype_name(model.llm.get_input_embeddings().weight.dtype),
        "llm": "llm" if include_base else {"path": str(llm_dir.resolve()), "weights": _weight_files(llm_dir)},
        "vision": "vision" if include_base else {"path": str(Path(config.vision.source).resolve())},
        "plugins": list(model.plugin_names),
        "plugin_tables": [],
        "vocab_first_row": first_row,
        "vqgan": vqgan is not None,
    }
    with atomic_target(directory, directory=True) as tmp:
        config.save(tmp / "config.json")
        _save_tokenizer(tokenizer, tmp / "tokenizer")
        manifest["plugin_tables"] = _save_plugins(model, tmp / "plugins")
        tables = _tables(model)
        rows = {k: m.weight[first_row:] for k, m in tables.items()}
        if rows[EMBED_KEY].shape[0]:
            save_file(_contiguous(rows), tmp / "vocab.safetensors", metadata={"first_row": str(first_row)})
        if include_base:
            _save_base(model, preprocessor, tmp)
        if vqgan is not None:
            vqgan.save(tmp / "vqgan")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _check_savable(model: HealthGPTModel, config: HealthGPTConfig, include_base: bool) -> None:
    """A quantized base cannot be included; a referenced base must be a local folder and an untrained tower."""
    if include_base and any(is_quantized(linear.weight) for linear in base_linears(model).values()):
        raise CheckpointError(
            "the base LLM is quantized, and a bundle stores it in full precision: save without include_base (the "
            "bundle refers to the base folder), or load the model without quantize first"
        )
    if not include_base and any(p.requires_grad for p in model.vision.tower.parameters()):
        raise CheckpointError(
            "layers of the CLIP tower were trained (a `vision:<plugin>` stage), and a bundle that refers to the base "
            "tower would lose them: save with include_base=True (--include-base)"
        )
    if not include_base:
        for folder, what in ((Path(config.llm.source), "base LLM"), (Path(config.vision.source), "CLIP tower")):
            if not (folder / "config.json").is_file():
                raise CheckpointError(
                    f"the {what} was not loaded from a local folder ({folder}), so the bundle cannot refer to it; "
                    "copy the base weights in (--include-base; include_base=True in Python)"
                )


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """The tokenizer's files, with its SentencePiece model when it has one."""
    tokenizer.save_pretrained(folder)
    sentencepiece = Path(getattr(tokenizer, "vocab_file", None) or "")
    if sentencepiece.suffix == ".model" and sentencepiece.is_file():
        shutil.copyfile(sentencepiece, folder / "tokenizer.model")


def _save_plugins(model: HealthGPTModel, folder: Path) -> list[str]:
    """One file per plugin (official keys) and per plugin with its own tables; returns the latter plugins."""
    folder.mkdir()
    for plugin in model.plugin_names:
        save_file(_contiguous(official_plugin_parameters(model, plugin)), folder / f"{plugin}.safetensors")
    tables = _tables(model)
    embed = tables[EMBED_KEY]
    with_tables = list(embed.tables) if isinstance(embed, PluginTable) else []
    for plugin in with_tables:
        state = {k: m.tables[plugin] for k, m in tables.items()}
        save_file(_contiguous(state), folder / f"{plugin}.tables.safetensors")
    return with_tables


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
    manifest = _read_manifest(directory)
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
    _load_trained(model, directory, manifest)
    vq = VQGAN.load(directory / "vqgan") if manifest["vqgan"] else None
    if system_prompt is not None:
        config = config.replace(system_prompt=system_prompt)
    _place(model, vq, device, device_map, quantize)
    return LoadedModel(model, tokenizer, config, pre, prompts, vq)


def _read_manifest(directory: Path) -> dict[str, Any]:
    """`bundle.json`, checked for every key and for our format and version."""
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
    return manifest


def _load_trained(model: HealthGPTModel, directory: Path, manifest: Mapping[str, Any]) -> None:
    """What the bundle holds over the base: embedding/head rows, each plugin and each plugin's own tables."""
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
        set_plugin_tables(model, plugin, state[EMBED_KEY], state[HEAD_KEY])


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
