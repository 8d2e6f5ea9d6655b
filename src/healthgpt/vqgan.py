"""Taming-transformers-compatible VQGAN image tokenizer (REFERENCE §3) in plain PyTorch.

The module tree and state-dict keys are those of taming's `GumbelVQ` (HealthGPT's f8 / 8,192-code model)
and `VQModel`, so their Lightning `last.ckpt` files load as they are, strictly. Written by hand because no
maintained library ships the taming architecture under its key names (diffusers' VQModel renames every key);
the layers follow `taming/modules/diffusionmodules/model.py` and `taming/modules/vqvae/quantize.py`, the code
is our own. Encoding is deterministic (argmax of the Gumbel logits, or the nearest codebook entry), unlike
taming's eval path.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from healthgpt.config import VQConfig
from healthgpt.errors import CheckpointError, HealthGPTError
from healthgpt.io.atomic import atomic_target
from healthgpt.state_keys import check_keys

WEIGHTS_FILE = "vqgan.safetensors"
ARCH_FILE = "vqgan.json"
# model.yaml `model.target` -> our quantizer name; any other target is refused.
TAMING_TARGETS = {"taming.models.vqgan.GumbelVQ": "gumbel", "taming.models.vqgan.VQModel": "vq"}
# Lightning checkpoints written by PyTorch Lightning 1.x key their callback states by the callback *class*
# (the gumbel f8 `last.ckpt` does); these names unpickle to an inert stand-in, never to Lightning code.
LIGHTNING_CLASS_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)


class VQGANError(HealthGPTError):
    """Bad input to the tokenizer: image shape, code count or code range."""


def _group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """taming `Normalize`: GroupNorm(32 groups, eps 1e-6, affine). For tiny test models whose channel count
    32 does not divide, the group count falls back to gcd(num_groups, channels), a divisor of both."""
    return nn.GroupNorm(math.gcd(num_groups, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """taming `ResnetBlock` without time embedding: norm1, swish, conv1, norm2, swish, dropout, conv2, plus a
    1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float, num_groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # swish == silu
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """taming `AttnBlock`: single-head self-attention over pixels with 1x1 conv `q`, `k`, `v`, `proj_out`."""

    def __init__(self, channels: int, *, num_groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (conv(hn).reshape(b, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale C**-0.5 as in taming
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """taming `Downsample(with_conv=True)`: asymmetric zero pad (0, 1, 0, 1), then a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """taming `Upsample(with_conv=True)`: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One resolution level (taming `down[i]` / `up[i]`): `block` res blocks, each followed by `attn[j]` when
    the level's resolution is an attention resolution. The caller attaches `downsample` / `upsample`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        *,
        attention: bool,
        dropout: float,
        num_groups: int,
    ) -> None:
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(
            ResnetBlock(c_in, out_channels, dropout=dropout, num_groups=num_groups) for c_in in channels[:-1]
        )
        n_attn = num_blocks if attention else 0
        self.attn = nn.ModuleList(AttnBlock(out_channels, num_groups=num_groups) for _ in range(n_attn))

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return x


class MidBlock(nn.Module):
    """taming `mid`: `block_1`, `attn_1`, `block_2` at the lowest resolution (encoder and decoder alike)."""

    def __init__(self, channels: int, *, dropout: float, num_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, num_groups=num_groups)
        self.attn_1 = AttnBlock(channels, num_groups=num_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, num_groups=num_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """taming `Encoder` (double_z False): conv_in, `down` levels, `mid`, `norm_out`, swish, `conv_out`."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float,
        num_groups: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        stages, block_in, res = [], ch, resolution
        for level, mult in enumerate(ch_mult):
            stage = Stage(
                block_in,
                ch * mult,
                num_res_blocks,
                attention=res in attn_resolutions,
                dropout=dropout,
                num_groups=num_groups,
            )
            block_in = ch * mult
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            stages.append(stage)
        self.down = nn.ModuleList(stages)
        self.mid = MidBlock(block_in, dropout=dropout, num_groups=num_groups)
        self.norm_out = _group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            h = stage(h)
            if level != len(self.down) - 1:
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """taming `Decoder`: conv_in from z, `mid`, `up` levels (num_res_blocks + 1 blocks each) run from the
    lowest resolution up, `norm_out`, swish, `conv_out` to RGB. Like taming, `up` is built in reverse and
    prepended, so `up[i]` is level i."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float,
        num_groups: int,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout=dropout, num_groups=num_groups)
        stages: list[Stage] = []
        for level in reversed(range(len(ch_mult))):
            stage = Stage(
                block_in,
                ch * ch_mult[level],
                num_res_blocks + 1,
                attention=res in attn_resolutions,
                dropout=dropout,
                num_groups=num_groups,
            )
            block_in = ch * ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            h = self.up[level](h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


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
        return _build_loaded(arch, state, str(directory / WEIGHTS_FILE))


def load_taming_checkpoint(ckpt_path: str | Path, yaml_path: str | Path | None = None) -> VQGAN:
    """A VQGAN from a taming Lightning `last.ckpt` and its `model.yaml` (default: beside the checkpoint as
    HealthGPT ships it, else `../configs/model.yaml` as taming's released logs do). `loss.*` keys
    (discriminator, perceptual loss) are ignored; every other key must match exactly."""
    ckpt_path = Path(ckpt_path)
    arch = arch_from_taming_yaml(_find_model_yaml(ckpt_path) if yaml_path is None else Path(yaml_path))
    checkpoint = _torch_load(ckpt_path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{ckpt_path}: not a Lightning checkpoint (no 'state_dict' dict inside)")
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("loss.")}
    return _build_loaded(arch, state, str(ckpt_path))


def _find_model_yaml(ckpt_path: Path) -> Path:
    candidates = (ckpt_path.with_name("model.yaml"), ckpt_path.parent.parent / "configs" / "model.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = " or ".join(map(str, candidates))
    raise CheckpointError(f"{ckpt_path}: no model.yaml at {tried}; pass yaml_path=<taming model.yaml>")


def arch_from_taming_yaml(yaml_path: str | Path) -> dict[str, Any]:
    """VQGAN constructor arguments from a taming `model.yaml` (`model.target`, `model.params`)."""
    try:
        model = yaml.safe_load(Path(yaml_path).read_text())["model"]
        target = model["target"]
        if target not in TAMING_TARGETS:
            known = ", ".join(TAMING_TARGETS)
            raise CheckpointError(f"{yaml_path}: model.target {target!r} is not one of {known}")
        params = model["params"]
        dd = params["ddconfig"]
        for key, needed in (("double_z", False), ("in_channels", 3), ("out_ch", 3)):  # no usable defaults
            if dd[key] != needed:
                raise CheckpointError(f"{yaml_path}: ddconfig.{key}={dd[key]!r} unsupported (needs {needed})")
        if params.get("remap") is not None:
            raise CheckpointError(f"{yaml_path}: codebook remapping (params.remap) is unsupported")
        return dict(
            num_codes=params["n_embed"],
            embed_dim=params["embed_dim"],
            z_channels=dd["z_channels"],
            ch=dd["ch"],
            ch_mult=list(dd["ch_mult"]),
            num_res_blocks=dd["num_res_blocks"],
            attn_resolutions=list(dd["attn_resolutions"]),
            image_size=dd["resolution"],
            quantizer=TAMING_TARGETS[target],
            dropout=dd.get("dropout", 0.0),
            kl_weight=params.get("kl_weight", 1e-8),
        )
    except OSError as e:
        raise CheckpointError(f"{yaml_path}: cannot read the taming model.yaml ({e}); pass yaml_path") from e
    except (KeyError, TypeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{yaml_path}: not a taming model.yaml, missing or malformed field {e}") from e


class _LightningStandIn:
    """Inert placeholder for Lightning classes found in checkpoints; it has no behaviour to run."""


def _allowed_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """The explicit allow-list for Lightning checkpoints: numpy scalars/dtypes, Lightning class stand-ins."""
    numpy_scalar = np.float64(0).__reduce__()[0]  # `numpy.(_)core.multiarray.scalar` in any numpy version
    numeric_dtypes = {type(np.dtype(c)) for c in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]}
    return [
        np.dtype,
        *numeric_dtypes,
        (numpy_scalar, "numpy.core.multiarray.scalar"),
        (numpy_scalar, "numpy._core.multiarray.scalar"),
        *((_LightningStandIn, name) for name in LIGHTNING_CLASS_NAMES),
    ]


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, then with the explicit allow-list; never arbitrary unpickling."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; pass the taming last.ckpt")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals(_allowed_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))  # torch's reason without its preamble
        raise CheckpointError(
            f"{path}: cannot be read with the weights-only loader and its allow-list of harmless classes "
            f"({found.group(1) if found else e}). "
            "If you trust the file, keep only its weights once: torch.save({'state_dict': torch.load(p, "
            "weights_only=False)['state_dict']}, out), then load `out`"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from e


def _build_loaded(arch: dict[str, Any], state: dict[str, Tensor], source: str) -> VQGAN:
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
