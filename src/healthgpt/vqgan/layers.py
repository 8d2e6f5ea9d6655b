"""The encoder and decoder of taming's VQGAN: its blocks, levels and module names, so its keys load as they are.

Follows `taming/modules/diffusionmodules/model.py`; the code is our own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


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
