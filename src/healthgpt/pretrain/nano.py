"""The pre-training half of the `nano` recipe: VQGAN, tokenizer and LM, CLIP tower, all on the phantom world.

Budgets are measured to fit a few minutes on a 2-core CPU (see `NanoBudget`); the outputs are the folders the
HealthGPT stages start from: `llm/` (base LLM + tokenizer), `vision/` (CLIP tower + preprocessor), `vqgan/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from healthgpt.config import COMPREHENSION, HealthGPTConfig, get_variant
from healthgpt.data.phantoms import (
    MODALITIES,
    PhantomCase,
    caption,
    generation_pairs,
    phantom_corpus,
    sample_case,
    vqa_pairs,
)
from healthgpt.nano import random_llm, random_vision
from healthgpt.templates import get_template
from healthgpt.vision import ImagePreprocessor, VisionEncoder

from .clip import PixelCache, linear_probe, pooled_features, pretrain_clip, retrieval_accuracy
from .lm import Conversation, perplexity, pretrain_lm, train_tokenizer
from .vqgan import evaluate_vqgan, train_vqgan

log = logging.getLogger(__name__)

METRICS_FILE = "pretrain_metrics.json"
LLM_DIR, VISION_DIR, VQGAN_DIR = "llm", "vision", "vqgan"
_STREAM = 0x5052  # "PR": phantom cases of pre-training come from their own random stream, apart from the datasets'


@dataclass(frozen=True)
class NanoBudget:
    """Steps, batches and data sizes of `pretrain_nano` (defaults: about N minutes on 2 CPU cores)."""

    train_cases: int = 600  # phantom cases for VQGAN and CLIP training (CT and MRI of each)
    eval_cases: int = 100  # held-out cases: PSNR, retrieval, the probe's test set (it fits on the train cases)
    vqgan_steps: int = 300
    vqgan_batch: int = 8
    vqgan_lr: float = 2e-3
    corpus_sentences: int = 4000  # plain phantom sentences; as many chat conversations again
    lm_steps: int = 200
    lm_batch: int = 16
    lm_seq_len: int = 128
    lm_lr: float = 3e-3
    clip_steps: int = 300
    clip_batch: int = 64
    clip_lr: float = 2e-3


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


def _images(cases: list[PhantomCase]) -> tuple[list[Image.Image], list[str], torch.Tensor]:
    """CT and MRI renders of each case, their captions and has-lesion labels."""
    images = [case.rgb(key) for case in cases for key in ("ct", "mri")]
    captions = [caption(case, modality) for case in cases for modality in MODALITIES]
    labels = torch.tensor([case.has_lesion for case in cases for _ in MODALITIES], dtype=torch.long)
    return images, captions, labels


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with `n` torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    if n is not None:
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
    num_threads: int | None = None,
    variant: str | HealthGPTConfig = "nano",
) -> dict[str, Any]:
    """Pre-train the nano components on phantoms and save `vqgan/`, `llm/`, `vision/` and `pretrain_metrics.json`
    under `out_dir`; returns the metrics (held-out PSNR, perplexities, retrieval and probe accuracy, seconds)."""
    config = get_variant(variant) if isinstance(variant, str) else variant
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"variant": config.name, "seed": seed, "budget": asdict(budget), "seconds": {}}
    seconds = metrics["seconds"]
    start = time.perf_counter()
    with _threads(num_threads):
        tic = time.perf_counter()
        size = config.vq.image_size
        train_images, train_captions, train_labels = _images(phantom_cases(seed, 0, budget.train_cases, size))
        eval_images, eval_captions, eval_labels = _images(phantom_cases(seed, 1, budget.eval_cases, size))
        seconds["data"] = time.perf_counter() - tic

        tic = time.perf_counter()
        vqgan = train_vqgan(
            train_images,
            vq=config.vq,
            steps=budget.vqgan_steps,
            batch_size=budget.vqgan_batch,
            lr=budget.vqgan_lr,
            seed=seed,
            out_dir=out / VQGAN_DIR,
            progress=progress,
        )
        metrics["vqgan"] = evaluate_vqgan(vqgan, eval_images)
        seconds["vqgan"] = time.perf_counter() - tic

        tic = time.perf_counter()
        metrics["lm"] = _pretrain_language(config, budget, seed, out / LLM_DIR, progress)
        seconds["lm"] = time.perf_counter() - tic

        tic = time.perf_counter()
        metrics["clip"] = _pretrain_vision(
            config,
            budget,
            seed,
            out / VISION_DIR,
            progress,
            (train_images, train_captions, train_labels),
            (eval_images, eval_captions, eval_labels),
        )
        seconds["clip"] = time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - start
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("pretrain_nano: %s", json.dumps(metrics))
    return metrics


def _pretrain_language(
    config: HealthGPTConfig, budget: NanoBudget, seed: int, folder: Path, progress: bool
) -> dict[str, float]:
    """Tokenizer + causal LM on phantom sentences and chats; held-out perplexity before and after."""
    rng = np.random.default_rng([seed, _STREAM, 2])
    sentences = phantom_corpus(rng, budget.corpus_sentences)
    corpus = [*sentences, *phantom_conversations(rng, budget.corpus_sentences)]
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
    config: HealthGPTConfig,
    budget: NanoBudget,
    seed: int,
    folder: Path,
    progress: bool,
    train: tuple[list[Image.Image], list[str], torch.Tensor],
    held_out: tuple[list[Image.Image], list[str], torch.Tensor],
) -> dict[str, float]:
    """Contrastive CLIP tower; held-out retrieval and a has-lesion linear probe on penultimate features."""
    vc = config.vision
    pre = ImagePreprocessor.for_clip(vc.image_size, vc.image_mean, vc.image_std)
    train_pixels, held_pixels = PixelCache(pre, train[0]), PixelCache(pre, held_out[0])

    def probe(vision: VisionEncoder) -> float:
        layer = config.plugins[COMPREHENSION].vision_layer
        features = pooled_features(vision, train_pixels, layer), pooled_features(vision, held_pixels, layer)
        return linear_probe(features[0], train[2], features[1], held_out[2])

    vision = random_vision(vc, seed=seed)
    untrained = probe(vision)
    model = pretrain_clip(
        vision,
        train_pixels,
        train[1],
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
        "retrieval_accuracy": retrieval_accuracy(model, held_pixels, held_out[1]),
        "retrieval_chance": 1 / len(set(held_out[1])),
    }
    model.vision.tower.save_pretrained(folder)
    pre.processor.save_pretrained(folder)
    return metrics
