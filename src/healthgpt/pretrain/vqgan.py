"""Train or fine-tune the VQGAN image tokenizer with pixel losses and the quantizer's own term.

No discriminator and no perceptual loss: L1 + L2 on pixels is enough for the phantom world and keeps a CPU run to
a minute; a real taming VQGAN fine-tuned this way on a user's modality keeps its adversarial sharpness from
pre-training and adapts its codes to the new intensities.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from healthgpt.config import VQConfig
from healthgpt.io import save_png
from healthgpt.metrics import aggregate, image_metrics
from healthgpt.vqgan import VQGAN

from ._common import ImageSource, as_pil, batch_indices, image_items, make_optimizer

log = logging.getLogger(__name__)

PREVIEW_FILE = "reconstructions.png"


def gumbel_temperature(step: int, steps: int, start: float, end: float) -> float:
    """Exponential annealing from `start` at step 0 to `end` at the last step (taming anneals the same way)."""
    return start * (end / start) ** (step / max(1, steps - 1))


def train_vqgan(
    images: ImageSource,
    *,
    vq: VQConfig | VQGAN,
    steps: int = 1000,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    temperature: tuple[float, float] = (1.0, 1.0 / 16),
    out_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    threads_from: tuple[int, int] | None = None,
) -> VQGAN:
    """Train a VQGAN of `vq`'s architecture from scratch, or fine-tune a given VQGAN in place, on `images` (PIL
    images or a folder). Loss: L1 + L2 on pixels in [-1, 1] plus the quantizer loss (Gumbel KL or VQ
    commitment); a Gumbel temperature anneals from `temperature[0]` to `temperature[1]`. With `out_dir`, the
    model is saved there (`VQGAN.save`) beside a PNG of reconstructions of the first images. Returns it in eval.
    `threads_from=(step, n)` trains with `n` torch threads from that step on (the caller's count is restored after):
    the recipe widens its VQGAN onto the core the LM and CLIP beside it leave free, at a fixed step so that the
    model does not depend on when they finish (thread counts change float reduction order)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    items = image_items(images)
    before = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # init and Gumbel noise draw from a seeded, private stream
            torch.manual_seed(seed)
            model = VQGAN.from_config(vq) if isinstance(vq, VQConfig) else vq
            model.to(device).train()
            optimizer, schedule = make_optimizer(list(model.parameters()), lr, steps)
            order = batch_indices(len(items), batch_size, steps, torch.Generator().manual_seed(seed))
            bar = tqdm(order, total=steps, desc="vqgan", disable=not progress)
            for step, idx in enumerate(bar):
                if threads_from is not None and step == threads_from[0]:
                    torch.set_num_threads(threads_from[1])
                x = model.preprocess([as_pil(items[i]) for i in idx.tolist()]).to(device)
                recon, quant_loss = model(x, gumbel_temperature(step, steps, *temperature))
                pixel = F.l1_loss(recon, x) + F.mse_loss(recon, x)
                loss = pixel + quant_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.set_postfix(pixel=f"{pixel.item():.4f}", refresh=False)
    finally:
        torch.set_num_threads(before)
    model.eval()
    log.info("vqgan: %d steps, last pixel loss %.4f", steps, pixel.item())
    if out_dir is not None:
        out = Path(out_dir)
        model.save(out)
        preview = [as_pil(item) for item in items[:8]]
        save_png(reconstruction_grid(model, preview), out / PREVIEW_FILE)
    return model


@torch.no_grad()
def reconstruct(model: VQGAN, images: Sequence[Image.Image], batch_size: int = 32) -> list[Image.Image]:
    """Encode to codes and decode back (the deterministic path the LLM's image tokens go through)."""
    out: list[Image.Image] = []
    for start in range(0, len(images), batch_size):
        out += model.codes_to_pil(model.encode(model.preprocess(images[start : start + batch_size])))
    return out


def reconstruction_grid(model: VQGAN, images: Sequence[Image.Image]) -> Image.Image:
    """Inputs (resized to the model's size) on the top row, their reconstructions below."""
    size = (model.image_size, model.image_size)
    top = [np.asarray(im.convert("RGB").resize(size, Image.Resampling.LANCZOS)) for im in images]
    bottom = [np.asarray(im) for im in reconstruct(model, images)]
    return Image.fromarray(np.concatenate([np.concatenate(top, axis=1), np.concatenate(bottom, axis=1)], axis=0))


def evaluate_vqgan(model: VQGAN, images: ImageSource) -> dict[str, float]:
    """Mean PSNR (dB), SSIM (x100) and MSE of encode -> decode against the inputs resized to the model's size."""
    pil = [as_pil(item) for item in image_items(images)]
    size = (model.image_size, model.image_size)
    targets = [im.convert("RGB").resize(size, Image.Resampling.LANCZOS) for im in pil]
    return aggregate([image_metrics(r, t) for r, t in zip(reconstruct(model, pil), targets, strict=True)])
