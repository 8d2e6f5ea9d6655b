"""The CLIP tower's starting patch position table, side by side in one run: mini's contrastive pre-training (its
budget: 800 cases, 400 steps) from HF's random table and from 2D sine-cosine codes (`tower_from_scratch`), each then
read on held-out phantoms: caption retrieval, whether each patch's own feature tells its column half (linear probe),
and the case's lesion side (none / left / right / both) from the comprehension layer's features, mean-pooled and in
a 4x4 grid. The two towers train at once, one process per core.

    python bench/clip_positions.py [--held-out 300]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from typing import Any

import torch
import torch.nn.functional as F

from healthgpt.config import COMPREHENSION, GENERATION, get_variant
from healthgpt.nano import random_vision
from healthgpt.pretrain import BUDGETS, linear_probe, pretrain_clip, retrieval_accuracy
from healthgpt.pretrain.clip import PixelCache, tower_from_scratch
from healthgpt.pretrain.nano import phantom_cases, phantom_images
from healthgpt.vision import ImagePreprocessor

CONFIG = get_variant("mini")
SIDES = ("none", "left", "right", "both")
TABLES = {"random table": random_vision, "sine-cosine table": tower_from_scratch}


def measure(table: str, held_out: int) -> dict[str, Any]:
    """Pre-train a tower from `table` on mini's pre-training cases; its figures on `held_out` other cases."""
    torch.set_num_threads(1)
    vc, budget = CONFIG.vision, BUDGETS["mini"]
    pre = ImagePreprocessor.for_clip(vc.image_size, vc.image_mean, vc.image_std)
    cases = {
        split: phantom_cases(0, i, n, CONFIG.vq.image_size)  # the phantoms at the VQGAN's size, as pre-training
        for i, (split, n) in enumerate((("train", budget.train_cases), ("held", held_out)))
    }
    data = {split: phantom_images(c) for split, c in cases.items()}
    pixels = {split: PixelCache(pre, images) for split, (images, _, _) in data.items()}
    start = time.perf_counter()
    model = pretrain_clip(
        TABLES[table](vc, seed=0),
        pixels["train"],
        data["train"][1],
        steps=budget.clip_steps,
        batch_size=budget.clip_batch,
        lr=budget.clip_lr,
        seed=0,
        preprocessor=pre,
        progress=False,
    )
    seconds = time.perf_counter() - start
    layers = {
        "comprehension": CONFIG.plugins[COMPREHENSION].vision_layer,
        "generation": CONFIG.plugins[GENERATION].vision_layer,
    }
    with torch.no_grad():
        feats = {
            split: model.vision.features(p.pixels(slice(None)), list(layers.values())) for split, p in pixels.items()
        }
    grid = vc.image_size // vc.patch_size
    out = {"seconds": seconds, "retrieval": retrieval_accuracy(model, pixels["held"], data["held"][1])}
    right = (torch.arange(grid * grid) % grid >= grid // 2).long()
    for name, layer in layers.items():  # patches of half the held-out images to fit, the other half to test
        patches = feats["held"][layer]
        half = len(patches) // 2
        out[f"column half from one patch ({name} layer)"] = linear_probe(
            patches[:half].flatten(0, 1),
            right.repeat(half),
            patches[half:].flatten(0, 1),
            right.repeat(len(patches) - half),
        )
    side = {split: torch.tensor([SIDES.index(c.side) for c in cs for _ in range(2)]) for split, cs in cases.items()}
    read = feats["train"][layers["comprehension"]], feats["held"][layers["comprehension"]]
    pools = {
        "mean-pooled": lambda f: f.mean(dim=1),
        "4x4 grid": lambda f: F.adaptive_avg_pool2d(f.unflatten(1, (grid, grid)).permute(0, 3, 1, 2), 4).flatten(1),
    }
    for pool, fn in pools.items():
        out[f"lesion side, {pool}"] = linear_probe(fn(read[0]), side["train"], fn(read[1]), side["held"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=int, default=300, help="held-out cases (a CT and an MRI render each)")
    args = parser.parse_args()
    with multiprocessing.get_context("spawn").Pool(len(TABLES)) as pool:
        figures = dict(zip(TABLES, pool.starmap(measure, [(t, args.held_out) for t in TABLES]), strict=True))
    print(f"mini CLIP pre-training, {args.held_out} held-out cases; linear probes")
    rows = list(next(iter(figures.values())))
    width = max(map(len, rows))
    print(f"{'':<{width}}" + "".join(f"{t:>20}" for t in TABLES))
    for row in rows:
        print(f"{row:<{width}}" + "".join(f"{figures[t][row]:>20.3f}" for t in TABLES))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
