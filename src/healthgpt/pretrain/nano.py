"""The pre-training half of the `nano` recipe: VQGAN, tokenizer and LM, CLIP tower, all on the phantom world.

Budgets are measured to fit a few minutes on a 2-core CPU (see `NanoBudget`); the outputs are the folders the
HealthGPT stages start from: `llm/` (base LLM + tokenizer), `vision/` (CLIP tower + preprocessor), `vqgan/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from healthgpt.config import COMPREHENSION, HealthGPTConfig, get_variant
from healthgpt.data.phantoms import (
    MODALITIES,
    ChestCase,
    PhantomCase,
    caption,
    chest_report,
    generation_pairs,
    phantom_corpus,
    sample_case,
    sample_chest,
    vqa_pairs,
)
from healthgpt.data.phantoms.dataset import CHEST_REPLY
from healthgpt.io.atomic import write_atomic
from healthgpt.nano import random_llm
from healthgpt.templates import get_template
from healthgpt.vision import ImagePreprocessor, VisionEncoder
from healthgpt.workers import worker_env

from .clip import PixelCache, linear_probe, pooled_features, pretrain_clip, retrieval_accuracy, tower_from_scratch
from .lm import Conversation, perplexity, pretrain_lm, train_tokenizer
from .vqgan import evaluate_vqgan, train_vqgan

log = logging.getLogger(__name__)

METRICS_FILE = "pretrain_metrics.json"
LLM_DIR, VISION_DIR, VQGAN_DIR = "llm", "vision", "vqgan"
WORKER_RESULT = "worker_metrics.json"  # the VQGAN worker's metrics, read and removed by pretrain_nano
_STREAM = 0x5052  # "PR": phantom cases of pre-training come from their own random stream, apart from the datasets'


@dataclass(frozen=True)
class NanoBudget:
    """Steps, batches and data sizes of `pretrain_nano`. The defaults take about 2 minutes on 2 CPU cores (VQGAN
    about 65 CPU-seconds in its own process, CLIP about 45 and the LM about 12 in the caller's)."""

    train_cases: int = 600  # phantom cases for VQGAN and CLIP training (CT and MRI of each)
    eval_cases: int = 100  # held-out cases: PSNR, retrieval, the probe's test set (it fits on the train cases)
    vqgan_steps: int = 600
    vqgan_batch: int = 4
    vqgan_lr: float = 2e-3
    vqgan_temperature: tuple[float, float] = (1.0, 0.5)  # short runs end early in taming's anneal
    # From this VQGAN step on (None: never) the VQGAN trains with twice `num_threads`: in a parallel run the LM and
    # CLIP beside it are done by then and their core would idle. The same step in a serial run: same models.
    vqgan_widen_at: int | None = None
    corpus_sentences: int = 4000  # plain phantom sentences; as many chat conversations again
    lm_steps: int = 200
    lm_batch: int = 16
    lm_seq_len: int = 128
    lm_lr: float = 3e-3
    clip_steps: int = 600
    clip_batch: int = 64
    clip_lr: float = 2e-3
    chest_films: int = 0  # chest films beside the head phantoms: VQGAN images, and their reports in the LM corpus


# Pre-training budgets by variant; mini's VQGAN needs longer for its 16x16 grid to keep lesions (bench/README.md).
BUDGETS = {
    "nano": NanoBudget(),
    # mini's VQGAN takes both cores from step 450: the LM and CLIP beside it took 357 s, the VQGAN's first 450 steps
    # about 430 s (0.95 s a step on one core, 0.5 on two; 2-core CPU sandbox).
    "mini": NanoBudget(
        train_cases=800,
        vqgan_steps=2500,
        vqgan_batch=8,
        vqgan_widen_at=450,
        clip_steps=400,
        lm_steps=300,
        chest_films=400,
    ),
}


def chest_films(seed: int, n: int, size: int = 64) -> tuple[list[ChestCase], list[str], list[Conversation]]:
    """`n` chest films of the pre-training stream, their reports and report -> film chats (the image is absent)."""
    rng = np.random.default_rng([seed, _STREAM, 4])
    films = [sample_chest(rng, size) for _ in range(n)]
    reports = [chest_report(film, rng) for film in films]
    return films, reports, [_turn(r, CHEST_REPLY) for r in reports]


def phantom_cases(seed: int, split: int, n: int, size: int) -> list[PhantomCase]:
    """`n` phantom cases of the pre-training stream `split` (0 train, 1 held-out)."""
    rng = np.random.default_rng([seed, _STREAM, split])
    return [sample_case(rng, size) for _ in range(n)]


def phantom_conversations(rng: np.random.Generator, n: int) -> list[Conversation]:
    """`n` text-only chats of the phantom world: 1-3 consistent questions about one case, or one image
    instruction with its reply (the image itself is absent: the LM learns the words and the turn format)."""
    chats: list[Conversation] = []
    while len(chats) < n:
        case = sample_case(rng)  # labels only: no pixels are rendered
        for modality in MODALITIES:
            qas = vqa_pairs(case, rng, modality)
            picked = [qas[i] for i in rng.permutation(len(qas))[: int(rng.integers(1, len(qas) + 1))]]
            chats.append([m for qa in picked for m in _turn(qa.question, qa.answer)])
        chats += [_turn(pair.instruction, pair.reply) for pair in generation_pairs(case, rng)]
    return [chats[i] for i in rng.permutation(len(chats))[:n]]


def _turn(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def phantom_images(cases: list[PhantomCase]) -> tuple[list[Image.Image], list[str], torch.Tensor]:
    """CT and MRI renders of each case, their captions and has-lesion labels."""
    images = [case.rgb(key) for case in cases for key in ("ct", "mri")]
    captions = [caption(case, modality) for case in cases for modality in MODALITIES]
    labels = torch.tensor([case.has_lesion for case in cases for _ in MODALITIES], dtype=torch.long)
    return images, captions, labels


def timed(part: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
    """A part's metrics plus its wall-clock `seconds` and this process's `cpu_seconds`."""
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = part(*args)
    return {**metrics, "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrain_nano(
    out_dir: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    budget: NanoBudget = NanoBudget(),
    parallel: bool = True,
    num_threads: int = 1,
    variant: str | HealthGPTConfig = "nano",
) -> dict[str, Any]:
    """Pre-train the nano components on phantoms and save `vqgan/`, `llm/`, `vision/` and `pretrain_metrics.json`
    under `out_dir`; returns the metrics (held-out PSNR, perplexities, retrieval and probe accuracy, wall-clock and
    CPU seconds per part).

    With `parallel` the VQGAN trains in a child process (`python -m healthgpt.pretrain.worker`) while the LM and
    CLIP train here. Each part runs with `num_threads` torch threads: models this small run 3-5x slower with two
    threads per op than with one on a busy 2-core machine, so two processes use two cores better. The results
    do not depend on `parallel`; every part seeds its own random streams."""
    config = get_variant(variant) if isinstance(variant, str) else variant
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(budget).items()}  # as JSON reads back
    metrics: dict[str, Any] = {"variant": config.name, "seed": seed, "budget": plain}
    start = time.perf_counter()
    worker = None
    try:
        if parallel:
            worker = _start_worker(config, budget, seed, out / VQGAN_DIR, progress, num_threads)
        else:
            metrics["vqgan"] = timed(pretrain_vqgan_part, config, budget, seed, out / VQGAN_DIR, progress, num_threads)
        with torch_threads(num_threads):
            metrics["lm"] = timed(_pretrain_language, config, budget, seed, out / LLM_DIR, progress)
            metrics["clip"] = timed(_pretrain_vision, config, budget, seed, out / VISION_DIR, progress)
        if worker is not None:
            metrics["vqgan"] = _finish_worker(worker, out / VQGAN_DIR / WORKER_RESULT)
    finally:
        if worker is not None and worker.poll() is None:  # this part failed: stop the VQGAN worker too
            worker.kill()
            worker.wait()
    for clock in ("seconds", "cpu_seconds"):
        metrics[clock] = {part: metrics[part].pop(clock) for part in ("vqgan", "lm", "clip")}
    metrics["seconds"]["total"] = time.perf_counter() - start
    write_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    log.info("pretrain_nano: %s", json.dumps(metrics))
    return metrics


def _start_worker(
    config: HealthGPTConfig, budget: NanoBudget, seed: int, folder: Path, progress: bool, threads: int
) -> subprocess.Popen[bytes]:
    """The VQGAN part in a fresh interpreter (no fork of this process's thread pools, no re-import of __main__)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WORKER_RESULT).unlink(missing_ok=True)
    args = dict(
        config=config.to_dict(),
        budget=asdict(budget),
        seed=seed,
        folder=str(folder),
        progress=progress,
        threads=threads,
    )
    src = str(Path(__file__).resolve().parents[2])  # the folder holding `healthgpt`, in case it is not installed
    env = worker_env({**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))})
    return subprocess.Popen([sys.executable, "-m", "healthgpt.pretrain.worker", json.dumps(args)], env=env)


def _finish_worker(worker: subprocess.Popen[bytes], result: Path) -> dict[str, float]:
    if worker.wait() != 0 or not result.is_file():
        raise RuntimeError(f"the VQGAN worker failed (exit status {worker.returncode}); its error is printed above")
    metrics = json.loads(result.read_text())
    result.unlink()
    return metrics


def pretrain_vqgan_part(
    config: HealthGPTConfig, budget: NanoBudget, seed: int, folder: Path, progress: bool, threads: int
) -> dict[str, float]:
    """VQGAN on CT and MRI renders; held-out PSNR/SSIM/MSE of encode -> decode (what the worker process runs)."""
    with torch_threads(threads):
        size = config.vq.image_size
        train = phantom_images(phantom_cases(seed, 0, budget.train_cases, size))[0]
        train += [film.rgb() for film in chest_films(seed, budget.chest_films, size)[0]]
        vqgan = train_vqgan(
            train,
            vq=config.vq,
            steps=budget.vqgan_steps,
            batch_size=budget.vqgan_batch,
            lr=budget.vqgan_lr,
            seed=seed,
            temperature=budget.vqgan_temperature,
            out_dir=folder,
            progress=progress,
            threads_from=None if budget.vqgan_widen_at is None else (budget.vqgan_widen_at, 2 * threads),
        )
        metrics = evaluate_vqgan(vqgan, phantom_images(phantom_cases(seed, 1, budget.eval_cases, size))[0])
    return metrics


def _pretrain_language(
    config: HealthGPTConfig, budget: NanoBudget, seed: int, folder: Path, progress: bool
) -> dict[str, float]:
    """Tokenizer + causal LM on phantom sentences and chats; held-out perplexity before and after."""
    rng = np.random.default_rng([seed, _STREAM, 2])
    sentences = phantom_corpus(rng, budget.corpus_sentences)
    _, reports, chats = chest_films(seed, budget.chest_films)
    sentences += reports
    corpus = [*sentences, *phantom_conversations(rng, budget.corpus_sentences), *chats]
    held_rng = np.random.default_rng([seed, _STREAM, 3])
    held_out = [*phantom_corpus(held_rng, 300), *phantom_conversations(held_rng, 300)]
    tokenizer = train_tokenizer(sentences, config.llm.vocab_rows, config.template)
    stops = tokenizer.convert_tokens_to_ids(list(get_template(config.template).stop_strings))
    llm = random_llm(
        config.llm, len(tokenizer), seed=seed, eos_token_id=sorted(set(stops)), pad_token_id=tokenizer.pad_token_id
    )
    evaluate = dict(template=config.template, seq_len=budget.lm_seq_len)
    untrained = perplexity(llm, tokenizer, held_out, **evaluate)
    pretrain_lm(
        llm,
        tokenizer,
        corpus,
        template=config.template,
        steps=budget.lm_steps,
        batch_size=budget.lm_batch,
        seq_len=budget.lm_seq_len,
        lr=budget.lm_lr,
        seed=seed,
        progress=progress,
    )
    trained = perplexity(llm, tokenizer, held_out, **evaluate)
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"perplexity": trained, "untrained_perplexity": untrained, "vocab_size": len(tokenizer)}


def _pretrain_vision(
    config: HealthGPTConfig, budget: NanoBudget, seed: int, folder: Path, progress: bool
) -> dict[str, float]:
    """Contrastive CLIP tower on CT and MRI renders with their captions; held-out image -> caption retrieval and
    a has-lesion linear probe on the mean-pooled features the comprehension plugin reads (before and after)."""
    vc = config.vision
    pre = ImagePreprocessor.for_clip(vc.image_size, vc.image_mean, vc.image_std)
    size = config.vq.image_size  # the phantom datasets' size; the preprocessor resizes to the tower's
    train_images, train_captions, train_labels = phantom_images(phantom_cases(seed, 0, budget.train_cases, size))
    held_images, held_captions, held_labels = phantom_images(phantom_cases(seed, 1, budget.eval_cases, size))
    train_pixels, held_pixels = PixelCache(pre, train_images), PixelCache(pre, held_images)
    layer = config.plugins[COMPREHENSION].vision_layer

    def probe(vision: VisionEncoder) -> float:
        train_x, held_x = pooled_features(vision, train_pixels, layer), pooled_features(vision, held_pixels, layer)
        return linear_probe(train_x, train_labels, held_x, held_labels)

    vision = tower_from_scratch(vc, seed=seed)
    untrained = probe(vision)
    model = pretrain_clip(
        vision,
        train_pixels,
        train_captions,
        steps=budget.clip_steps,
        batch_size=budget.clip_batch,
        lr=budget.clip_lr,
        seed=seed,
        preprocessor=pre,
        progress=progress,
    )
    metrics = {
        "probe_accuracy": probe(model.vision),
        "untrained_probe_accuracy": untrained,
        "retrieval_accuracy": retrieval_accuracy(model, held_pixels, held_captions),
        "retrieval_chance": 1 / len(set(held_captions)),
    }
    model.vision.tower.save_pretrained(folder)
    pre.processor.save_pretrained(folder)
    return metrics
