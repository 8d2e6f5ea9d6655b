"""What each optimizer step sees and leaves behind: the batch order every process agrees on, the learning rate,
and the records of a run (loss plot, peak memory)."""

from __future__ import annotations

import importlib.util
import logging
import math
import resource
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from healthgpt.io.atomic import atomic_target
from healthgpt.tokens import ImageVocab

log = logging.getLogger(__name__)

_TWIN_STREAM = 1  # the random stream of a step's condition dropout, apart from the epoch permutations


class StepBatchSampler(Sampler[list[int]]):
    """This process's micro-batches for optimizer steps `start..total-1`: step s takes samples
    `perm(epoch)[k*G:(k+1)*G]` (G the global batch), split into `world x accumulation` micro-batches. With
    `twin_rate`, each sample of the global batch that has a twin (`twins[i]`) is swapped, with that chance, for index
    `n + i` (its unconditional twin in `TrainingDataset`), drawn per step before the split, so no split changes it."""

    def __init__(
        self,
        n: int,
        global_batch: int,
        micro: int,
        rank: int,
        world: int,
        seed: int,
        start: int,
        total: int,
        *,
        twins: np.ndarray | None = None,
        twin_rate: float = 0.0,
    ) -> None:
        self.n, self.global_batch, self.micro, self.rank, self.world = n, global_batch, micro, rank, world
        self.seed, self.start, self.total = seed, start, total
        self.twins, self.twin_rate = twins, twin_rate
        self.accumulation = global_batch // (micro * world)
        self.steps_per_epoch = n // global_batch

    def __len__(self) -> int:
        return (self.total - self.start) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        perm, perm_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = np.random.default_rng([self.seed, epoch]).permutation(self.n), epoch
            window = perm[k * self.global_batch : (k + 1) * self.global_batch]
            if self.twins is not None and self.twin_rate:
                drop = np.random.default_rng([self.seed, step, _TWIN_STREAM]).random(len(window)) < self.twin_rate
                window = np.where(drop & self.twins[window], window + self.n, window)
            mine = window[self.rank * self.accumulation * self.micro : (self.rank + 1) * self.accumulation * self.micro]
            for j in range(self.accumulation):
                yield mine[j * self.micro : (j + 1) * self.micro].tolist()


def lr_lambda(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def peak_memory() -> dict[str, Any]:
    """Peak CUDA memory allocated, or the process's peak resident set on CPU, in MiB."""
    if torch.cuda.is_available():
        return {"kind": "cuda_max_allocated", "mib": torch.cuda.max_memory_allocated() / 2**20}
    return {"kind": "process_max_rss", "mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB


def write_loss_plot(history: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """A PNG of loss per step (matplotlib, no global backend change); False with a note if matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return True


def corrupt_codes(
    input_ids: torch.Tensor, vocab: ImageVocab, rate: float, seeds: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Noisy teacher forcing: each image-code input of row i is replaced, with chance `rate`, by a code drawn
    uniformly from `vocab`'s codes, from the random stream `seeds[i]` (one draw per code in order, so padding and the
    batch split do not change it). The labels stay true, so the next code must come from the instruction and the
    input image as well as from the codes before it, as at inference, where earlier codes are the model's own.
    Ours: transformers and peft corrupt no inputs (scheduled sampling would cost a forward pass per step)."""
    out = input_ids.clone()
    is_code = vocab.is_code(input_ids)
    for row, seed in enumerate(seeds):
        where = is_code[row].nonzero().squeeze(1)
        rng = np.random.default_rng(seed)
        hit = rng.random(len(where)) < rate
        drawn = torch.from_numpy(rng.integers(0, vocab.num_codes, len(where))[hit])
        out[row, where[hit]] = vocab.codes_to_ids(drawn).to(out)
    return out
