"""The model a recipe trains and exports: built from `recipe.model`, and assembled from stage outputs as a bundle."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from healthgpt.api import HealthGPT
from healthgpt.checkpoints import load_base_parts, load_vqgan, resolve_dtype
from healthgpt.config import get_variant
from healthgpt.model import build_model
from healthgpt.training.checkpointing import WEIGHTS, load_tensors, merge_stage_outputs
from healthgpt.training.stages import Recipe, RecipeError, load_recipe

OUTPUT = "output"


def build_healthgpt(recipe: Recipe) -> HealthGPT:
    """The starting model: a whole trained model (`model.init`), the base LLM and CLIP tower from `recipe.model` with
    fresh projectors and plugins, or the variant with random weights; with `model.guidance_scale` as its default."""
    spec = recipe.model
    if spec.init is not None:
        if (
            spec.base_llm is not None
            or spec.vision_tower is not None
            or spec.plugins
            or spec.images_after_text is not None
        ):
            raise RecipeError(
                "model.init starts from a whole model: leave model.base_llm, vision_tower, plugins and "
                "images_after_text unset"
            )
        model = HealthGPT.from_pretrained(spec.init, dtype=spec.dtype)
        if spec.guidance_scale is not None:
            model.config = model.config.replace(guidance_scale=spec.guidance_scale)
        return model
    config = get_variant(spec.variant)
    if spec.guidance_scale is not None:
        config = config.replace(guidance_scale=spec.guidance_scale)
    if spec.plugins:
        config = config.replace(plugins=spec.plugin_configs(config.plugins))
    if spec.images_after_text is not None:
        config = config.replace(images_after_text=spec.images_after_text)
    if spec.base_llm is None:
        model = HealthGPT.random(config, seed=spec.seed)
    else:
        if spec.vision_tower is None:
            raise RecipeError("model.base_llm is set but model.vision_tower is not; give both folders")
        dtype = resolve_dtype(spec.dtype)
        vision, pre, llm, tokenizer, prompts = load_base_parts(Path(spec.base_llm), Path(spec.vision_tower), dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)  # fresh projectors and plugins: the same on every process
            core = build_model(config, llm, vision, tokenizer)
        model = HealthGPT(core, tokenizer, config, pre, prompts)
    dtype = resolve_dtype(spec.dtype)
    if dtype != torch.float32:
        model.model.to(dtype)
    return model


def stage_outputs(recipe: Recipe, sources: Sequence[str]) -> list[Path]:
    """Output folders of stages named in `sources` (under the recipe's output_dir); other entries are folders."""
    return [Path(recipe.output_dir) / src / OUTPUT if src in recipe.stages else Path(src) for src in sources]


def export_model(
    config_file: str | Path | None,
    directory: str | Path,
    *,
    stages: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    include_base: bool = False,
    vqgan: str | Path | None = None,
) -> Path:
    """Assemble the trained model from stage outputs (merged as `init_from` merges them) and write it as a bundle
    that `HealthGPT.from_pretrained` loads; `vqgan` is the tokenizer folder the codes were made with. `stages`
    defaults to the stage-3 runs that have an output (one is enough when fine-tuning one plugin of `model.init`).
    The base is built in full precision even when the stages trained over a quantized one (`model.quantize`): the
    trained tensors are full precision, so the bundle loads with or without `quantize`."""
    recipe = load_recipe(config_file, overrides)
    if stages is None:
        stages = [name for name in ("stage3_comprehension", "stage3_generation") if name in recipe.stages]
        done = [name for name in stages if (stage_outputs(recipe, [name])[0] / WEIGHTS).is_file()]
        if not done:
            raise RecipeError(f"{recipe.output_dir}: no stage-3 output yet; train stage3_comprehension or _generation")
        stages = done
    hg = build_healthgpt(recipe)
    sources = stage_outputs(recipe, stages)
    tensors, _ = merge_stage_outputs(sources)
    if not include_base and any(key.startswith("vision.") for key in tensors):
        raise RecipeError(
            f"{', '.join(map(str, sources))}: the stages trained layers of the CLIP tower (`vision:<plugin>`), which a "
            "bundle that refers to the base tower would lose; export with --include-base"
        )
    load_tensors(hg.model, tensors, ", ".join(map(str, sources)))
    if vqgan is not None:
        hg.vqgan = load_vqgan(vqgan).eval()
    return hg.save_pretrained(directory, include_base=include_base)
