"""Taming-transformers-compatible VQGAN image tokenizer (REFERENCE §3) in plain PyTorch.

The module tree and state-dict keys are those of taming's `GumbelVQ` (HealthGPT's f8 / 8,192-code model)
and `VQModel`, so their Lightning `last.ckpt` files load as they are, strictly. Written by hand because no
maintained library ships the taming architecture under its key names (diffusers' VQModel renames every key);
the layers follow `taming/modules/diffusionmodules/model.py` and `taming/modules/vqvae/quantize.py`, the code
is our own. Encoding is deterministic (argmax of the Gumbel logits, or the nearest codebook entry), unlike
taming's eval path.

A package of four modules: `layers` (encoder and decoder blocks), `quantizers` (Gumbel and nearest-entry),
`model` (the `VQGAN` module with its checks, save and load), `taming` (reading taming's released checkpoint).
"""

from healthgpt.errors import CheckpointError

from .layers import AttnBlock, Decoder, Downsample, Encoder, MidBlock, ResnetBlock, Stage, Upsample
from .model import ARCH_FILE, VQGAN, WEIGHTS_FILE, VQGANError
from .quantizers import GumbelQuantize, VectorQuantizer
from .taming import LIGHTNING_CLASS_NAMES, TAMING_TARGETS, arch_from_taming_yaml, load_taming_checkpoint

__all__ = [
    "ARCH_FILE",
    "LIGHTNING_CLASS_NAMES",
    "TAMING_TARGETS",
    "VQGAN",
    "WEIGHTS_FILE",
    "AttnBlock",
    "CheckpointError",
    "Decoder",
    "Downsample",
    "Encoder",
    "GumbelQuantize",
    "MidBlock",
    "ResnetBlock",
    "Stage",
    "Upsample",
    "VQGANError",
    "VectorQuantizer",
    "arch_from_taming_yaml",
    "load_taming_checkpoint",
]
