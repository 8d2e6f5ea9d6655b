"""The three-stage learning strategy (REFERENCE §7.2, Table 7) as data: what trains, at which rates, on what.

A `Recipe` holds the model to start from, data and engine settings, and one `StageConfig` per run: stage 1 for
comprehension (projector only) and for generation (projector + generation H-LoRA), stage 2 (embeddings and head,
the "fusion" layer shared by both plugins), stage 3 for each plugin (its H-LoRA + projector). Each stage starts
from the outputs of the stages named in `init_from`. Recipes load from YAML/JSON and take dotted overrides.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from torch import nn

from healthgpt.config import COMPREHENSION, GENERATION, PluginConfig, check_guidance_scale, get_variant
from healthgpt.errors import HealthGPTError
from healthgpt.quantize import TRAINABLE_MODES

Schedule = Literal["cosine", "constant"]
STAGE_NAMES = ("stage1_comprehension", "stage1_generation", "stage2", "stage3_comprehension", "stage3_generation")
SELECTORS = ("projector:<plugin>", "plugin:<plugin>", "vision:<plugin>", "embeddings", "head")


class RecipeError(HealthGPTError):
    """A recipe file or override that does not describe a valid training run."""


@dataclass(frozen=True)
class StageConfig:
    """One training run (a column of Table 7). `trainable` selectors: `projector:<plugin>`, `plugin:<plugin>`,
    `vision:<plugin>` (the CLIP layers only that plugin reads), `embeddings`, `head`; projectors learn at `adapter_lr`,
    tower layers at `vision_lr` (`lr` when unset), everything else at `lr`."""

    tasks: tuple[str, ...]
    trainable: tuple[str, ...]
    adapter_lr: float
    lr: float
    global_batch_size: int
    dropout: float = 0.0  # H-LoRA dropout of every plugin during this stage
    code_noise: float = 0.0  # chance that a teacher-forced image-code input is replaced by a random code
    # chance that a generation sample is learned as its classifier-free-guidance twin (the condition dropped)
    condition_dropout: float = 0.0
    schedule: Schedule = "cosine"  # cosine = linear warm-up then cosine decay; constant = warm-up then flat
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    weight_decay: float = 0.0
    vision_lr: float | None = None  # the tower layers' rate (`vision:<plugin>`), usually below `lr` as in LLaVA-NeXT
    max_grad_norm: float = 1.0
    data: tuple[str, ...] = ()
    init_from: tuple[str, ...] = ()  # stage names (outputs under the recipe's output_dir) or folders

    def __post_init__(self) -> None:
        for name in ("data", "init_from"):  # one file or stage given as a plain string (`train.data=my.json`)
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        if not self.tasks or set(self.tasks) - {COMPREHENSION, GENERATION}:
            raise RecipeError(f"tasks must be some of {COMPREHENSION!r}, {GENERATION!r}, got {self.tasks}")
        if not self.trainable:
            raise RecipeError("a stage must train something: give `trainable` selectors")
        if self.schedule not in ("cosine", "constant"):
            raise RecipeError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        rates = (self.warmup_ratio, self.dropout, self.code_noise, self.condition_dropout)
        if self.global_batch_size < 1 or not all(0.0 <= rate < 1.0 for rate in rates):
            raise RecipeError(
                "need global_batch_size >= 1 and warmup_ratio, dropout, code_noise and condition_dropout each in "
                f"[0, 1), got {self.global_batch_size}, {', '.join(map(str, rates[:3]))} and {rates[3]}"
            )


@dataclass(frozen=True)
class ModelSpec:
    """Where the weights come from: `init`, a whole trained model to fine-tune ("nano" or a bundle folder); else the
    `base_llm` and `vision_tower` folders with fresh projectors and plugins; else random weights (tests)."""

    variant: str = "nano"
    init: str | None = None  # "nano" or a bundle folder: start from all of its weights
    base_llm: str | None = None  # local folder (or hub id) of the base causal LM
    vision_tower: str | None = None  # local folder (or hub id) of the CLIP vision tower
    seed: int = 0
    dtype: str = "float32"  # storage dtype of the weights; compute precision is `engine.mixed_precision`
    # PluginConfig fields by plugin: those of one the variant has replace its own (`comprehension: {vision_layer: 1}`);
    # a new plugin needs at least rank and alpha
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantize: str | None = None  # train over a quantized base (QLoRA-style): int8 (any device) or nf4 (CUDA)
    images_after_text: bool | None = None  # where user turns show their images; None: the variant's layout
    # The exported model's default classifier-free guidance (`HealthGPTConfig.guidance_scale`); None: the variant's
    # or the `init` model's. Worth setting only where the generation stages learn condition dropout.
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in TRAINABLE_MODES:
            raise RecipeError(
                f"model.quantize must be one of {', '.join(TRAINABLE_MODES)} or null to train over it, got "
                f"{self.quantize!r} (torchao's int4 kernels have no backward)"
            )
        if self.guidance_scale is not None:
            try:
                check_guidance_scale(self.guidance_scale, "model.guidance_scale")
            except ValueError as exc:
                raise RecipeError(str(exc)) from None
        if self.plugins and self.init is None:  # checked now, not after an hour of pre-training
            try:
                variant = get_variant(self.variant)
            except ValueError as exc:
                raise RecipeError(f"model.variant: {exc}") from None
            self.plugin_configs(variant.plugins)

    def plugin_configs(self, plugins: Mapping[str, PluginConfig]) -> dict[str, PluginConfig]:
        """A variant's `plugins` with this spec's fields applied (see `plugins`)."""
        merged = dict(plugins)
        for name, values in self.plugins.items():
            try:
                merged[name] = dataclasses.replace(merged[name], **values) if name in merged else PluginConfig(**values)
            except (TypeError, ValueError) as exc:
                known = ", ".join(f.name for f in dataclasses.fields(PluginConfig))
                raise RecipeError(
                    f"model.plugins.{name}: {exc}. A plugin's fields are {known}; a new plugin needs rank and alpha"
                ) from None
        return merged


@dataclass(frozen=True)
class DataSpec:
    """How records become samples (see `healthgpt.data`)."""

    image_folder: str | None = None  # default: each data file's folder
    code_cache: str | None = None  # folder written by `tokenize_images`; needed for generation records
    max_length: int = 2048
    overlong: Literal["drop", "truncate"] = "truncate"
    on_error: Literal["skip", "raise"] = "skip"
    generation_text: Literal["drop", "before", "after"] = "drop"
    num_workers: int = 0
    field_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineSpec:
    """How a stage runs: per-device micro-batch, precision, checkpoints, logging."""

    micro_batch_size: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 500  # optimizer steps between resumable checkpoints (the last step always saves)
    keep_checkpoints: int = 2
    log_every: int = 1


@dataclass(frozen=True)
class Recipe:
    """Everything needed to run any stage; `stages` defaults to Table 7 of `preset` (m3 or l14)."""

    output_dir: str
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    preset: str = "m3"
    stages: dict[str, StageConfig] = field(default_factory=dict)

    def stage(self, name: str) -> StageConfig:
        if name not in self.stages:
            raise RecipeError(f"unknown stage {name!r}; this recipe has {', '.join(self.stages)}")
        return self.stages[name]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def table7(preset: str = "m3") -> dict[str, StageConfig]:
    """Table 7's five runs for HealthGPT-M3 or -L14 (AdamW, weight decay 0; epochs and warm-up are not published:
    one epoch and 3% warm-up, LLaVA's defaults)."""
    if preset not in ("m3", "l14"):
        raise RecipeError(f"Table 7 has presets 'm3' and 'l14', got {preset!r}")
    comp, gen = COMPREHENSION, GENERATION
    return {
        "stage1_comprehension": StageConfig(
            tasks=(comp,), trainable=(f"projector:{comp}",), adapter_lr=1e-3, lr=2e-4, global_batch_size=256
        ),
        "stage1_generation": StageConfig(
            tasks=(gen,),
            trainable=(f"projector:{gen}", f"plugin:{gen}"),
            adapter_lr=2e-5,
            lr=2e-4 if preset == "m3" else 1e-4,
            global_batch_size=64,
            dropout=0.05,
        ),
        "stage2": StageConfig(
            tasks=(comp, gen),
            trainable=("embeddings", "head"),
            adapter_lr=2e-5,
            lr=2e-4,
            global_batch_size=32,
            dropout=0.05,
            schedule="constant",
            init_from=("stage1_comprehension", "stage1_generation"),
        ),
        "stage3_comprehension": StageConfig(
            tasks=(comp,),
            trainable=(f"plugin:{comp}", f"projector:{comp}"),
            adapter_lr=2e-5,
            lr=2e-4,
            global_batch_size=128,
            dropout=0.05,
            init_from=("stage2",),
        ),
        "stage3_generation": StageConfig(
            tasks=(gen,),
            trainable=(f"plugin:{gen}", f"projector:{gen}"),
            adapter_lr=2e-5,
            lr=2e-4,
            global_batch_size=64,
            dropout=0.05,
            init_from=("stage2",),
        ),
    }


def _parse_value(text: str) -> Any:
    """An override value: YAML scalars/lists, plus floats like `1e-4` that YAML 1.1 reads as strings."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set(tree: dict[str, Any], path: Sequence[str], value: Any, override: str) -> None:
    node = tree
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {override!r}: {key!r} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str], stage: str | None = None) -> dict[str, Any]:
    """Apply `key.path=value` overrides (a leading `--` is allowed) to a raw recipe dict, in place.

    The first key is a section (`model`, `data`, `engine`, `stages`, `output_dir`, `preset`), a stage name, a stage
    prefix (`stage3.lr=2e-4` sets both stage-3 runs) or `train` (the stage being run, `--train.lr=1e-4`)."""
    stages = tree.setdefault("stages", {})
    names = list(dict.fromkeys([*table7(tree.get("preset", "m3")), *stages]))
    for override in overrides:
        key, sep, text = override.removeprefix("--").partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise RecipeError(f"override {override!r} must look like `section.key=value`")
        value = _parse_value(text)
        head, rest = path[0], path[1:]
        if head in ("model", "data", "engine", "output_dir", "preset", "stages"):
            _set(tree, path, value, override)
            continue
        if head == "train":
            if stage is None:
                raise RecipeError(f"override {override!r}: `train.` needs the stage being run")
            targets = [stage]
        else:
            targets = [head] if head in names else [n for n in names if n.startswith(head + "_")]
        if not targets or not rest:
            raise RecipeError(
                f"override {override!r}: {head!r} is no section or stage; use model., data., engine., train., "
                f"or a stage ({', '.join(names)}) or stage prefix such as stage3."
            )
        for name in targets:
            _set(stages, [name, *rest], value, override)
    return tree


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    if not isinstance(values, Mapping):
        raise RecipeError(f"{where} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {unknown}; known: {', '.join(known)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise RecipeError(f"{where}: {e}") from None


def recipe_from_dict(tree: Mapping[str, Any]) -> Recipe:
    """A checked `Recipe` from a raw dict; stage entries are merged over the preset's Table 7 defaults."""
    tree = dict(tree)
    if "output_dir" not in tree:
        raise RecipeError("a recipe needs `output_dir` (where stage outputs, checkpoints and logs go)")
    preset = tree.get("preset", "m3")
    stages = {name: dataclasses.asdict(cfg) for name, cfg in table7(preset).items()}
    for name, values in (tree.get("stages") or {}).items():
        if not isinstance(values, Mapping):
            raise RecipeError(f"stages.{name} must be a mapping")
        stages[name] = {**stages.get(name, {}), **values}
    return Recipe(
        output_dir=str(tree["output_dir"]),
        model=_build(ModelSpec, tree.get("model") or {}, "model"),
        data=_build(DataSpec, tree.get("data") or {}, "data"),
        engine=_build(EngineSpec, tree.get("engine") or {}, "engine"),
        preset=preset,
        stages={name: _build(StageConfig, values, f"stages.{name}") for name, values in stages.items()},
    )


def load_recipe(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (), stage: str | None = None
) -> Recipe:
    """A recipe from a YAML or JSON file (or only from overrides when `path` is None) with overrides applied."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RecipeError(f"{path}: cannot read the recipe ({e})") from e
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe file must hold a mapping")
        tree = loaded
    return recipe_from_dict(apply_overrides(json.loads(json.dumps(tree)), overrides, stage))


def select_parameters(model: nn.Module, selectors: Sequence[str]) -> dict[str, dict[str, nn.Parameter]]:
    """{selector: {parameter name: parameter}} for a `HealthGPTModel`; unknown selectors and plugins raise."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict[str, nn.Parameter]] = {}
    for selector in selectors:
        kind, _, plugin = selector.partition(":")
        if kind == "projector" and plugin in model.projectors:
            params = list(model.projectors[plugin].parameters())
        elif kind == "plugin" and plugin in model.hlora.plugin_names:
            params = model.hlora.parameters_of(plugin)
        elif kind == "vision" and plugin in model.projectors:
            params = [p for layer in model.own_vision_layers(plugin) for p in layer.parameters()]
            if not params:
                raise RecipeError(
                    f"{selector!r}: the {plugin} plugin reads the CLIP tower at hidden_states"
                    f"[{model.vision_layers[plugin]}], no deeper than another plugin, so no tower layer is its own; "
                    "drop the selector or read this plugin deeper (model.plugins.<plugin>.vision_layer)"
                )
        elif selector == "embeddings":
            params = [model.llm.get_input_embeddings().weight]
        elif selector == "head":
            params = [model.llm.get_output_embeddings().weight]
        else:
            raise RecipeError(
                f"unknown trainable selector {selector!r}; use {', '.join(SELECTORS)} "
                f"with a plugin of this model ({', '.join(model.plugin_names)})"
            )
        out[selector] = {names[id(p)]: p for p in params}
    return out


def set_plugin_dropout(model: nn.Module, p: float) -> None:
    """Set the H-LoRA dropout of every plugin of every wrapped layer (Table 7's per-stage dropout)."""
    for layer in model.hlora.layers.values():
        for plugin in layer.plugins.values():
            plugin.dropout = nn.Dropout(p) if p > 0 else nn.Identity()


def prepare_stage(model: nn.Module, stage: StageConfig) -> list[dict[str, Any]]:
    """Freeze everything but the stage's selections, set its dropout, and return AdamW parameter groups
    (projectors at `adapter_lr`, the rest at `lr`); a parameter picked twice (tied weights) is used once."""
    selected = select_parameters(model, stage.trainable)
    model.requires_grad_(False)
    seen: set[int] = set()
    groups: dict[float, list[nn.Parameter]] = {}
    for selector, params in selected.items():
        kind = selector.partition(":")[0]
        lr = stage.adapter_lr if kind == "projector" else stage.lr
        if kind == "vision" and stage.vision_lr is not None:
            lr = stage.vision_lr
        for p in params.values():
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                groups.setdefault(lr, []).append(p)
    set_plugin_dropout(model, stage.dropout)
    return [{"params": params, "lr": lr, "weight_decay": stage.weight_decay} for lr, params in groups.items()]
