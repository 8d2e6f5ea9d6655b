"""One config tree for HealthGPT: frozen dataclasses, variants as data, JSON round-trip.

The numbers of the `m3`, `l14` and `xl32` variants are the compatibility contract of the published
model (REFERENCE §1.1, §2.1, §3.1); `nano` is the same architecture at a size that trains on a laptop CPU.
Nothing here imports torch: builders turn these values into flat arguments for the modules.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

COMPREHENSION = "comprehension"
GENERATION = "generation"
QUANTIZE_MODES = ("int8", "int4", "nf4")  # weight-only formats of the base LLM's linears (healthgpt.quantize)


@dataclass(frozen=True)
class LLMConfig:
    """The base causal LM: where it comes from and the shape it must have."""

    arch: Literal["phi3", "qwen2"]
    source: str  # HF hub id or local folder of the base model
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_rows: int  # embedding rows of the base checkpoint
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower read at two depths (hierarchical visual perception)."""

    source: str
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class PluginConfig:
    """One H-LoRA plugin (a task): fused mixture of `num_experts` LoRA experts of total rank `rank`,
    plus the CLIP depth and projector it reads images with."""

    rank: int
    alpha: float
    num_experts: int = 4
    dropout: float = 0.0
    vision_layer: int = -2
    projector: Literal["mlp2x_gelu"] = "mlp2x_gelu"

    def __post_init__(self) -> None:
        if self.rank % self.num_experts:
            raise ValueError(f"H-LoRA rank {self.rank} must be a multiple of num_experts {self.num_experts}")

    @property
    def scaling(self) -> float:
        """alpha / R * k, exactly as the released code computes it (REFERENCE §2.2)."""
        return self.alpha / self.rank * self.num_experts


@dataclass(frozen=True)
class VQConfig:
    """Taming-style VQGAN image tokenizer; its codes are extra tokens of the LLM vocabulary."""

    num_codes: int = 8192
    embed_dim: int = 256
    image_size: int = 256
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)
    quantizer: Literal["gumbel", "vq"] = "gumbel"
    source: str | None = None  # folder with last.ckpt + model.yaml, or our safetensors

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** (len(self.ch_mult) - 1)

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid


def check_guidance_scale(scale: float, name: str) -> float:
    """`scale` if it is a usable classifier-free guidance scale (finite, above 0; 1 is none), else a ValueError
    naming the setting `name`."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name} must be a finite number above 0 (1: no guidance), got {scale!r}")
    return float(scale)


@dataclass(frozen=True)
class HealthGPTConfig:
    """The whole model: base LLM, vision tower, one plugin per task, image tokenizer, chat template."""

    name: str
    llm: LLMConfig
    vision: VisionConfig
    plugins: dict[str, PluginConfig]
    vq: VQConfig = field(default_factory=VQConfig)
    template: str = "phi3_instruct"
    system_prompt: str | None = None  # None: the template's published default
    add_image_tokens: bool = True  # Phi variants add 8,195 tokens; XL32 keeps Qwen's vocabulary
    # Where a user turn's images go: before its text (the published LLaVA layout) or after it. After the text, the
    # distance from each input patch to the code written at its place is the same for every instruction, which is
    # what lets a small model learn to copy lesions (bench/README.md, phantom_goals).
    images_after_text: bool = False
    # The classifier-free guidance scale of image generation where a caller names none (1: none). A model trained
    # with condition dropout (`StageConfig.condition_dropout`) carries the scale it was measured best at.
    guidance_scale: float = 1.0
    dtype: str = "float16"
    official_files: dict[str, str] = field(default_factory=dict)
    hub_id: str | None = None

    def __post_init__(self) -> None:
        check_guidance_scale(self.guidance_scale, "guidance_scale")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HealthGPTConfig:
        d = dict(d)
        vq = dict(d.pop("vq", {}))
        for key in ("ch_mult", "attn_resolutions"):
            if key in vq:
                vq[key] = tuple(vq[key])
        vision = dict(d.pop("vision"))
        for key in ("image_mean", "image_std"):
            if key in vision:
                vision[key] = tuple(vision[key])
        return cls(
            llm=LLMConfig(**d.pop("llm")),
            vision=VisionConfig(**vision),
            plugins={k: PluginConfig(**v) for k, v in d.pop("plugins").items()},
            vq=VQConfig(**vq),
            **d,
        )

    def save(self, path: str | Path) -> None:
        """Write the config as JSON (atomically)."""
        from healthgpt.io.atomic import write_atomic  # healthgpt.io imports the config: import when writing

        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HealthGPTConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: not a valid HealthGPT config.json ({e})") from e

    def replace(self, **changes: Any) -> HealthGPTConfig:
        return dataclasses.replace(self, **changes)


CLIP_L14_336 = VisionConfig(source="openai/clip-vit-large-patch14-336")
TAMING_GUMBEL_F8 = VQConfig()

VARIANTS: dict[str, HealthGPTConfig] = {
    "m3": HealthGPTConfig(
        name="m3",
        llm=LLMConfig(
            arch="phi3",
            source="microsoft/Phi-3-mini-4k-instruct",
            hidden_size=3072,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            intermediate_size=8192,
            vocab_rows=32064,
        ),
        vision=CLIP_L14_336,
        plugins={
            COMPREHENSION: PluginConfig(rank=64, alpha=128, vision_layer=-2),
            GENERATION: PluginConfig(rank=256, alpha=512, vision_layer=1),
        },
        template="phi3_instruct",
        official_files={
            COMPREHENSION: "com_hlora_weights.bin",
            GENERATION: "gen_hlora_weights.bin",
            "fusion": "fusion_layer_weights.bin",
        },
        hub_id="lintw/HealthGPT-M3",
    ),
    "l14": HealthGPTConfig(
        name="l14",
        llm=LLMConfig(
            arch="phi3",
            source="microsoft/phi-4",
            hidden_size=5120,
            num_layers=40,
            num_heads=40,
            num_kv_heads=10,
            intermediate_size=17920,
            vocab_rows=100352,
            max_position_embeddings=16384,
            rope_theta=250000.0,
        ),
        vision=CLIP_L14_336,
        plugins={COMPREHENSION: PluginConfig(rank=32, alpha=64, vision_layer=-2)},
        template="phi4_instruct",
        official_files={COMPREHENSION: "com_hlora_weights_phi4.bin"},
        hub_id="lintw/HealthGPT-L14",
    ),
    "xl32": HealthGPTConfig(
        name="xl32",
        llm=LLMConfig(
            arch="qwen2",
            source="Qwen/Qwen2.5-32B-Instruct",
            hidden_size=5120,
            num_layers=64,
            num_heads=40,
            num_kv_heads=8,
            intermediate_size=27648,
            vocab_rows=152064,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
        ),
        vision=CLIP_L14_336,
        plugins={COMPREHENSION: PluginConfig(rank=32, alpha=64, vision_layer=-2)},
        template="qwen_2",
        add_image_tokens=False,
        official_files={COMPREHENSION: "com_hlora_weights_QWEN_32B.bin"},
        hub_id="lintw/HealthGPT-XL32",
    ),
    # Same architecture as m3 (Phi-3 LLM, CLIP, taming VQGAN), sized to build and train on a CPU.
    "nano": HealthGPTConfig(
        name="nano",
        llm=LLMConfig(
            arch="phi3",
            source="nano",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            intermediate_size=128,
            vocab_rows=512,
            max_position_embeddings=1024,
        ),
        vision=VisionConfig(
            source="nano",
            image_size=112,
            patch_size=14,
            hidden_size=32,
            num_layers=4,
            num_heads=4,
            intermediate_size=64,
        ),
        plugins={
            COMPREHENSION: PluginConfig(rank=8, alpha=16, vision_layer=-2),
            GENERATION: PluginConfig(rank=16, alpha=32, vision_layer=1),
        },
        vq=VQConfig(
            num_codes=256,
            embed_dim=16,
            image_size=64,
            z_channels=16,
            ch=16,
            ch_mult=(1, 2, 2, 4),
            num_res_blocks=1,
            attn_resolutions=(),
            quantizer="gumbel",
        ),
        template="phi3_instruct",
        dtype="float32",
    ),
    # nano's architecture sized to keep lesions: a 16x16 grid of codes (nano's 8x8 loses them), and a vision tower
    # whose 16x16 patches line up with those codes, so the generation plugin reads each code's own patch.
    "mini": HealthGPTConfig(
        name="mini",
        llm=LLMConfig(
            arch="phi3",
            source="mini",
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            intermediate_size=256,
            vocab_rows=512,
            max_position_embeddings=1024,
        ),
        vision=VisionConfig(
            source="mini",
            image_size=64,
            patch_size=4,
            hidden_size=64,
            num_layers=4,
            num_heads=4,
            intermediate_size=128,
        ),
        plugins={
            COMPREHENSION: PluginConfig(rank=8, alpha=16, vision_layer=-2),
            GENERATION: PluginConfig(rank=16, alpha=32, vision_layer=1),
        },
        vq=VQConfig(
            num_codes=512,
            embed_dim=32,
            image_size=64,
            z_channels=32,
            ch=32,
            ch_mult=(1, 2, 4),
            num_res_blocks=1,
            attn_resolutions=(),
            quantizer="gumbel",
        ),
        template="phi3_instruct",
        images_after_text=True,  # a fixed patch -> code distance: the copy that keeps lesions is learnable
        dtype="float32",
    ),
}


EMBEDDED = ("nano",)  # bundles shipped in the package (`healthgpt/assets/<name>/`), loaded by name


def get_variant(name: str) -> HealthGPTConfig:
    """The config of a named variant (`nano`, `mini`, `m3`, `l14`, `xl32`)."""
    try:
        return VARIANTS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}") from None
