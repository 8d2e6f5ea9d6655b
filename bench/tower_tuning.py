"""Whether tuning the CLIP layers only the comprehension plugin reads (`vision:comprehension`) lifts mini's held-out
questions: a finished mini recipe run's stage3_comprehension trained again from its own stage-2 output with the
tower's own layers added (at `--vision-lr`), merged with that run's stage3_generation, against the run's own frozen-
tower figures (`metrics.json`, same stage-2 start, data order and thread count). One thread, like the recipe's stage;
a tuned stage and model already in OUT_DIR are reused (only the figures are computed again).

    python bench/tower_tuning.py RUN_DIR OUT_DIR [--vision-lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from healthgpt.api import HealthGPT
from healthgpt.recipes.nano import METRICS_FILE, MODEL_DIR, PHANTOM_DIR, PRETRAIN_DIR, RECIPE_FILE, closed_accuracy
from healthgpt.training.loop import METRICS, OUTPUT, export_model, run_stage
from healthgpt.training.stages import load_recipe

STAGE = "stage3_comprehension"


def last_losses(metrics_file: Path, n: int = 100) -> float:
    """Mean training loss of a stage's last `n` steps."""
    history = json.loads(metrics_file.read_text())["history"]
    return float(np.mean([row["loss"] for row in history[-n:]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished `recipes.nano.run(..., variant='mini')` folder")
    parser.add_argument(
        "out", type=Path, help="the folder of the tuned stage and its model (reused when they are there)"
    )
    parser.add_argument("--vision-lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run, out = args.run.resolve(), args.out.resolve()
    overrides = [
        f"output_dir={out}",
        f"{STAGE}.init_from=[{run}/stages/stage2/{OUTPUT}]",
        f"{STAGE}.trainable=[plugin:comprehension,projector:comprehension,vision:comprehension]",
        f"{STAGE}.vision_lr={args.vision_lr}",
    ]
    recipe = load_recipe(run / RECIPE_FILE, overrides)
    if not (out / STAGE / OUTPUT).is_dir():
        run_stage(recipe, STAGE)
    bundle = out / MODEL_DIR
    if not bundle.is_dir():
        stages = [str(out / STAGE / OUTPUT), str(run / "stages" / "stage3_generation" / OUTPUT)]
        vqgan = run / PRETRAIN_DIR / "vqgan"
        export_model(run / RECIPE_FILE, bundle, overrides=overrides, stages=stages, include_base=True, vqgan=vqgan)
    records = json.loads((run / PHANTOM_DIR / "test.json").read_text())
    tuned = closed_accuracy(HealthGPT.from_pretrained(bundle), records, run / PHANTOM_DIR)
    frozen = json.loads((run / METRICS_FILE).read_text())["evaluation"]["closed_questions"]["trained"]
    rows = {
        "frozen tower (the run)": (run / "stages" / STAGE / METRICS, frozen),
        f"own layers tuned at {args.vision_lr:g}": (out / STAGE / METRICS, tuned),
    }
    print(f"{'comprehension stage':<32} {'loss, last 100':>14} {'seconds':>8} {'presence':>9} {'side':>6} {'count':>6}")
    for name, (metrics, acc) in rows.items():
        seconds = json.loads(metrics.read_text())["elapsed_s_this_run"]
        figures = " ".join(f"{acc[k]['accuracy']:>{w}.3f}" for k, w in (("presence", 9), ("side", 6), ("count", 6)))
        print(f"{name:<32} {last_losses(metrics):>14.4f} {seconds:>8.0f} {figures}")


if __name__ == "__main__":
    main()
