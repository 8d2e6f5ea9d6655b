"""The nano recipe: a HealthGPT made from nothing on a 2-core CPU in minutes, on the phantom world.

Nothing pretrained exists offline, so the recipe makes its starting models first (`pretrain_nano`: VQGAN, base LLM,
CLIP tower), writes the phantom records (one training file per task, a held-out test split), encodes the generation
targets with the new VQGAN, runs the five HealthGPT stages of `training/configs/nano.yaml`, exports a self-contained
bundle and evaluates it on held-out phantoms against the same model before the stages (fresh plugins and projectors).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from healthgpt.api import HealthGPT
from healthgpt.checkpoints import load_vqgan
from healthgpt.config import COMPREHENSION, GENERATION, get_variant
from healthgpt.data.image_codes import tokenize_images
from healthgpt.data.phantoms import PHANTOM_TASKS, make_dataset
from healthgpt.io import load_image
from healthgpt.io.atomic import atomic_target, write_atomic
from healthgpt.metrics import aggregate, image_metrics
from healthgpt.pretrain import BUDGETS, NanoBudget, pretrain_nano
from healthgpt.pretrain.nano import torch_threads
from healthgpt.training.loop import METRICS, OUTPUT, TrainResult, build_healthgpt, export_model, run_stage
from healthgpt.training.stages import STAGE_NAMES, Recipe, apply_overrides, recipe_from_dict
from healthgpt.workers import worker_env

log = logging.getLogger(__name__)

CONFIG_FILE = Path(__file__).resolve().parents[1] / "training" / "configs" / "nano.yaml"
PRETRAIN_DIR, PHANTOM_DIR, MODEL_DIR = "pretrain", "phantoms", "model"
RECIPE_FILE, METRICS_FILE, PANEL_FILE = "recipe.yaml", "metrics.json", "ct2mri_panel.png"
PHANTOM_SIZE = 64  # the nano VQGAN's image size (a variant's own otherwise): targets are compared pixel for pixel


def _cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its finished children (the VQGAN and stage workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def _timed(name: str, seconds: dict[str, float], cpu: dict[str, float]) -> Iterator[None]:
    """Record the wall-clock and CPU seconds of a part of the recipe."""
    wall, used = time.perf_counter(), _cpu_seconds()
    yield
    seconds[name], cpu[name] = time.perf_counter() - wall, _cpu_seconds() - used
    log.info("nano recipe: %s took %.1f s (%.1f CPU s)", name, seconds[name], cpu[name])


def run_stages(
    recipe: Recipe, recipe_file: Path, names: Sequence[str], parallel: bool, num_threads: int
) -> list[TrainResult]:
    """Run independent stages (the two stage-1 or stage-3 runs). With `parallel`, every stage after the first runs as
    `healthgpt train` in a child process (`num_threads` OpenMP threads, log in `<output_dir>/<stage>.log`) while this
    process runs the first with as many; otherwise one after the other with the caller's threads."""
    if not parallel or len(names) == 1:
        return [run_stage(recipe, name) for name in names]
    logs = {name: Path(recipe.output_dir) / f"{name}.log" for name in names[1:]}
    Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "healthgpt.cli", "train", "--config", str(recipe_file), "--stage"]
    env = worker_env({**os.environ, "OMP_NUM_THREADS": str(num_threads)})
    workers = {}
    try:
        for name, log_file in logs.items():
            with open(log_file, "w") as f:
                workers[name] = subprocess.Popen([*command, name], stdout=f, stderr=subprocess.STDOUT, env=env)
        with torch_threads(num_threads):
            results = [run_stage(recipe, names[0])]
    except BaseException:  # a failure here stops the workers too
        for worker in workers.values():
            worker.kill()
        raise
    finally:
        for worker in workers.values():
            worker.wait()
    for name, worker in workers.items():
        if worker.returncode != 0:
            tail = logs[name].read_text()[-2000:]
            raise RuntimeError(f"{name} failed in its worker process (exit {worker.returncode}):\n{tail}")
        results.append(_finished(recipe, name))
    return results


def _finished(recipe: Recipe, name: str) -> TrainResult:
    """The result of a stage another process ran, read from its metrics file."""
    metrics_file = Path(recipe.output_dir) / name / METRICS
    metrics = json.loads(metrics_file.read_text())
    return TrainResult(metrics_file.parent / OUTPUT, metrics["steps"], metrics["final_loss"], metrics_file)


def write_phantoms(
    folder: Path,
    cases: int,
    seed: int,
    test_fraction: float,
    size: int = PHANTOM_SIZE,
    tasks: Sequence[str] = PHANTOM_TASKS,
) -> list[dict[str, Any]]:
    """Phantom images and records of `tasks` under `folder`: `train.json`, `test.json` and `<task>.json` (the training
    records of one task, which the recipe's stages list); returns the held-out test records."""
    records = make_dataset(folder, cases, seed, size=size, tasks=tasks, test_fraction=test_fraction)
    for task in tasks:
        chosen = [r for r in records["train"] if r["meta"]["kind"] == task]
        write_atomic(folder / f"{task}.json", json.dumps(chosen, indent=1) + "\n")
    return records["test"]


def resolve_recipe(template: Path, root: Path, seed: int, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe `template` with its relative paths made absolute under `root`, seeds set to `seed` and `overrides`
    applied, checked and written to `root/recipe.yaml` (the exact recipe of the run)."""
    tree = yaml.safe_load(template.read_text())

    def rooted(value: str | None) -> str | None:
        return None if value is None else str(root / value)

    tree["output_dir"] = rooted(tree["output_dir"])
    for section, keys in (("model", ("base_llm", "vision_tower")), ("data", ("code_cache", "image_folder"))):
        for key in keys:
            if key in tree.get(section, {}):
                tree[section][key] = rooted(tree[section][key])
    for stage in tree.get("stages", {}).values():
        stage["data"] = [rooted(p) for p in stage.get("data", [])]
    tree.setdefault("model", {})["seed"] = seed
    tree.setdefault("engine", {})["seed"] = seed
    recipe = recipe_from_dict(apply_overrides(tree, overrides))
    write_atomic(root / RECIPE_FILE, yaml.safe_dump(tree, sort_keys=False))
    return recipe


def _question(record: Mapping[str, Any]) -> str:
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def _normalise(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def closed_accuracy(model: HealthGPT, records: Sequence[Mapping[str, Any]], folder: Path) -> dict[str, Any]:
    """Greedy answers to held-out closed questions (presence, side, count), scored by exact match after lower-casing
    and dropping a final period: accuracy and count per kind."""
    out: dict[str, Any] = {}
    for kind in ("presence", "side", "count"):
        chosen = [r for r in records if r["task"] == COMPREHENSION and r["meta"]["kind"] == kind]
        if not chosen:
            continue
        images = [load_image(folder / r["image"]).to_pil() for r in chosen]
        answers = model.ask(images, [_question(r) for r in chosen], max_new_tokens=8)
        truths = [_normalise(r["conversations"][1]["value"]) for r in chosen]
        right = [_normalise(a) == t for a, t in zip(answers, truths, strict=True)]
        out[kind] = {"accuracy": float(np.mean(right)), "n": len(chosen), "examples": answers[:4]}
    return out


def convert(model: HealthGPT, records: Sequence[Mapping[str, Any]], folder: Path) -> list[Image.Image]:
    """Greedy CT->MRI conversions of `records` (generation records of kind ct2mri) with each record's instruction,
    as grayscale images."""
    images = [load_image(folder / r["image"]).to_pil() for r in records]
    instructions = {_question(r) for r in records}
    out: dict[int, Image.Image] = {}
    for instruction in sorted(instructions):  # one batch per phrasing: a batch shares its instruction
        rows = [i for i, r in enumerate(records) if _question(r) == instruction]
        made = model.generate_image([images[i] for i in rows], instruction, progress=False)
        out |= {i: g.image.convert("L") for i, g in zip(rows, made, strict=True)}
    return [out[i] for i in range(len(records))]


def conversion_metrics(generated: Sequence[Image.Image], targets: Sequence[Image.Image]) -> dict[str, float]:
    """Mean SSIM (x100), PSNR and MSE of generated images against the true renders."""
    return aggregate([image_metrics(np.asarray(g), np.asarray(t)) for g, t in zip(generated, targets, strict=True)])


def write_panel(path: Path, columns: Mapping[str, Sequence[Image.Image]], variant: str = "nano") -> None:
    """A PNG grid: one row per case, one labelled column per image kind (input CT, true MRI, generated MRIs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = len(next(iter(columns.values())))
    fig = Figure(figsize=(2.0 * len(columns), 2.0 * rows + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for c, (title, images) in enumerate(columns.items()):
        for r, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(np.asarray(image.convert("L")), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle(f"{variant} HealthGPT, held-out phantoms: CT -> MRI (toy model, synthetic data)", fontsize=9)
    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def evaluate(
    trained: HealthGPT,
    untrained: HealthGPT,
    records: Sequence[Mapping[str, Any]],
    folder: Path,
    panel: Path,
    panel_cases: int = 4,
) -> dict[str, Any]:
    """Held-out closed-question accuracy of both models, and CT->MRI SSIM/PSNR/MSE of both against the true MRI
    render, with the VQGAN's own reconstruction of that MRI as the ceiling; writes the panel PNG."""
    pairs = [r for r in records if r["task"] == GENERATION and r["meta"]["kind"] == "ct2mri"]
    truths = [load_image(folder / r["target_image"]).to_pil().convert("L") for r in pairs]
    made = {name: convert(model, pairs, folder) for name, model in (("trained", trained), ("untrained", untrained))}
    vqgan = trained.vqgan
    with torch.inference_mode():
        codes = vqgan.encode(vqgan.preprocess([t.convert("RGB") for t in truths]))
        ceiling = [im.convert("L") for im in vqgan.codes_to_pil(codes)]
    write_panel(
        panel,
        {
            "input CT": [load_image(folder / r["image"]).to_pil() for r in pairs[:panel_cases]],
            "true MRI": truths[:panel_cases],
            "generated MRI": made["trained"][:panel_cases],
            "untrained model": made["untrained"][:panel_cases],
        },
        trained.config.name,
    )
    return {
        "closed_questions": {
            "trained": closed_accuracy(trained, records, folder),
            "untrained": closed_accuracy(untrained, records, folder),
        },
        "ct2mri": {
            "n": len(pairs),
            "trained": conversion_metrics(made["trained"], truths),
            "untrained": conversion_metrics(made["untrained"], truths),
            "vqgan_reconstruction": conversion_metrics(ceiling, truths),
        },
    }


def run(
    out_dir: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    cases: int = 1500,
    test_fraction: float = 0.2,
    budget: NanoBudget | None = None,
    overrides: Sequence[str] = (),
    config_file: str | Path | None = None,
    parallel: bool = True,
    num_threads: int = 1,
    variant: str = "nano",
) -> dict[str, Any]:
    """Run the whole nano recipe into the new or empty folder `out_dir`: pre-training, phantom data, VQ codes, the
    five stages, the bundle `out_dir/model` (base weights included), evaluation on held-out phantoms; writes and
    returns `metrics.json` (figures, wall and CPU seconds per part; `training` is from nothing to the exported
    bundle, `total` adds the evaluation).

    `variant` (nano or mini) picks the architecture, the recipe file (`training/configs/<variant>.yaml` unless
    `config_file`, whose `model.variant` must agree) and the pre-training budget (`BUDGETS`, unless `budget`); the
    phantoms are written at its VQGAN's size, every phantom kind and any other its stages read (report_to_cxr).
    `overrides` are dotted recipe overrides (`stage2.max_steps=10`). With `parallel`, independent parts run in two
    processes (VQGAN beside LM+CLIP, stage-1 and stage-3 pairs), each with `num_threads` torch threads: models this
    small train fastest on one thread per core, and far slower when two threads per op compete with other jobs. The
    parts with nothing beside them (phantoms, codes, stage 2, evaluation; the VQGAN from the budget's
    `vqgan_widen_at`) take both processes' share, 2 x `num_threads` (1.7-1.8x faster on 2 CPU cores)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out}: the nano recipe writes into a new or empty folder")
    config_file = Path(config_file) if config_file is not None else CONFIG_FILE.with_name(f"{variant}.yaml")
    recipe = resolve_recipe(config_file, out, seed, overrides)
    if recipe.model.variant != variant:
        raise ValueError(f"{config_file}: its model.variant is {recipe.model.variant!r} but the run is for {variant!r}")
    recipe_file = out / RECIPE_FILE
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    metrics: dict[str, Any] = {"seed": seed, "cases": cases, "test_fraction": test_fraction, "parallel": parallel}
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    with torch_threads(2 * num_threads if parallel else num_threads):
        with _timed("pretrain", seconds, cpu):
            metrics["pretrain"] = pretrain_nano(
                out / PRETRAIN_DIR,
                seed=seed,
                progress=progress,
                budget=budget or BUDGETS[variant],
                parallel=parallel,
                num_threads=num_threads,
                variant=variant,
            )
        with _timed("phantoms", seconds, cpu):
            size = get_variant(variant).vq.image_size
            read = {Path(path).stem for stage in recipe.stages.values() for path in stage.data}
            tasks = [*PHANTOM_TASKS, *sorted(read - set(PHANTOM_TASKS))]
            test_records = write_phantoms(out / PHANTOM_DIR, cases, seed, test_fraction, size, tasks)
        vqgan_dir = out / PRETRAIN_DIR / "vqgan"
        with _timed("tokenize_images", seconds, cpu):
            tokenize_images(out / PHANTOM_DIR / "train.json", vqgan_dir, recipe.data.code_cache)
        metrics["stages"] = _train_stages(recipe, recipe_file, parallel, num_threads, seconds, cpu)
        with _timed("export", seconds, cpu):
            bundle = export_model(recipe_file, out / MODEL_DIR, include_base=True, vqgan=vqgan_dir)
        seconds["training"], cpu["training"] = time.perf_counter() - start, _cpu_seconds() - start_cpu
        log.info("nano recipe: from nothing to the exported bundle in %.1f s", seconds["training"])
        with _timed("evaluate", seconds, cpu):
            metrics["evaluation"] = _evaluate_bundle(recipe, bundle, vqgan_dir, test_records, out)
    seconds["total"], cpu["total"] = time.perf_counter() - start, _cpu_seconds() - start_cpu
    metrics |= {"seconds": seconds, "cpu_seconds": cpu, "num_threads": num_threads}
    metrics["bundle_bytes"] = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    write_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    log.info("nano recipe: %s", json.dumps(metrics["evaluation"]))
    return metrics


def _train_stages(
    recipe: Recipe,
    recipe_file: Path,
    parallel: bool,
    num_threads: int,
    seconds: dict[str, float],
    cpu: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """The five stages in three timed parts (stage-1 pair, stage 2, stage-3 pair); a summary of each stage."""
    results = []
    for part, names in (("stage1", STAGE_NAMES[:2]), ("stage2", STAGE_NAMES[2:3]), ("stage3", STAGE_NAMES[3:])):
        with _timed(part, seconds, cpu):
            results += run_stages(recipe, recipe_file, names, parallel, num_threads)
    return {name: _stage_summary(result) for name, result in zip(STAGE_NAMES, results, strict=True)}


def _evaluate_bundle(
    recipe: Recipe, bundle: Path, vqgan_dir: Path, test_records: list[dict[str, Any]], out: Path
) -> dict[str, Any]:
    """`evaluate` the exported bundle against the recipe's starting model (fresh plugins, the same VQGAN)."""
    trained = HealthGPT.from_pretrained(bundle)
    untrained = build_healthgpt(recipe)
    untrained.vqgan = load_vqgan(vqgan_dir).eval()
    return evaluate(trained, untrained, test_records, out / PHANTOM_DIR, out / PANEL_FILE)


def _stage_summary(result: TrainResult) -> dict[str, Any]:
    """Steps, first and last loss and seconds of a finished stage, from its metrics file."""
    stage = json.loads(result.metrics_file.read_text())
    first = stage["history"][0]["loss"]
    return {
        "steps": result.steps,
        "first_loss": first,
        "final_loss": result.final_loss,
        "seconds": stage["elapsed_s_this_run"],
    }
