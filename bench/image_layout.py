"""Where a user turn's image goes, side by side in one run: mini trained to reconstruct phantoms with the published
layout (the image before the instruction) and with `images_after_text` (after it), from one pre-training and the
same data and steps; each scored on held-out phantoms (SSIM to the input, lesion recall, false lesions, and the share
of generated codes equal to the VQGAN's codes of the input). The two layouts train at once, one process per core.

    python bench/image_layout.py [--steps 400] [--cases 20] [--out folder (reused when prepared)]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from healthgpt.api import HealthGPT
from healthgpt.data.image_codes import tokenize_images
from healthgpt.data.phantoms import MODALITIES
from healthgpt.evaluation.phantom_goals import held_out, score_images
from healthgpt.pretrain import NanoBudget, pretrain_nano
from healthgpt.recipes.nano import CONFIG_FILE, resolve_recipe, write_phantoms
from healthgpt.training.loop import export_model, run_stage

LAYOUTS = {"published (image first)": False, "images_after_text": True}
STAGES = ("stage1_generation", "stage2", "stage3_generation")
# mini's pre-training with a shorter VQGAN run (its SSIM is about 89 after 700 steps): codes good enough to copy.
BUDGET = NanoBudget(train_cases=800, vqgan_steps=700, vqgan_batch=8, clip_steps=400, lm_steps=300)


def prepare(root: Path, cases: int) -> None:
    """Pre-train mini's VQGAN, LM and CLIP, write reconstruction phantoms and their VQ codes under `root`."""
    pretrain_nano(root / "pretrain", budget=BUDGET, progress=False, variant="mini")
    write_phantoms(root / "phantoms", cases, seed=0, test_fraction=0.05, size=64, tasks=["reconstruct"])
    tokenize_images(root / "phantoms" / "train.json", root / "pretrain" / "vqgan", root / "codes")


def recipe_file(root: Path, name: str, steps: int) -> Path:
    """mini's recipe cut to its generation path on reconstruction records: stage 1 generation, stage 2, stage 3
    generation (`steps` steps), with absolute paths into `root`."""
    tree = yaml.safe_load(CONFIG_FILE.with_name("mini.yaml").read_text())
    tree["model"] |= {"base_llm": str(root / "pretrain" / "llm"), "vision_tower": str(root / "pretrain" / "vision")}
    tree["data"]["code_cache"] = str(root / "codes")
    data = [str(root / "phantoms" / "reconstruct.json")]
    stages = {name: {**tree["stages"][name], "data": data} for name in STAGES}
    stages["stage2"] |= {"init_from": ["stage1_generation"], "max_steps": 100}
    stages["stage3_generation"]["max_steps"] = steps
    tree["stages"] = stages
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def train_and_score(root: Path, name: str, after_text: bool, steps: int, cases: int) -> dict[str, Any]:
    """Train one layout on one thread, export it and score its reconstructions of `cases` held-out phantoms."""
    torch.set_num_threads(1)
    out = root / name.split()[0]
    out.mkdir(exist_ok=True)
    overrides = [f"model.images_after_text={str(after_text).lower()}"]
    recipe = resolve_recipe(recipe_file(root, out.name, steps), out, 0, overrides)
    start = time.perf_counter()
    losses = {stage: run_stage(recipe, stage).final_loss for stage in STAGES}
    seconds = time.perf_counter() - start
    vqgan = root / "pretrain" / "vqgan"
    bundle = export_model(out / "recipe.yaml", out / "model", stages=[STAGES[-1]], include_base=True, vqgan=vqgan)
    model = HealthGPT.from_pretrained(bundle)
    assert model.config.images_after_text is after_text, "the bundle keeps the layout it was trained with"
    phantoms, _ = held_out(cases, seed=0, size=64)
    scores = {}
    for modality in MODALITIES:
        rgb = [case.rgb(modality.lower()) for case in phantoms]
        made = model.generate_image(rgb, "reconstruct", progress=False)
        with torch.inference_mode():
            truth = model.vqgan.encode(model.vqgan.preprocess(rgb)).flatten(1)
        generated = torch.stack([g.codes.flatten() for g in made])
        codes = float((generated == truth).float().mean())
        scores[modality] = {**score_images([g.image for g in made], phantoms, modality), "codes_equal": codes}
    return {"loss": losses[STAGES[-1]], "train_s": seconds, **scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="stage-3 generation steps per layout")
    parser.add_argument("--cases", type=int, default=20, help="held-out phantoms per modality")
    parser.add_argument("--train-cases", type=int, default=700, help="phantom cases written for training")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="image_layout_"))
    if not (root / "codes" / "manifest.json").is_file():  # a folder prepared by an earlier run is reused
        prepare(root, args.train_cases)
    with multiprocessing.get_context("spawn").Pool(len(LAYOUTS)) as pool:
        jobs = {n: pool.apply_async(train_and_score, (root, n, a, args.steps, args.cases)) for n, a in LAYOUTS.items()}
        figures = {name: job.get() for name, job in jobs.items()}
    print(f"mini, reconstruct only, {args.steps} stage-3 steps, {args.cases} held-out phantoms per modality")
    print(f"{'figure':<28}" + "".join(f"{name:>26}" for name in figures))
    for modality in MODALITIES:
        for figure in ("ssim", "lesion_recall", "false_lesions", "codes_equal"):
            cells = "".join(f"{f[modality][figure]:>26.3f}" for f in figures.values())
            print(f"{modality + ' ' + figure:<28}" + cells)
    print(f"{'final loss':<28}" + "".join(f"{f['loss']:>26.3f}" for f in figures.values()))
    (root / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures: {root / 'figures.json'}")


if __name__ == "__main__":
    main()
