"""Hierarchical visual perception: one CLIP tower read at two depths, one projector per plugin.

Comprehension reads `hidden_states[-2]` (abstract features), generation `hidden_states[1]` (concrete features),
CLS dropped (REFERENCE §1.3). The tower runs once per image even when several depths are needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from healthgpt.errors import ImageInputError
from healthgpt.io.limits import check_picture

# Modes that PIL converts to RGB without losing meaning; 16-bit/float images need windowing first.
_CONVERTIBLE_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"}


def pad_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a centred square canvas of the longer side (the published `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ImagePreprocessor:
    """PIL image -> CLIP pixel values: RGB, pad to square with the mean colour, then `CLIPImageProcessor`."""

    def __init__(self, processor: CLIPImageProcessorPil) -> None:
        self.processor = processor
        # int(mean * 255) per channel, as the published code computes it: (122, 116, 104) for CLIP.
        self.background = tuple(int(m * 255) for m in processor.image_mean)

    @classmethod
    def for_clip(cls, image_size: int, mean: Sequence[float], std: Sequence[float]) -> ImagePreprocessor:
        """The processor of openai/clip-vit-large-patch14-336 at another size (for small configs)."""
        return cls(
            CLIPImageProcessorPil(
                size={"shortest_edge": image_size},
                crop_size={"height": image_size, "width": image_size},
                resample=3,
                image_mean=list(mean),
                image_std=list(std),
            )
        )

    @classmethod
    def from_pretrained(cls, path: str) -> ImagePreprocessor:
        return cls(CLIPImageProcessorPil.from_pretrained(path))

    def to_rgb(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise ImageInputError(
                "image", f"expected a PIL image, got {type(image).__name__}", "load files with healthgpt.io.load_image"
            )
        if image.mode not in _CONVERTIBLE_MODES:
            raise ImageInputError(
                "image",
                f"mode {image.mode!r} (e.g. 16-bit or float pixels) cannot be shown to the model as it is",
                "window it to 8-bit first, e.g. healthgpt.io.load_image(path, window='soft_tissue').to_pil()",
            )
        if image.width == 0 or image.height == 0:
            raise ImageInputError("image", f"has an empty size {image.size}", "pass a picture with pixels")
        check_picture(getattr(image, "filename", "") or "image", image.width, image.height)
        return image.convert("RGB")

    def bounded(self, image: Image.Image) -> Image.Image:
        """A non-square picture longer than 4x the model's input is first shrunk (aspect kept) to that length, so its
        padded square stays small (a 9000 x 10 picture would otherwise become 243 MB of canvas, 1 GB as floats);
        the processor shrinks the square to the input size anyway. Square and smaller pictures are left as they are."""
        side, limit = max(image.size), 4 * int(self.processor.crop_size.height)
        if image.width == image.height or side <= limit:
            return image
        size = (max(1, round(image.width * limit / side)), max(1, round(image.height * limit / side)))
        return image.resize(size, Image.Resampling.BICUBIC)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N,3,S,S] float32 pixel values."""
        squares = [pad_to_square(self.bounded(self.to_rgb(im)), self.background) for im in images]
        return torch.as_tensor(self.processor(images=squares, return_tensors="np")["pixel_values"])


def build_projector(in_dim: int, out_dim: int) -> nn.Sequential:
    """`mlp2x_gelu`: Linear -> GELU -> Linear (state keys `0.*`, `2.*` as in the released files)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class VisionEncoder(nn.Module):
    """A `CLIPVisionModel`, frozen unless a stage trains some of its layers, whose patch features can be read at
    several depths in one pass."""

    def __init__(self, tower: CLIPVisionModel) -> None:
        super().__init__()
        self.tower = tower
        self.tower.requires_grad_(False)

    @classmethod
    def random(
        cls, image_size: int, patch_size: int, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int
    ) -> VisionEncoder:
        config = CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            hidden_act="quick_gelu",
        )
        return cls(CLIPVisionModel(config))

    @property
    def hidden_size(self) -> int:
        return self.tower.config.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.tower.config.image_size // self.tower.config.patch_size) ** 2

    def depth(self, layer: int) -> int:
        """How many encoder layers lie behind `hidden_states[layer]` (0: the patch embeddings)."""
        count = self.tower.config.num_hidden_layers
        if not -(count + 1) <= layer <= count:
            raise ValueError(f"hidden_states[{layer}] does not exist in a tower of {count} layers")
        return layer % (count + 1)

    def encoder_layers(self, start: int, stop: int) -> list[nn.Module]:
        """The encoder layers `start` (0-based) up to `stop`, exclusive."""
        model = getattr(self.tower, "vision_model", self.tower)  # transformers 5 keeps the encoder at the top
        return list(model.encoder.layers[start:stop])

    def features(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Patch features (CLS dropped) at each requested `hidden_states` index: {layer: [N, P, C]}. Without
        gradients unless a training stage unfroze some of the tower's layers (`vision:<plugin>`)."""
        dtype = next(self.tower.parameters()).dtype
        tuned = torch.is_grad_enabled() and any(p.requires_grad for p in self.tower.parameters())
        with torch.set_grad_enabled(tuned):
            out = self.tower(pixel_values.to(dtype), output_hidden_states=True)
        return {layer: out.hidden_states[layer][:, 1:] for layer in layers}


def project_images(
    encoder: VisionEncoder,
    projectors: Mapping[str, nn.Module],
    vision_layers: Mapping[str, int],
    pixel_values: torch.Tensor,
    plugins: Sequence[str],
) -> torch.Tensor:
    """Visual embeddings [N, P, H] in LLM space, image i read at the depth of `plugins[i]` and projected by its
    projector. The tower runs once for all images and depths."""
    if len(plugins) != pixel_values.shape[0]:
        raise ValueError(f"{pixel_values.shape[0]} images but {len(plugins)} plugin names")
    feats = encoder.features(pixel_values, sorted({vision_layers[p] for p in plugins}))
    outputs: list[torch.Tensor | None] = [None] * len(plugins)
    for plugin in dict.fromkeys(plugins):
        rows = [i for i, p in enumerate(plugins) if p == plugin]
        projector = projectors[plugin]
        x = feats[vision_layers[plugin]][rows]  # [n, P, C]
        y = projector(x.to(next(projector.parameters()).dtype))  # [n, P, H]
        for j, i in enumerate(rows):
            outputs[i] = y[j]
    return torch.stack(outputs)  # [N, P, H]
