"""The `HealthGPT` class: loading and saving, prompts and requests, text answers; image generation is `images`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from .. import checkpoints
from ..config import COMPREHENSION, GENERATION, HealthGPTConfig, check_guidance_scale, get_variant
from ..generation import IncrementalDetokenizer, Request, SamplingParams, StaticEngine, generate, stream
from ..model import HealthGPTModel, build_model, expand_image_slots
from ..nano import nano_tokenizer, random_llm, random_vision
from ..quantize import memory_by_part, quantize_base
from ..templates import PromptError, chat_prompt, get_template
from ..tokens import PromptTokenizer
from ..vision import ImagePreprocessor
from ..vqgan import VQGAN
from .images import GeneratedImage, ImageRequest, generate_images, image_request


class PromptTooLongError(PromptError):
    """The prompt plus the answer budget do not fit the model's context."""


class HealthGPT:
    """A loaded HealthGPT: model, tokenizer, preprocessing and chat template, with both plugins resident.

    `enforce_eager` (vLLM's name): True decodes eagerly, False through the compiled static-cache engine, None (the
    default) compiles on a GPU and stays eager on a CPU, where compiling costs more than one answer gains."""

    def __init__(
        self,
        model: HealthGPTModel,
        tokenizer: PreTrainedTokenizerBase,
        config: HealthGPTConfig,
        preprocessor: ImagePreprocessor,
        prompt_tokenizer: PromptTokenizer | None = None,
        vqgan: VQGAN | None = None,
        quantization: str | None = None,
        *,
        enforce_eager: bool | None = None,
    ) -> None:
        self.quantization = quantization  # how the base LLM's linears are stored: None, "int8", "int4" or "nf4"
        self.enforce_eager = enforce_eager
        self._engine: StaticEngine | None = None
        self.vqgan = vqgan.eval() if vqgan is not None else None
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.preprocessor = preprocessor
        self.prompts = prompt_tokenizer or PromptTokenizer(tokenizer)
        self.template = get_template(config.template)

    @classmethod
    def random(
        cls,
        variant: str | HealthGPTConfig = "nano",
        *,
        seed: int = 0,
        quantize: str | None = None,
        enforce_eager: bool | None = None,
    ) -> HealthGPT:
        """An untrained model of the real architecture with random weights (tests, demos, benchmarks); `quantize`
        and `enforce_eager` as in `from_pretrained`."""
        config = get_variant(variant) if isinstance(variant, str) else variant
        tokenizer = nano_tokenizer(config.llm.vocab_rows, config.template)
        stops = tokenizer.convert_tokens_to_ids(list(get_template(config.template).stop_strings))
        llm = random_llm(
            config.llm, len(tokenizer), seed=seed, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(set(stops))
        )
        vision = random_vision(config.vision, seed=seed + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            model = build_model(config, llm, vision, tokenizer)
        pre = ImagePreprocessor.for_clip(config.vision.image_size, config.vision.image_mean, config.vision.image_std)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 3)
            vqgan = VQGAN.from_config(config.vq) if config.add_image_tokens else None
        quantize_base(model, quantize)
        return cls(model, tokenizer, config, pre, vqgan=vqgan, quantization=quantize, enforce_eager=enforce_eager)

    @classmethod
    def from_pretrained(
        cls, source: str | Path | HealthGPTConfig | None = None, *, enforce_eager: bool | None = None, **kwargs: Any
    ) -> HealthGPT:
        """Load our bundle or the official release (local folders, a variant name or a Hub id such as
        `lintw/HealthGPT-M3`), strictly; other arguments as `healthgpt.checkpoints.load` (`quantize="int8"|"int4"|
        "nf4"` stores the base LLM's linears weight-only in that format)."""
        parts = checkpoints.load(source, **kwargs)
        return cls(
            parts.model,
            parts.tokenizer,
            parts.config,
            parts.preprocessor,
            parts.prompts,
            vqgan=parts.vqgan,
            quantization=kwargs.get("quantize"),
            enforce_eager=enforce_eager,
        )

    def save_pretrained(self, directory: str | Path, *, include_base: bool = False) -> Path:
        """Write this model as a bundle (base LLM and CLIP by reference, or included); see `checkpoints.save_bundle`."""
        return checkpoints.save_bundle(
            directory,
            self.model,
            self.tokenizer,
            self.config,
            self.preprocessor,
            vqgan=self.vqgan,
            include_base=include_base,
        )

    # ----- prompts -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def memory(self) -> dict[str, int]:
        """Bytes of the model by part: base LLM, plugins (H-LoRA, projectors, plugin tables), vision, VQGAN."""
        return memory_by_part(self.model, self.vqgan)

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> HealthGPT:
        """Move the model and VQGAN to `device` and cast the model's floating weights to `dtype`; returns self."""
        if self.quantization is not None and (dtype is not None or torch.device(device or self.device) != self.device):
            raise ValueError(
                f"the base LLM is quantized ({self.quantization}), and quantized weights are laid out for their "
                "device: choose device and dtype when loading (device=..., dtype=...), not afterwards"
            )
        self.model.to(device=device, dtype=None if dtype is None else checkpoints.resolve_dtype(dtype))
        self._engine = None  # compiled for the old device and dtype
        if self.vqgan is not None:
            self.vqgan.to(device=device)
        return self

    @property
    def stop_ids(self) -> list[int]:
        """The base model's eos ids plus the template's stop tokens."""
        eos = self.model.llm.generation_config.eos_token_id
        ids = set([eos] if isinstance(eos, int) else (eos or []))
        unk = self.tokenizer.unk_token_id
        for s in self.template.stop_strings:
            tid = self.tokenizer.convert_tokens_to_ids(s)
            if tid is not None and tid != unk:
                ids.add(tid)
        return sorted(ids)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.stop_ids[0]

    @property
    def context_length(self) -> int:
        """Positions the base LLM attends over: prompt (image slots expanded) plus answer."""
        return self.model.llm.config.max_position_embeddings

    def prompt_length(self, request: Request) -> int:
        """Positions `request`'s prompt takes, each image slot expanded to its patches."""
        return len(expand_image_slots(request.input_ids, self.model.num_patches))

    def build_request(
        self,
        messages: Sequence[Mapping[str, str]],
        images: Sequence[Image.Image] = (),
        *,
        plugin: str = COMPREHENSION,
        system: str | None = None,
        image_generation: bool = False,
        max_new_tokens: int = 0,
    ) -> Request:
        """Token ids (with image slots) and pixel values for one conversation whose first user turn shows `images`."""
        if not messages or not str(messages[-1].get("content", "")).strip():
            raise PromptError("the question is empty: give a non-empty question or instruction")
        prompt = chat_prompt(
            self.template,
            messages,
            num_images=len(images),
            system=system or self.config.system_prompt,
            image_generation=image_generation,
            images_after_text=self.config.images_after_text,
        )
        ids = self.prompts.encode_prompt(prompt)
        limit, length = self.context_length, len(expand_image_slots(ids, self.model.num_patches))
        if length + max_new_tokens > limit:
            raise PromptTooLongError(
                f"the prompt is {length} tokens and the answer may take {max_new_tokens} more, but the model's context "
                f"is {limit} tokens: shorten the question or the conversation, or lower max_new_tokens"
            )
        pixels = self.preprocessor(images) if images else None
        return Request(input_ids=ids, plugin=plugin, pixel_values=pixels, image_span=image_generation)

    def _decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, cut at the first stop token (never by dropping a fixed number of characters)."""
        stops = set(self.stop_ids)
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode(list(ids[:cut]), skip_special_tokens=True).strip()

    @property
    def compiled(self) -> bool:
        """Whether decoding runs on the compiled static-cache engine (see `enforce_eager`)."""
        return self.device.type == "cuda" if self.enforce_eager is None else not self.enforce_eager

    def generation_kwargs(self) -> dict[str, Any]:
        """Stop and pad ids and, when compiled, the engine (built once per device)."""
        if self.compiled and self._engine is None:
            self._engine = StaticEngine(self.model)
        return dict(stop_ids=self.stop_ids, pad_id=self.pad_id, engine=self._engine if self.compiled else None)

    def sampling_params(self, sampling: Mapping[str, Any]) -> SamplingParams:
        """Decoding settings: the caller's, over the published defaults (greedy, with the base model's
        `generation_config.repetition_penalty` where it sets one, as the published scripts leave it: 1.05 for
        XL32)."""
        penalty = getattr(self.model.llm.generation_config, "repetition_penalty", None)
        defaults = {} if penalty in (None, 1.0) else {"repetition_penalty": penalty}
        return SamplingParams(**{**defaults, **sampling})

    def resolve_guidance(self, scale: float | None) -> float:
        """The classifier-free guidance scale image generation runs with: `scale`, checked (finite, above 0; 1 is
        none), or where it is None this model's default (`config.guidance_scale`, what its training supports)."""
        return self.config.guidance_scale if scale is None else check_guidance_scale(scale, "guidance_scale")

    # ----- public API ----------------------------------------------------------------------------------------
    def ask(
        self,
        image: Image.Image | None | Sequence[Image.Image | None],
        question: str | Sequence[str],
        *,
        system: str | None = None,
        **sampling: Any,
    ) -> str | list[str]:
        """Answer a question about an image (or text alone with `image=None`); a list of questions and/or images gives
        a batched call and a list of answers (a single image or question is shared by every row)."""
        batched, conversations, images = _single_turns(image, question)
        answers = self.chat(conversations, images, system=system, **sampling)
        return answers if batched else answers[0]

    def stream(
        self,
        image: Image.Image | None | Sequence[Image.Image | None],
        question: str | Sequence[str],
        *,
        system: str | None = None,
        **sampling: Any,
    ) -> Iterator[str] | Iterator[tuple[int, str]]:
        """Yield the answer's text as it is generated; a batch (lists, as in `ask`) yields `(row, text)` pairs."""
        batched, conversations, images = _single_turns(image, question)
        pieces = self.stream_chat(conversations, images, system=system, **sampling)
        return pieces if batched else (piece for _, piece in pieces)

    @torch.inference_mode()
    def chat(
        self,
        messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
        image: Image.Image | None | Sequence[Image.Image | None] = None,
        *,
        system: str | None = None,
        **sampling: Any,
    ) -> str | list[str]:
        """Answer the last user message of a multi-turn conversation; `image` belongs to the first user turn.
        A list of conversations (with one shared image or a list of one per conversation) gives a list of replies."""
        batched, requests, params = self._chat_requests(messages, image, system, sampling)
        replies = self._replies(requests, params)
        return replies if batched else replies[0]

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
        image: Image.Image | None | Sequence[Image.Image | None] = None,
        *,
        system: str | None = None,
        **sampling: Any,
    ) -> Iterator[str] | Iterator[tuple[int, str]]:
        """Stream the reply to a conversation, text piece by text piece; a list of conversations yields
        `(row, text)` pairs. The pieces of a row join to its `chat` reply (before stripping)."""
        batched, requests, params = self._chat_requests(messages, image, system, sampling)
        pieces = self._pieces(requests, params)
        return pieces if batched else (piece for _, piece in pieces)

    def _chat_requests(
        self,
        messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
        image: Image.Image | None | Sequence[Image.Image | None],
        system: str | None,
        sampling: Mapping[str, Any],
    ) -> tuple[bool, list[Request], SamplingParams]:
        """(batched, one request per conversation, sampling); checks every row before anything runs."""
        batched = bool(messages) and not isinstance(messages[0], Mapping)
        conversations = list(messages) if batched else [messages]
        rows = [
            (c, [im] if im is not None else [])
            for c, im in zip(conversations, _per_row(image, len(conversations)), strict=True)
        ]
        requests, params = self._requests(rows, system, sampling)
        return batched, requests, params

    def _requests(
        self,
        rows: Sequence[tuple[Sequence[Mapping[str, str]], Sequence[Image.Image]]],
        system: str | None,
        sampling: Mapping[str, Any],
    ) -> tuple[list[Request], SamplingParams]:
        """One comprehension request per (conversation, images of its first turn), and the sampling settings."""
        params = self.sampling_params(sampling)
        requests = [
            self.build_request(c, list(ims), system=system, max_new_tokens=params.max_new_tokens) for c, ims in rows
        ]
        return requests, params

    def _replies(self, requests: Sequence[Request], params: SamplingParams) -> list[str]:
        return [self._decode(ids) for ids in generate(self.model, requests, params, **self.generation_kwargs())]

    @torch.inference_mode()
    def _pieces(self, requests: Sequence[Request], params: SamplingParams) -> Iterator[tuple[int, str]]:
        """(row, new text) as each row's reply grows (one incremental detokenizer per row); text held back for an
        incomplete character is flushed at the end, so a row's pieces join to the decoded reply."""
        stops = set(self.stop_ids)
        rows = [IncrementalDetokenizer(self.tokenizer) for _ in requests]
        for step in stream(self.model, requests, params, **self.generation_kwargs()):
            for row in step.active.nonzero().flatten().tolist():
                token = int(step.tokens[row])
                if token not in stops and (text := rows[row].push(token)):  # a stop token is the row's last step
                    yield row, text
        for row, detokenizer in enumerate(rows):
            if text := detokenizer.flush():
                yield row, text

    @property
    def generates_images(self) -> bool:
        """Whether this model can generate images: a generation plugin, the image-token vocabulary and a VQGAN."""
        return self.vqgan is not None and self.model.image_vocab is not None and GENERATION in self.model.plugin_names

    def build_image_request(
        self, image: Image.Image | None, task_or_instruction: str, *, text: str | None = None, guided: bool = False
    ) -> ImageRequest:
        """The generation request for one image (None: text to image), with its unconditional twin when `guided`
        (classifier-free guidance). Checks that this model can generate images and that the task gets its input."""
        return image_request(self, image, task_or_instruction, text=text, guided=guided)

    @torch.inference_mode()
    def generate_image(
        self,
        image: Image.Image | None | Sequence[Image.Image | None],
        task_or_instruction: str = "reconstruct",
        *,
        text: str | None = None,
        guidance_scale: float | None = None,
        progress: bool = True,
        **sampling: Any,
    ) -> GeneratedImage | list[GeneratedImage]:
        """Generate an image with the generation plugin: a task name (`reconstruct`, `ct2mri`, `mri2ct`,
        `super_resolution`, `report_to_cxr` with `text=` the report) or a free instruction. A list of images gives a
        batch. The span is constrained to exactly the VQ grid's codes, then decoded by the VQGAN.

        `guidance_scale` (> 1) turns on classifier-free guidance against the same instruction without the image (or,
        for text to image, without the text); None uses the model's own default (`config.guidance_scale`)."""
        batched = isinstance(image, (list, tuple))
        results = generate_images(
            self,
            list(image) if batched else [image],
            task_or_instruction,
            text=text,
            guidance_scale=guidance_scale,
            progress=progress,
            sampling=sampling,
        )
        return results if batched else results[0]

    @torch.inference_mode()
    def answer(
        self,
        items: Sequence[tuple[Sequence[Image.Image], str]],
        *,
        system: str | None = None,
        **sampling: Any,
    ) -> list[str]:
        """Batched answers to `(images, question)` pairs where each question may show several images (all in its
        turn, in order): the general path behind benchmark harnesses."""
        requests, params = self._requests(
            [([{"role": "user", "content": q}], ims) for ims, q in items], system, sampling
        )
        return self._replies(requests, params)

    @torch.inference_mode()
    def log_likelihood(
        self, images: Sequence[Image.Image], context: str, continuation: str, *, system: str | None = None
    ) -> tuple[float, bool]:
        """(log-probability of `continuation` as the assistant's reply to `context`, whether greedy decoding would
        produce exactly it): the scoring primitive of multiple-choice harnesses."""
        request = self.build_request([{"role": "user", "content": context}], list(images), system=system)
        target = self.prompts.encode_text(continuation)
        if not target:
            raise PromptError("the continuation is empty: nothing to score")
        ids = expand_image_slots(request.input_ids, self.model.num_patches) + target
        pixels = None if request.pixel_values is None else request.pixel_values.to(self.device)
        out = self.model(torch.tensor([ids], device=self.device), COMPREHENSION, pixel_values=pixels)
        logits = out.logits[0, -len(target) - 1 : -1].float()  # the positions that predict each continuation token
        logprobs = logits.log_softmax(-1)
        wanted = torch.tensor(target, device=logprobs.device)
        total = logprobs.gather(-1, wanted[:, None]).sum().item()
        return total, bool((logits.argmax(-1) == wanted).all())


def _per_row(image: Image.Image | None | Sequence[Image.Image | None], rows: int) -> list[Image.Image | None]:
    """One image per row: a list must have one entry per row; a single image (or None) is shared by every row."""
    if not isinstance(image, (list, tuple)):
        return [image] * rows
    if len(image) != rows:
        raise ValueError(f"{len(image)} images for {rows} questions or conversations: give one image per row")
    return list(image)


def _single_turns(
    image: Image.Image | None | Sequence[Image.Image | None], question: str | Sequence[str]
) -> tuple[bool, list[list[dict[str, str]]], list[Image.Image | None]]:
    """(batched, one single-turn conversation per row, one image per row) for `ask` and `stream`."""
    many_images = isinstance(image, (list, tuple))
    if isinstance(question, str):
        questions = [question] * (len(image) if many_images else 1)
    else:
        questions = list(question)
    conversations = [[{"role": "user", "content": q}] for q in questions]
    return many_images or not isinstance(question, str), conversations, _per_row(image, len(questions))
