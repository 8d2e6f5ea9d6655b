"""Contrastive (CLIP-style) pre-training of the CLIP vision tower against a small caption encoder.

The caption encoder is a mean-pooled bag of learned word embeddings (`nn.EmbeddingBag`) over the words of the
training captions, not a `CLIPTextModel`: only the vision tower is kept, templated medical captions are told
apart by which words they contain (modality, count, side), and a bag trains in microseconds, so the whole
budget goes into the tower. Captions that are equal are all positives of each other (multi-positive InfoNCE),
because a small world repeats captions within a batch and plain CLIP would push true matches apart.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from healthgpt.config import VisionConfig
from healthgpt.nano import random_vision
from healthgpt.vision import ImagePreprocessor, VisionEncoder, pad_to_square

from ._common import ImageSource, as_pil, batch_indices, image_items, make_optimizer

log = logging.getLogger(__name__)

UNKNOWN = "<unk>"


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words of a caption."""
    return re.findall(r"[a-z0-9]+", text.lower())


class BagOfWords(nn.Module):
    """Caption encoder: mean of learned embeddings of the caption's words (unknown words share one row)."""

    def __init__(self, vocabulary: Sequence[str], dim: int) -> None:
        super().__init__()
        self.index = {w: i for i, w in enumerate([UNKNOWN, *dict.fromkeys(vocabulary)])}
        self.bag = nn.EmbeddingBag(len(self.index), dim, mode="mean")

    @classmethod
    def from_captions(cls, captions: Sequence[str], dim: int) -> BagOfWords:
        return cls(sorted({w for c in captions for w in words(c)}), dim)

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        """[N, dim] caption features."""
        ids = [[self.index.get(w, 0) for w in words(c)] or [0] for c in captions]
        offsets = torch.tensor([0, *np.cumsum([len(i) for i in ids[:-1]])], dtype=torch.long)
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long)
        return self.bag(flat.to(self.bag.weight.device), offsets.to(self.bag.weight.device))


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] fixed 2D sine-cosine position codes (MAE's): the first half of the channels encode the
    patch's row, the second half its column, each as sines and cosines of geometric frequencies."""
    if dim % 4:
        raise ValueError(f"2D sine-cosine positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    angles = [axis.reshape(-1, 1) * omega for axis in (rows, cols)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()


def tower_from_scratch(config: VisionConfig, *, seed: int = 0) -> VisionEncoder:
    """A random CLIP tower of `config` whose patch position table starts as 2D sine-cosine codes (still trainable).
    From a random table a short contrastive run leaves a patch's column hard to read from its own feature, so the LLM
    cannot tell left from right (bench/README.md, clip_positions); a pretrained ViT-L/14's table carries it."""
    vision = random_vision(config, seed=seed)
    table = vision.tower.embeddings.position_embedding.weight
    grid = config.image_size // config.patch_size
    with torch.no_grad():
        table[1:] = sincos_positions(grid, config.hidden_size).to(table.dtype)  # row 0 is the CLS token's
    return vision


class PixelCache:
    """Images resized and cropped by a CLIP processor, kept as uint8 ([N, 3, S, S], a quarter of float32);
    `pixels(rows)` rescales and normalises them exactly as the processor would."""

    def __init__(self, preprocessor: ImagePreprocessor, images: ImageSource, chunk: int = 256) -> None:
        items = image_items(images)
        processor = preprocessor.processor
        chunks = []
        for start in range(0, len(items), chunk):
            squares = [
                pad_to_square(preprocessor.to_rgb(as_pil(i)), preprocessor.background)
                for i in items[start : start + chunk]
            ]
            raw = processor(images=squares, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
            chunks.append(torch.as_tensor(raw).round().to(torch.uint8))  # resized pixels: integers in 0..255
        self.data = torch.cat(chunks)
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = float(processor.rescale_factor)

    def __len__(self) -> int:
        return len(self.data)

    def pixels(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """[n, 3, S, S] float32 pixel values of the cached images `rows`."""
        return (self.data[rows].float() * self.scale - self.mean) / self.std


class ContrastiveCLIP(nn.Module):
    """The vision tower's pooled output and the caption encoder, each projected into one normalised space,
    and CLIP's learnable temperature (stored as log of the logit scale, initialised to 1 / 0.07)."""

    def __init__(self, vision: VisionEncoder, text: BagOfWords, embed_dim: int, preprocessor: ImagePreprocessor):
        super().__init__()
        self.vision = vision
        self.text = text
        self.preprocessor = preprocessor
        self.visual_projection = nn.Linear(vision.hidden_size, embed_dim, bias=False)
        self.text_projection = nn.Linear(text.bag.embedding_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, D] unit vectors from the tower's pooled (CLS, post-layernorm) output."""
        pooled = self.vision.tower(pixel_values=pixel_values).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def text_embeds(self, captions: Sequence[str]) -> torch.Tensor:
        """[N, D] unit vectors of the captions."""
        return F.normalize(self.text_projection(self.text(captions)), dim=-1)

    def loss(self, pixel_values: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Symmetric InfoNCE; every caption equal to an image's own is a positive of that image, and back."""
        logits = self.logit_scale.exp() * self.image_embeds(pixel_values) @ self.text_embeds(captions).T  # (B, B)
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=logits.dtype)
        targets = (same / same.sum(dim=1, keepdim=True)).to(logits.device)  # symmetric: rows serve both ways
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def pretrain_clip(
    vision: VisionEncoder | VisionConfig,
    images: ImageSource | PixelCache,
    captions: Sequence[str],
    *,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    embed_dim: int = 64,
    preprocessor: ImagePreprocessor | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ContrastiveCLIP:
    """Train a CLIP vision tower contrastively on image/caption pairs: a given one in place, or one of a `VisionConfig`
    from `tower_from_scratch`. Images go through `preprocessor` (default: CLIP's, padded to square, at the tower's
    size). Returns the dual encoder; its `.vision` is the tower, frozen again, ready for HealthGPT."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if isinstance(vision, VisionConfig):
        config, vision = vision, tower_from_scratch(vision, seed=seed)
        preprocessor = preprocessor or ImagePreprocessor.for_clip(
            config.image_size, config.image_mean, config.image_std
        )
    elif preprocessor is None:  # OpenAI CLIP's statistics, the VisionConfig defaults
        size = vision.tower.config.image_size
        preprocessor = ImagePreprocessor.for_clip(size, VisionConfig.image_mean, VisionConfig.image_std)
    cache = images if isinstance(images, PixelCache) else PixelCache(preprocessor, images)
    if len(cache) != len(captions):
        raise ValueError(f"{len(cache)} images but {len(captions)} captions; give one caption per image")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ContrastiveCLIP(vision, BagOfWords.from_captions(captions, embed_dim), embed_dim, preprocessor)
    model.to(device).train()
    vision.tower.requires_grad_(True)
    optimizer, schedule = make_optimizer(list(model.parameters()), lr, steps, weight_decay=0.01)
    order = batch_indices(len(cache), batch_size, steps, torch.Generator().manual_seed(seed))
    for idx in (bar := tqdm(order, total=steps, desc="clip", disable=not progress)):
        loss = model.loss(cache.pixels(idx).to(device), [captions[i] for i in idx.tolist()])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the logit scale
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    log.info("clip: %d steps, last loss %.3f", steps, loss.item())
    vision.tower.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def pooled_features(vision: VisionEncoder, pixels: PixelCache, layer: int = -2, batch_size: int = 256) -> torch.Tensor:
    """[N, C] patch features at `hidden_states[layer]` (CLS dropped, as HealthGPT reads them), mean-pooled."""
    device = next(vision.parameters()).device
    return torch.cat(
        [
            vision.features(pixels.pixels(slice(s, s + batch_size)).to(device), [layer])[layer].mean(dim=1).cpu()
            for s in range(0, len(pixels), batch_size)
        ]
    )


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *, l2: float = 1e-3
) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised features, L2, full-batch L-BFGS)."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    x, xt = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((xt @ weight + bias).argmax(dim=1) == test_y).float().mean())


@torch.no_grad()
def retrieval_accuracy(model: ContrastiveCLIP, pixels: PixelCache, captions: Sequence[str]) -> float:
    """Image -> caption top-1 accuracy: each image picks among the distinct captions of the set."""
    candidates = sorted(set(captions))
    device = model.logit_scale.device
    text = model.text_embeds(candidates)
    image = torch.cat(
        [model.image_embeds(pixels.pixels(slice(s, s + 256)).to(device)) for s in range(0, len(pixels), 256)]
    )
    predicted = (image @ text.T).argmax(dim=1).tolist()
    return float(np.mean([candidates[p] == c for p, c in zip(predicted, captions, strict=True)]))
