"""Seconds per generated image (1,024 codes): our constrained loop, eager and on the compiled static-cache engine,
vs the published approach.

Published approach (REFERENCE §3.4): `transformers` `generate` from the prompt embeddings with no constraint
(`max_new_tokens` 1100, greedy), decode the ids to text, drop the last 8 characters, parse every integer with a
regex, and decode only if exactly 1,024 were found (otherwise the published code crashes). Ours: the shared loop
with the image-span constraint, codes by id arithmetic, stop right after `<end_index>`. Same weights, same prompt,
same VQGAN decode. Each mode runs in its own subprocess so peak RSS is its own; the compiled mode is timed after
one warm-up image (compilation is reported apart).

    python bench/generate_image.py [--batches 1 8]                                  # CPU, one thread
    python bench/generate_image.py --device cuda --variant m3 --dtype bfloat16      # GPU, real M3 shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from _shared import build_on_device, small_config, sync
from PIL import Image

from healthgpt.api import HealthGPT
from healthgpt.config import GENERATION, HealthGPTConfig

PUBLISHED_MAX_NEW_TOKENS = 1100


def image_config() -> HealthGPTConfig:
    """The shared `small` config made 256 wide and 4 layers deep, with a 32x32 code grid (1,024 codes and 8,192
    code tokens, as the real VQGAN) on a light VQGAN."""
    base = small_config()
    llm = dataclasses.replace(
        base.llm, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=704
    )
    vq = dataclasses.replace(base.vq, num_codes=8192, image_size=256)
    return base.replace(name="image-bench", llm=llm, vq=vq)


def published(model: HealthGPT, images: list[Image.Image]) -> tuple[int, int]:
    """(new tokens, images that parsed to exactly 1,024 codes) the published way."""
    reqs = [
        model.build_request(
            [{"role": "user", "content": "Reconstruct the image."}], [im], plugin=GENERATION, image_generation=True
        )
        for im in images
    ]
    from healthgpt.generation import left_pad as _left_pad
    from healthgpt.model import expand_image_slots

    ids, mask = _left_pad([expand_image_slots(r.input_ids, model.model.num_patches) for r in reqs], model.pad_id)
    pixels = torch.cat([r.pixel_values for r in reqs])
    with torch.inference_mode(), model.model.hlora.use(GENERATION):
        embeds = model.model.embed(ids, pixels, [GENERATION] * len(reqs))
        out = model.model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=PUBLISHED_MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=model.pad_id,
        )
    valid = 0
    for text in model.tokenizer.batch_decode(out, skip_special_tokens=False):
        codes = [int(x) for x in re.findall(r"\d+", text[:-8])]
        if len(codes) == 1024:
            model.vqgan.codes_to_pil(torch.tensor([codes]))
            valid += 1
    return out.numel(), valid


def ours(model: HealthGPT, images: list[Image.Image]) -> tuple[int, int]:
    out = model.generate_image(images, "reconstruct", progress=False)
    return len(images) * (model.config.vq.num_image_tokens + 1), len(out)


MODES = ("published", "eager", "compiled")


def child(mode: str, batch: int, device: torch.device, variant: str, dtype: str) -> None:
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU seconds of one thread are what neighbours on a shared machine cannot inflate
    torch.manual_seed(0)
    if variant == "image-bench":
        model = HealthGPT.random(image_config(), seed=0).to(device, dtype)
    else:
        model = build_on_device(variant, device, dtype)
    model.enforce_eager = mode != "compiled"
    rng = np.random.default_rng(0)
    size = model.config.vision.image_size
    images = [Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)) for _ in range(batch)]
    run = published if mode == "published" else ours
    warm = 0.0
    if mode == "compiled":
        start = time.perf_counter()
        run(model, images)
        sync(device)
        warm = time.perf_counter() - start
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    tokens, valid = run(model, images)
    sync(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "cpu": cpu, "tokens": tokens, "valid": valid, "peak_mb": peak, "warm": warm}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default="image-bench", help="image-bench (CPU default) or a variant, e.g. m3")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.child:
        child(args.child[0], int(args.child[1]), device, args.variant, args.dtype)
        return
    print(f"torch {torch.__version__}, {device}, {args.variant}, {args.dtype}, 1,024 codes per image, greedy")
    print(f"{'batch':>5} {'mode':<10} {'s/image':>8} {'CPU s/image':>12} {'valid':>6} {'peak MB':>8} {'compile s':>9}")
    for batch in args.batches:
        rows = {}
        for mode in MODES:
            command = [sys.executable, __file__, "--child", mode, str(batch), "--device", args.device]
            command += ["--variant", args.variant, "--dtype", args.dtype]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows[mode] = r
            print(
                f"{batch:>5} {mode:<10} {r['seconds'] / batch:>8.2f} {r['cpu'] / batch:>12.2f} "
                f"{r['valid']:>3}/{batch:<2} {r['peak_mb']:>8.0f} {r['warm']:>9.1f}"
            )
        for mode in MODES[1:]:
            wall = rows["published"]["seconds"] / rows[mode]["seconds"]
            cpu = rows["published"]["cpu"] / rows[mode]["cpu"]
            print(f"{batch:>5} published / {mode}: {cpu:.2f}x in CPU time, {wall:.2f}x wall")


if __name__ == "__main__":
    main()
