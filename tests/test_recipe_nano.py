"""The nano recipe end to end (slow), and the embedded nano model it made: loaded by name, it answers and converts
held-out phantoms, and `healthgpt demo` runs on it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from healthgpt.api import HealthGPT
from healthgpt.checkpoints import embedded_bundle
from healthgpt.data.phantoms import iter_records
from healthgpt.metrics import image_metrics
from healthgpt.pretrain import NanoBudget
from healthgpt.pretrain.nano import chest_films, torch_threads
from healthgpt.recipes import nano as nano_recipe
from healthgpt.recipes.nano import CONFIG_FILE, METRICS_FILE, MODEL_DIR, PANEL_FILE, RECIPE_FILE, resolve_recipe, run
from healthgpt.training.stages import STAGE_NAMES, RecipeError

PARTS = ("pretrain", "phantoms", "tokenize_images", "stage1", "stage2", "stage3", "export", "evaluate")


@pytest.fixture(scope="module")
def embedded() -> HealthGPT:
    return HealthGPT.from_pretrained("nano")


def _held_out(kinds: tuple[str, ...], n_cases: int) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """Records of phantom cases no part of the recipe saw (the test split of another seed than the recipe's)."""
    return list(iter_records(n_cases, seed=1, split="test", tasks=kinds))


def test_embedded_model_answers_held_out_presence_questions(embedded: HealthGPT) -> None:
    rows = _held_out(("presence",), 10)  # a CT and an MRI question per case
    images = [Image.fromarray(pixels[record["image"]]).convert("RGB") for record, pixels in rows]
    questions = [record["conversations"][0]["value"].removeprefix("<image>\n") for record, _ in rows]
    answers = embedded.ask(images, questions, max_new_tokens=8)
    truths = [record["conversations"][1]["value"] for record, _ in rows]
    assert len(rows) == 20 and set(truths) == {"yes", "no"}
    right = [a.strip().lower().rstrip(".") == t for a, t in zip(answers, truths, strict=True)]
    assert np.mean(right) >= 0.8, list(zip(answers, truths, strict=True))


def test_embedded_model_converts_held_out_ct_to_mri(embedded: HealthGPT) -> None:
    rows = _held_out(("ct2mri",), 4)
    sources = [Image.fromarray(pixels[record["image"]]).convert("RGB") for record, pixels in rows]
    made = embedded.generate_image(sources, "ct2mri", progress=False)
    scores = [
        image_metrics(np.asarray(m.image.convert("L")), pixels[record["target_image"]])["ssim"]
        for m, (record, pixels) in zip(made, rows, strict=True)
    ]
    assert np.mean(scores) > 55.0, scores


def test_embedded_bundle_is_small_self_contained_and_loaded_by_name() -> None:
    folder = embedded_bundle("nano")
    manifest = json.loads((folder / "bundle.json").read_text())
    assert manifest["llm"] == "llm" and manifest["vision"] == "vision" and manifest["vqgan"]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 10 * 2**20


@pytest.mark.parametrize("folder", [False, True], ids=["default", "bundle-folder"])
def test_demo_shows_every_task_in_one_panel_and_prints_the_figures(tmp_path: Path, folder: bool) -> None:
    out = tmp_path / "shown"
    model = str(embedded_bundle("nano")) if folder else "nano"  # a recipe's folder works as the embedded name does
    chosen = ["--model", model] if folder else []

    def demo(*flags: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "healthgpt.cli", "demo", "--out", str(out), *chosen, *flags]
        env = {**os.environ, "COLUMNS": "400"}  # rich wraps at 80 columns without a terminal; the folder path is long
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)

    done = demo()
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert f"Model: {model}," in text and "toy" in text.lower() and "not for clinical use" in text.lower()
    for task in ("reconstruct", "ct2mri", "mri2ct", "super_resolution"):
        assert re.search(rf"{task}: SSIM \d+\.\d, lesions kept \d/\d", text), task
    assert re.search(r"report_to_cxr: read: CTR \d\.\d\d, .*(matches|does not match) the report", text)
    assert text.count("  Q: ") == text.count("  A: ") >= 4 and "real CT slice" in text
    assert sorted(p.name for p in out.iterdir()) == ["panel.png"]
    width, height = Image.open(out / "panel.png").size
    assert width >= 600 and height >= 5 * 200  # five task rows of input, truth, output

    before = (out / "panel.png").stat().st_mtime_ns
    refused = demo()  # the panel is there: refused before the model loads, nothing touched
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1
    assert "already exists. Fix: choose another name, or pass --overwrite to replace it" in refused.stderr
    assert (out / "panel.png").stat().st_mtime_ns == before
    replaced = demo("--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in out.iterdir()) == ["panel.png"]  # replaced, no temporary left


def test_demo_refuses_a_model_not_trained_on_phantoms(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "healthgpt.cli", "demo", "--out", str(tmp_path / "x"), "--model", "m3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--model m3: the demo runs a model trained on phantoms: nano, or" in done.stderr
    assert not (tmp_path / "x").exists()


def test_recipe_paths_are_rooted_in_the_run_folder_and_overrides_checked_first(tmp_path: Path) -> None:
    recipe = resolve_recipe(CONFIG_FILE, tmp_path, seed=3, overrides=["stage2.max_steps=5"])
    assert recipe.output_dir == str(tmp_path / "stages") and recipe.model.seed == recipe.engine.seed == 3
    assert recipe.model.base_llm == str(tmp_path / "pretrain" / "llm") and recipe.stages["stage2"].max_steps == 5
    assert all(Path(p).parent == tmp_path / "phantoms" for s in recipe.stages.values() for p in s.data)
    assert yaml.safe_load((tmp_path / RECIPE_FILE).read_text())["stages"]["stage2"]["max_steps"] == 5
    with pytest.raises(RecipeError, match="unknown field"):
        run(tmp_path / "bad", overrides=["stage2.steps=5"])
    assert not (tmp_path / "bad" / "pretrain").exists()  # nothing was trained before the recipe was checked
    with pytest.raises(ValueError, match="its model.variant is 'nano' but the run is for 'mini'"):
        run(tmp_path / "other", variant="mini", config_file=CONFIG_FILE)
    assert not (tmp_path / "other" / "pretrain").exists()


def test_a_stage_alone_takes_the_callers_threads_and_a_pair_one_share_each(tmp_path: Path, monkeypatch) -> None:
    """run_stages in parallel: stage 2 (alone) runs with the caller's threads (the recipe gives it both shares), the
    first of a pair with `num_threads` here while its partner's worker is started with as many."""
    seen: dict[str, int] = {}
    monkeypatch.setattr(nano_recipe, "run_stage", lambda recipe, name: seen.setdefault(name, torch.get_num_threads()))
    started: list[tuple[str, str]] = []

    class Worker:
        returncode = 0

        def __init__(self, command: list[str], env: dict[str, str], **kwargs) -> None:
            started.append((command[-1], env["OMP_NUM_THREADS"]))

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(nano_recipe.subprocess, "Popen", Worker)
    monkeypatch.setattr(nano_recipe, "_finished", lambda recipe, name: name)
    recipe = resolve_recipe(CONFIG_FILE, tmp_path, seed=0)
    with torch_threads(2):
        assert nano_recipe.run_stages(recipe, tmp_path / RECIPE_FILE, ["stage2"], True, 1) == [2]
        done = nano_recipe.run_stages(recipe, tmp_path / RECIPE_FILE, list(STAGE_NAMES[3:]), True, 1)
        assert torch.get_num_threads() == 2
    assert done == [1, "stage3_generation"] and started == [("stage3_generation", "1")]
    assert seen == {"stage2": 2, "stage3_comprehension": 1}


def test_chest_films_join_pretraining_only_when_budgeted() -> None:
    films, reports, chats = chest_films(seed=0, n=20, size=64)
    assert len(films) == len(reports) == len(chats) == 20
    assert all(chat[0]["content"] == report for chat, report in zip(chats, reports, strict=True))
    assert all(
        any(word in r for word in ("effusion", "Cardiomegaly", "enlarged")) == _abnormal(f)
        for f, r in zip(films, reports, strict=True)
    )
    assert NanoBudget().chest_films == 0  # nano's pre-training is unchanged


def _abnormal(film) -> bool:
    return film.cardiomegaly or film.effusion != "none"


@pytest.mark.slow
def test_nano_recipe_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(out, seed=0, progress=False)
    metrics = json.loads((out / METRICS_FILE).read_text())
    evaluation = metrics["evaluation"]
    presence = evaluation["closed_questions"]["trained"]["presence"]
    assert presence["n"] >= 100 and presence["accuracy"] >= 0.9
    conversion = evaluation["ct2mri"]
    assert conversion["n"] >= 50 and conversion["trained"]["ssim"] > conversion["untrained"]["ssim"]
    assert all(metrics["seconds"][part] > 0 and metrics["cpu_seconds"][part] > 0 for part in PARTS)
    seconds = metrics["seconds"]
    assert seconds["total"] >= sum(seconds[part] for part in PARTS)
    # training: from nothing to the exported bundle, every part but the evaluation
    assert sum(seconds[part] for part in PARTS[:-1]) <= seconds["training"] <= seconds["total"] - seconds["evaluate"]
    assert list(metrics["stages"]) == list(STAGE_NAMES)
    assert all(s["final_loss"] < s["first_loss"] for s in metrics["stages"].values())
    assert (out / PANEL_FILE).stat().st_size > 0
    loaded = HealthGPT.from_pretrained(out / MODEL_DIR)
    assert json.loads((out / MODEL_DIR / "bundle.json").read_text())["llm"] == "llm"
    assert loaded.vqgan is not None
