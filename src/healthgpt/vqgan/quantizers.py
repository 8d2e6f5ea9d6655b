"""taming's two quantizers (`GumbelQuantize`, `VectorQuantizer2`): codes, codebook look-up and training loss.

Follows `taming/modules/vqvae/quantize.py`; encoding here is deterministic, unlike taming's eval path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GumbelQuantize(nn.Module):
    """taming `GumbelQuantize`: `proj` (1x1 conv to code logits) and `embed` (the codebook). Training
    samples a hard Gumbel-softmax (straight-through) plus a KL-to-uniform term; encoding takes the argmax."""

    def __init__(self, in_channels: int, num_codes: int, embed_dim: int, *, kl_weight: float) -> None:
        super().__init__()
        self.kl_weight = kl_weight
        self.proj = nn.Conv2d(in_channels, num_codes, 1)
        self.embed = nn.Embedding(num_codes, embed_dim)

    def codes(self, z: Tensor) -> Tensor:
        """Deterministic codes (B, h, w): argmax of the logits (taming samples Gumbel noise even in eval)."""
        return self.proj(z).argmax(dim=1)

    def lookup(self, codes: Tensor) -> Tensor:
        """Codebook vectors (B, D, h, w) of codes (B, h, w)."""
        return self.embed(codes).permute(0, 3, 1, 2)

    def forward(self, z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        logits = self.proj(z)  # (B, N, h, w)
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=temperature, dim=1, hard=True)
        else:
            one_hot = F.one_hot(logits.argmax(dim=1), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
        z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.embed.weight)
        probs = logits.softmax(dim=1)  # taming's KL(q || uniform) prior term
        kl = (probs * torch.log(probs * logits.shape[1] + 1e-10)).sum(dim=1).mean()
        return z_q, self.kl_weight * kl


class VectorQuantizer(nn.Module):
    """taming `VectorQuantizer2`: nearest entry of `embedding`; straight-through gradients, codebook loss plus
    beta x commitment loss. taming's default `legacy=True` puts beta on the codebook term instead; this only
    changes training, not checkpoints, and we use the VQ-VAE paper's weighting."""

    def __init__(self, num_codes: int, embed_dim: int, *, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(num_codes, embed_dim)

    def codes(self, z: Tensor) -> Tensor:
        """Codes (B, h, w) of the nearest codebook entries (Euclidean)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        return torch.cdist(flat, self.embedding.weight).argmin(dim=1).reshape(b, h, w)

    def lookup(self, codes: Tensor) -> Tensor:
        """Codebook vectors (B, D, h, w) of codes (B, h, w)."""
        return self.embedding(codes).permute(0, 3, 1, 2)

    def forward(self, z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """`temperature` is unused; it keeps the interface of GumbelQuantize."""
        z_q = self.lookup(self.codes(z))
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        return z + (z_q - z).detach(), loss
