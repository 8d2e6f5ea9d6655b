"""The one generation loop every entry point uses: prefill, KV-cached decode, sampling, stop tokens, streaming,
left-padded batches, per-sample plugins and constrained image spans.

Sampling and penalties are transformers' own logits processors; the image-span constraint is a logits processor of
ours (it needs state that follows each row through its span).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .model import HealthGPTModel, expand_image_slots
from .tokens import ImageVocab


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; `temperature == 0` (the default, as published) means greedy."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def processors(self, constraint: LogitsProcessor | None = None) -> LogitsProcessorList:
        """Penalty, then the constraint (before the warpers, so top-k/top-p only see allowed tokens), then the
        temperature/top-k/top-p warpers of transformers."""
        procs = LogitsProcessorList()
        if self.repetition_penalty not in (None, 1.0):
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if constraint is not None:
            procs.append(constraint)
        if not self.greedy:
            procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k is not None:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@dataclass
class Request:
    """One sample: prompt ids with `IMAGE_TOKEN_INDEX` sentinels, its images' pixel values, its plugin.

    `image_span`: the prompt ends with the start-of-image token, so the answer begins inside an image span, and the
    row stops when that span closes. `allow_images`: the row may open an image span in free text (otherwise image
    tokens are banned from its answer, as for every comprehension request)."""

    input_ids: list[int]
    plugin: str
    pixel_values: torch.Tensor | None = None  # [n_images, 3, S, S]
    image_span: bool = False
    allow_images: bool = False
    max_new_tokens: int | None = None  # this row's own budget, at most the batch's SamplingParams.max_new_tokens


@dataclass
class Step:
    """What one decode step produced for every row: the token (pad for finished rows) and its raw logits."""

    tokens: torch.Tensor  # [B]
    active: torch.Tensor  # [B] bool: rows that produced a real token this step
    logits: torch.Tensor | None = None  # [B, V] raw logits before any processor


class ImageSpanConstraint(LogitsProcessor):
    """Inside an image span only code tokens are allowed until exactly `span_length` codes, then the end token is
    forced; outside a span code/end tokens are banned, and the start token only where images may be generated."""

    def __init__(self, vocab: ImageVocab, span_length: int, in_span: torch.Tensor, allow_start: torch.Tensor) -> None:
        self.vocab = vocab
        self.span_length = span_length
        self.in_span = in_span.clone()  # [B] bool
        self.allow_start = allow_start.clone()  # [B] bool
        self.count = torch.zeros_like(in_span, dtype=torch.long)  # codes emitted in the current span
        self.spans_closed = torch.zeros_like(in_span, dtype=torch.long)
        self._masks: tuple[torch.Tensor, torch.Tensor] | None = None

    def _token_masks(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(code tokens, all image tokens) as [V] boolean masks, built once."""
        if self._masks is None:
            v = self.vocab
            code = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            code[v.first_code_id : v.first_code_id + v.num_codes] = True
            image_token = code.clone()
            image_token[[v.start_id, v.end_id, v.newline_id]] = True
            self._masks = (code, image_token)
        return self._masks

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        v = self.vocab
        code, image_token = self._token_masks(scores)
        need_code = self.in_span & (self.count < self.span_length)
        need_end = self.in_span & (self.count >= self.span_length)
        allowed = torch.where(need_code[:, None], code, ~image_token)  # [B, V]
        allowed[need_end] = False
        allowed[need_end, v.end_id] = True
        allowed[~self.in_span & self.allow_start, v.start_id] = True
        return scores.masked_fill(~allowed, float("-inf"))

    def update(self, tokens: torch.Tensor) -> None:
        """Advance each row's span state with the token it just produced."""
        v = self.vocab
        is_code = (tokens >= v.first_code_id) & (tokens < v.first_code_id + v.num_codes)
        closed = self.in_span & (tokens == v.end_id)
        self.count = torch.where(self.in_span & is_code, self.count + 1, self.count)
        self.spans_closed += closed.long()
        opened = ~self.in_span & (tokens == v.start_id)
        self.count = torch.where(closed | opened, torch.zeros_like(self.count), self.count)
        self.in_span = (self.in_span & ~closed) | opened


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


@torch.inference_mode()
def stream(
    model: HealthGPTModel,
    requests: Sequence[Request],
    sampling: SamplingParams,
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    unconditional: Sequence[Request] | None = None,
    guidance_scale: float = 1.0,
    use_cache: bool = True,
    return_logits: bool = False,
) -> Iterator[Step]:
    """Yield one `Step` per generated position for a batch of requests (left-padded, one forward per step).

    Rows stop at a stop token outside an image span (the stop token is yielded), or, for `image_span` requests, when
    their span closes. With an image vocabulary, every span holds exactly `model.image_span_length` codes. With
    `unconditional` requests (one per request), classifier-free guidance runs both in the same batch and samples from
    `uncond + guidance_scale * (cond - uncond)`."""
    if not requests:
        return
    batch = len(requests)
    if unconditional is not None and len(unconditional) != batch:
        raise ValueError(f"{batch} requests but {len(unconditional)} unconditional requests")
    every = [*requests, *(unconditional or [])]
    device = next(model.llm.parameters()).device
    rows = [expand_image_slots(r.input_ids, model.num_patches) for r in every]
    if any(not r for r in rows):
        raise ValueError("empty prompt: every request needs at least one token")
    ids, mask = _left_pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    images = [r.pixel_values for r in every if r.pixel_values is not None and len(r.pixel_values)]
    pixel_values = torch.cat(images).to(device) if images else None
    plugins = model.check_plugins([r.plugin for r in every], len(every))
    # One name for a uniform batch: the wrappers then skip the per-sample gather/scatter.
    selection = plugins[0] if len(set(plugins)) == 1 else plugins

    constraint = None
    stop_after_span = torch.tensor([r.image_span for r in requests], device=device)
    if model.image_vocab is not None and model.image_span_length is not None:
        allow = torch.tensor([r.allow_images for r in requests], device=device)
        constraint = ImageSpanConstraint(model.image_vocab, model.image_span_length, stop_after_span, allow)
    procs = sampling.processors(constraint)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    limits = torch.tensor([r.max_new_tokens or sampling.max_new_tokens for r in requests], device=device)
    generated = torch.empty((batch, 0), dtype=torch.long, device=device)
    embed_tokens = model.llm.get_input_embeddings()

    def forward(inputs: torch.Tensor, pos: torch.Tensor, past: DynamicCache | None):
        # The plugin selection is set per call, so interleaved streams on one model cannot leak into each other.
        with model.hlora.use(selection):
            return model.llm(
                inputs_embeds=inputs,
                attention_mask=mask,
                position_ids=pos,
                cache=past,
                use_cache=use_cache,
                logits_to_keep=1,
            )

    with model.hlora.use(selection):  # embedding tables may be per plugin too (fusion layers)
        embeds = model.embed(ids, pixel_values, plugins)  # [R, T, H], R = B or 2B rows
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [R, T]: left padding does not shift positions
    out = forward(embeds, positions, DynamicCache(config=model.llm.config) if use_cache else None)
    for step in range(sampling.max_new_tokens):
        raw = out.logits[:, -1].float()  # [R, V]
        if unconditional is not None:
            raw = raw[batch:] + guidance_scale * (raw[:batch] - raw[batch:])  # [B, V]
        scores = procs(generated, raw)
        if sampling.greedy:
            token = scores.argmax(dim=-1)
        else:
            token = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)
        token = token.masked_fill(finished, pad_id)  # [B]
        yield Step(tokens=token, active=~finished, logits=raw if return_logits else None)
        done_now = torch.isin(token, stops)
        if constraint is not None:
            was_in_span = constraint.in_span.clone()
            constraint.update(token)
            done_now = (done_now & ~was_in_span) | (stop_after_span & was_in_span & ~constraint.in_span)
        finished |= done_now | (limits <= step + 1)
        if finished.all():
            return
        generated = torch.cat([generated, token[:, None]], dim=1)
        fed = token if unconditional is None else token.repeat(2)  # both halves of a guided batch see the token
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        with model.hlora.use(selection):
            new_embed = embed_tokens(fed[:, None])  # [R, 1, H]
        if use_cache:
            positions = positions[:, -1:] + 1
            out = forward(new_embed, positions, out.cache)
        else:
            embeds = torch.cat([embeds, new_embed], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            out = forward(embeds, positions, None)


def generate(model: HealthGPTModel, requests: Sequence[Request], sampling: SamplingParams, **kwargs) -> list[list[int]]:
    """Run `stream` to the end and return each row's new token ids (stop token included, padding removed)."""
    outputs: list[list[int]] = [[] for _ in requests]
    for step in stream(model, requests, sampling, **kwargs):
        for i in step.active.nonzero().flatten().tolist():
            outputs[i].append(int(step.tokens[i]))
    return outputs
