"""Image generation on a loaded `HealthGPT`: the checked generation request (with its guidance twin), the decode of
a span constrained to the VQ grid's codes, and those codes turned into pictures by the VQGAN."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config import GENERATION
from ..generation import Request, stream
from ..tasks import UNCONDITIONAL_INSTRUCTION, check_image_input, resolve_instruction

if TYPE_CHECKING:
    from .facade import HealthGPT


@dataclass
class ImageRequest:
    """A generation request, its classifier-free-guidance twin (or None), the instruction and the task name."""

    request: Request
    unconditional: Request | None
    instruction: str
    task: str | None


@dataclass
class GeneratedImage:
    """A generated image with the VQ codes it was decoded from and how it was made."""

    image: Image.Image
    codes: torch.Tensor  # [grid, grid] raster order
    instruction: str
    task: str | None
    sampling: dict[str, Any] = field(default_factory=dict)


def image_request(
    hg: HealthGPT, image: Image.Image | None, task_or_instruction: str, *, text: str | None, guided: bool
) -> ImageRequest:
    """`HealthGPT.build_image_request`: the checked generation request and, when `guided`, its unconditional twin."""
    if not hg.generates_images:
        raise ValueError(
            f"this {hg.config.name} model cannot generate images: it needs the generation plugin, "
            "the image-token vocabulary and a VQGAN"
        )
    instruction, task = resolve_instruction(task_or_instruction, text)
    check_image_input(task, image is not None)

    def request(shown: Image.Image | None, words: str) -> Request:
        return hg.build_request(
            [{"role": "user", "content": words}],
            [shown] if shown is not None else [],
            plugin=GENERATION,
            image_generation=True,
            max_new_tokens=hg.config.vq.num_image_tokens + 1,
        )

    # The unconditional row drops the condition: the input image, or for text-to-image the text itself.
    unconditional = request(None, instruction if image is not None else UNCONDITIONAL_INSTRUCTION) if guided else None
    return ImageRequest(request(image, instruction), unconditional, instruction, task.name if task else None)


def generate_images(
    hg: HealthGPT,
    images: Sequence[Image.Image | None],
    task_or_instruction: str,
    *,
    text: str | None,
    guidance_scale: float | None,
    progress: bool,
    sampling: Mapping[str, Any],
) -> list[GeneratedImage]:
    """`HealthGPT.generate_image` for a batch: one constrained span per image, decoded by the VQGAN."""
    guidance_scale = hg.resolve_guidance(guidance_scale)
    guided = guidance_scale != 1.0
    built = [image_request(hg, im, task_or_instruction, text=text, guided=guided) for im in images]
    span = hg.config.vq.num_image_tokens
    steps = stream(
        hg.model,
        [b.request for b in built],
        hg.sampling_params({**sampling, "max_new_tokens": span + 1}),
        unconditional=[b.unconditional for b in built] if guided else None,
        guidance_scale=guidance_scale,
        **hg.generation_kwargs(),
    )
    # Tokens stay on the device until the span is complete: the host never waits inside the loop.
    tokens = [
        step.tokens for step in tqdm(steps, total=span + 1, desc="image codes", disable=not progress, leave=False)
    ]
    meta = {**sampling, "guidance_scale": guidance_scale}
    return [
        GeneratedImage(picture, codes, built[0].instruction, built[0].task, meta)
        for picture, codes in decode_image_ids(hg, torch.stack(tokens[:span], dim=1))
    ]


def decode_image_ids(hg: HealthGPT, image_ids: torch.Tensor) -> list[tuple[Image.Image, torch.Tensor]]:
    """Each row of generated image-token ids (B, span) as (picture, its VQ codes (grid, grid) on the CPU)."""
    vocab, vqgan = hg.model.image_vocab, hg.vqgan
    if vocab is None or vqgan is None:
        raise ValueError(f"this {hg.config.name} model has no image-token vocabulary or no VQGAN to decode images")
    codes = vocab.ids_to_codes(image_ids.cpu())  # [B, span]
    with torch.inference_mode():
        pictures = vqgan.codes_to_pil(codes.to(next(vqgan.parameters()).device))
    return [(picture, c.reshape(vqgan.grid, vqgan.grid)) for picture, c in zip(pictures, codes, strict=True)]
