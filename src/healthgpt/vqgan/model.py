"""The VQGAN image tokenizer: taming's module tree, checked encode/decode, PIL in and out, save and strict load."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from healthgpt.config import VQConfig
from healthgpt.errors import CheckpointError, HealthGPTError
from healthgpt.io.atomic import atomic_target
from healthgpt.state_keys import check_keys

from .layers import Decoder, Encoder
from .quantizers import GumbelQuantize, VectorQuantizer

WEIGHTS_FILE = "vqgan.safetensors"
ARCH_FILE = "vqgan.json"


class VQGANError(HealthGPTError):
    """Bad input to the tokenizer: image shape, code count or code range."""


class VQGAN(nn.Module):
    """Image tokenizer with taming's module tree: `encoder`, `quant_conv`, `quantize`, `post_quant_conv`,
    `decoder`. Images are (B, 3, S, S) in [-1, 1]; codes are (B, grid, grid) in raster order."""

    def __init__(
        self,
        *,
        num_codes: int = 8192,
        embed_dim: int = 256,
        z_channels: int = 256,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (32,),
        image_size: int = 256,
        quantizer: Literal["gumbel", "vq"] = "gumbel",
        dropout: float = 0.0,
        num_groups: int = 32,
        kl_weight: float = 1e-8,
        beta: float = 0.25,
    ) -> None:
        super().__init__()
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise VQGANError(f"image_size {image_size} must be a multiple of the down-sampling {factor}")
        if quantizer not in ("gumbel", "vq"):
            raise VQGANError(f"quantizer must be 'gumbel' or 'vq', got {quantizer!r}")
        if quantizer == "gumbel" and embed_dim != z_channels:
            # taming's GumbelVQ feeds quant_conv's embed_dim output to a proj built for z_channels inputs.
            raise VQGANError(f"a Gumbel VQGAN needs embed_dim == z_channels, got {embed_dim}, {z_channels}")
        self.arch: dict[str, Any] = dict(
            num_codes=num_codes,
            embed_dim=embed_dim,
            z_channels=z_channels,
            ch=ch,
            ch_mult=list(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=list(attn_resolutions),
            image_size=image_size,
            quantizer=quantizer,
            dropout=dropout,
            num_groups=num_groups,
            kl_weight=kl_weight,
            beta=beta,
        )
        levels = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            resolution=image_size,
            z_channels=z_channels,
            dropout=dropout,
            num_groups=num_groups,
        )
        self.encoder = Encoder(**levels)
        self.decoder = Decoder(**levels)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.quantize: GumbelQuantize | VectorQuantizer = (
            GumbelQuantize(z_channels, num_codes, embed_dim, kl_weight=kl_weight)
            if quantizer == "gumbel"
            else VectorQuantizer(num_codes, embed_dim, beta=beta)
        )

    @classmethod
    def from_config(cls, vq: VQConfig) -> VQGAN:
        """A randomly initialised VQGAN of `vq`'s architecture; weights come from the loaders."""
        return cls(
            num_codes=vq.num_codes,
            embed_dim=vq.embed_dim,
            z_channels=vq.z_channels,
            ch=vq.ch,
            ch_mult=vq.ch_mult,
            num_res_blocks=vq.num_res_blocks,
            attn_resolutions=vq.attn_resolutions,
            image_size=vq.image_size,
            quantizer=vq.quantizer,
        )

    @property
    def grid(self) -> int:
        """Codes per side: image_size / 2**(levels - 1)."""
        return self.arch["image_size"] // 2 ** (len(self.arch["ch_mult"]) - 1)

    @property
    def num_codes(self) -> int:
        return self.arch["num_codes"]

    @property
    def image_size(self) -> int:
        return self.arch["image_size"]

    def _check_images(self, images: Tensor) -> Tensor:
        size = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
            raise VQGANError(
                f"images must be (B, 3, {size}, {size}) in [-1, 1], got {tuple(images.shape)}; "
                "resize with VQGAN.preprocess"
            )
        if images.numel() and (images.min() < -1.01 or images.max() > 1.01):
            raise VQGANError("images must be in [-1, 1] (x / 127.5 - 1 for 8-bit); see VQGAN.preprocess")
        weight = self.quant_conv.weight
        return images.to(device=weight.device, dtype=weight.dtype)

    def _check_codes(self, codes: Tensor) -> Tensor:
        n = self.grid * self.grid
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.ndim not in (2, 3):
            raise VQGANError(f"codes must be an integer tensor (B, {self.grid}, {self.grid}) or (B, {n})")
        count = codes.shape[1:].numel()
        if count != n:
            raise VQGANError(f"each image needs exactly {n} codes ({self.grid}x{self.grid}), got {count}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.num_codes:
            raise VQGANError(f"codes must lie in [0, {self.num_codes}), got values from {low} to {high}")
        return codes.reshape(codes.shape[0], self.grid, self.grid).to(self.quant_conv.weight.device)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Codes (B, grid, grid) of images (B, 3, S, S) in [-1, 1]; deterministic."""
        z = self.quant_conv(self.encoder(self._check_images(images)))
        return self.quantize.codes(z)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Images (B, 3, S, S) clamped to [-1, 1] from codes (B, grid, grid) or raster order (B, grid**2)."""
        z_q = self.quantize.lookup(self._check_codes(codes))
        return self.decoder(self.post_quant_conv(z_q)).clamp(-1.0, 1.0)

    def forward(self, images: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """Training pass: (reconstruction, quantizer loss). Gumbel: KL term, `temperature` of the
        Gumbel-softmax; VQ: codebook + commitment loss with straight-through gradients."""
        z = self.quant_conv(self.encoder(self._check_images(images)))
        z_q, quant_loss = self.quantize(z, temperature)
        return self.decoder(self.post_quant_conv(z_q)), quant_loss

    def codes_to_pil(self, codes: Tensor) -> list[Image.Image]:
        """RGB images of codes, mapped as the released `decode_to_img` does (REFERENCE §3.2)."""
        pixels = (self.decode(codes).float() + 1.0) / 2.0 * 255.0  # uint8 cast truncates, like numpy astype
        arrays = pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arrays]  # (H, W, 3) uint8 -> RGB

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """(B, 3, S, S) float32 in [-1, 1]: RGB, LANCZOS resize to image_size, aspect not kept (§3.3)."""
        if not images:
            raise VQGANError("preprocess needs a non-empty list of PIL images")
        size = (self.image_size, self.image_size)
        arrays = [np.asarray(im.convert("RGB").resize(size, Image.Resampling.LANCZOS)) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def save(self, directory: str | Path) -> None:
        """Write `vqgan.safetensors` and `vqgan.json` (architecture) into `directory`, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        with atomic_target(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        arch = json.dumps(self.arch, indent=2)
        with atomic_target(directory / ARCH_FILE) as tmp:
            tmp.write_text(arch)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> VQGAN:
        """A VQGAN saved by `save`; strict: every key present and used, shapes checked."""
        directory = Path(directory)
        try:
            arch = json.loads((directory / ARCH_FILE).read_text())
            state = load_file(directory / WEIGHTS_FILE, device=str(device))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as e:
            raise CheckpointError(
                f"{directory}: not a saved VQGAN, or a truncated one ({e}); write one with VQGAN.save"
            ) from e
        return build_loaded(arch, state, str(directory / WEIGHTS_FILE))


def build_loaded(arch: dict[str, Any], state: dict[str, Tensor], source: str) -> VQGAN:
    """Build `arch` without allocating weights, then assign `state` after a strict key and shape check."""
    try:
        with torch.device("meta"):
            model = VQGAN(**arch)
    except TypeError as e:
        raise CheckpointError(f"{source}: architecture {arch} does not fit VQGAN ({e})") from e
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(state, expected, source, f"the {arch['quantizer']} VQGAN architecture")
    model.load_state_dict(state, assign=True)
    return model.eval()
