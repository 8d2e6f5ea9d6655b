"""The mini variant's recipe from nothing with a reduced budget (slow): every part learns, the phantom figures clear
the floors stated here, and the demo runs on the folder it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from healthgpt.api import HealthGPT
from healthgpt.evaluation.phantom_goals import phantom_goals
from healthgpt.pretrain import NanoBudget
from healthgpt.recipes.nano import METRICS_FILE, MODEL_DIR, run
from healthgpt.training.stages import STAGE_NAMES

# A few minutes instead of the hour of pretrain.BUDGETS["mini"] and training/configs/mini.yaml.
BUDGET = NanoBudget(
    train_cases=200,
    eval_cases=40,
    vqgan_steps=400,
    vqgan_batch=8,
    clip_steps=100,
    lm_steps=100,
    corpus_sentences=1000,
    chest_films=100,
)
STEPS = {
    "stage1_comprehension": 30,
    "stage1_generation": 20,
    "stage2": 60,
    "stage3_comprehension": 150,
    "stage3_generation": 150,
}
# Floors (SSIM x100) that an untrained part misses: the untrained VQGAN gives about 10, the untrained LLM no answers.
FLOORS = {"vqgan.ssim": 70.0, "questions.presence": 0.7, "ct2mri.ssim": 40.0, "reconstruct.ssim": 40.0}


@pytest.mark.slow
def test_mini_recipe_from_nothing_with_a_reduced_budget(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [f"{name}.max_steps={n}" for name, n in STEPS.items()]
    run(out, variant="mini", cases=300, budget=BUDGET, progress=False, overrides=overrides)
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert list(metrics["stages"]) == list(STAGE_NAMES) and metrics["pretrain"]["variant"] == "mini"
    assert all(s["final_loss"] < s["first_loss"] for s in metrics["stages"].values())
    model = HealthGPT.from_pretrained(out / MODEL_DIR)
    assert model.config.name == "mini" and model.vqgan.image_size == 64
    figures = phantom_goals(model, n=20, seed=1, progress=False)
    for path, floor in FLOORS.items():
        task, figure = path.split(".")
        assert figures[task][figure] >= floor, (path, figures)

    demo = ["demo", "--model", str(out / MODEL_DIR), "--out", str(tmp_path / "d")]
    shown = subprocess.run([sys.executable, "-m", "healthgpt.cli", *demo], capture_output=True, text=True, timeout=600)
    assert shown.returncode == 0, shown.stderr
    assert "ct2mri: SSIM" in shown.stdout and (tmp_path / "d" / "panel.png").is_file()
