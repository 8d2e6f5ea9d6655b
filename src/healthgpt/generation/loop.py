"""The one generation loop every entry point uses: prefill, KV-cached decode (eager or compiled, see `decoders`),
sampling, stop tokens, streaming, left-padded batches, per-sample plugins, constrained image spans and guidance."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MinNewTokensLengthLogitsProcessor

from ..model import HealthGPTModel, expand_image_slots
from .decoders import EagerSession, StaticEngine, StaticSession
from .sampling import SamplingParams
from .spans import ImageSpanConstraint


@dataclass(frozen=True)
class Request:
    """One sample: prompt ids with `IMAGE_TOKEN_INDEX` sentinels, its images' pixel values, its plugin.

    `image_span`: the prompt ends with the start-of-image token, so the answer begins inside an image span, and the
    row stops when that span closes. `allow_images`: the row may open an image span in free text (otherwise image
    tokens are banned from its answer, as for every comprehension request). Immutable: one request may feed several
    jobs (the server's `n` images), so a changed copy is made with `dataclasses.replace`."""

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


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask [B, T] of rows padded on the left (answers then start at the same column)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def head_logits(
    model: HealthGPTModel, hidden: torch.Tensor, plugin: str, codes_only: bool, head: nn.Module | None = None
) -> torch.Tensor:
    """fp32 logits [R, V] of the last hidden states. With `codes_only` (every row must emit a code) only the code
    rows of the head are read and the other columns are -inf, which the span constraint would impose anyway. A loop
    passes the `head` it looked up once (transformers' `get_output_embeddings` walks the model at every call)."""
    head = head if head is not None else model.llm.get_output_embeddings()
    if not codes_only:
        with model.hlora.use(plugin):
            return head(hidden).float()
    tables = getattr(head, "tables", {})
    weight = tables[plugin] if plugin in tables else head.weight
    v = model.image_vocab
    codes = slice(v.first_code_id, v.first_code_id + v.num_codes)
    out = torch.full((hidden.shape[0], weight.shape[0]), float("-inf"), device=hidden.device)
    out[:, codes] = F.linear(hidden, weight[codes]).float()
    return out


@dataclass
class DecodeRows:
    """Per-row decoding state: processors (with the span constraint), generator, stop rules, what was generated.
    One per `stream` run, and one per row of a continuous batch (`slots`), so both decide alike."""

    sampling: SamplingParams
    constraint: ImageSpanConstraint | None
    stop_after_span: torch.Tensor  # [B] bool: image-span rows end when their span closes
    stops: torch.Tensor
    limits: torch.Tensor  # [B] each row's token budget
    pad_id: int
    generator: torch.Generator | None
    finished: torch.Tensor  # [B] bool
    generated: torch.Tensor  # [B, t]
    min_tokens: int = 0  # stop tokens are suppressed before this many tokens
    ignore_eos: bool = False  # stop tokens do not end a row

    def __post_init__(self) -> None:
        self.processors = self.sampling.processors(self.constraint)
        if self.min_tokens:
            stops = self.stops.tolist()
            self.processors.insert(0, MinNewTokensLengthLogitsProcessor(0, self.min_tokens, stops, self.stops.device))

    @classmethod
    def build(
        cls,
        model: HealthGPTModel,
        requests: Sequence[Request],
        sampling: SamplingParams,
        stop_ids: Sequence[int],
        pad_id: int,
        device: torch.device,
        **extra: int | bool,
    ) -> DecodeRows:
        """State for `requests`; `extra`: `min_tokens`, `ignore_eos`."""
        stop_after_span = torch.tensor([r.image_span for r in requests], device=device)
        constraint = None
        if model.image_vocab is not None and model.image_span_length is not None:
            allow = torch.tensor([r.allow_images for r in requests], device=device)
            constraint = ImageSpanConstraint(model.image_vocab, model.image_span_length, stop_after_span, allow)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        return cls(
            sampling,
            constraint,
            stop_after_span,
            torch.tensor(list(stop_ids), dtype=torch.long, device=device),
            torch.tensor([r.max_new_tokens or sampling.max_new_tokens for r in requests], device=device),
            pad_id,
            generator,
            torch.zeros(len(requests), dtype=torch.bool, device=device),
            torch.empty((len(requests), 0), dtype=torch.long, device=device),
            **extra,
        )

    def pick(self, raw: torch.Tensor) -> torch.Tensor:
        """Each row's next token from its raw logits [B, V] (pad for finished rows)."""
        scores = raw
        for processor in self.processors:  # not LogitsProcessorList.__call__: it inspects signatures at every step
            scores = processor(self.generated, scores)
        if self.sampling.greedy:
            token = scores.argmax(dim=-1)
        else:
            token = torch.multinomial(scores.softmax(dim=-1), 1, generator=self.generator).squeeze(-1)
        return token.masked_fill(self.finished, self.pad_id)

    def advance(self, token: torch.Tensor, step: int) -> None:
        """Record the step's tokens and which rows ended with them."""
        done_now = torch.isin(token, self.stops) & (not self.ignore_eos)
        if self.constraint is not None:
            was_in_span = self.constraint.in_span
            closed = self.constraint.update(token)
            done_now = (done_now & ~was_in_span) | (self.stop_after_span & closed)
        self.finished = self.finished | done_now | (self.limits <= step + 1)
        self.generated = torch.cat([self.generated, token[:, None]], dim=1)


def _prompts(
    model: HealthGPTModel, every: Sequence[Request], pad_id: int, device: torch.device
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(plugins, embeddings [R, T, H], mask [R, T], positions [R, T]) of left-padded prompts with their images."""
    rows = [expand_image_slots(r.input_ids, model.num_patches) for r in every]
    if any(not r for r in rows):
        raise ValueError("empty prompt: every request needs at least one token")
    ids, mask = left_pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    images = [r.pixel_values for r in every if r.pixel_values is not None and len(r.pixel_values)]
    pixel_values = torch.cat(images).to(device) if images else None
    plugins = model.check_plugins([r.plugin for r in every], len(every))
    with model.hlora.use(plugins[0] if len(set(plugins)) == 1 else plugins):  # embedding tables may be per plugin
        embeds = model.embed(ids, pixel_values, plugins)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
    return plugins, embeds, mask, positions


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
    engine: StaticEngine | None = None,
) -> Iterator[Step]:
    """Yield one `Step` per generated position for a batch of requests (left-padded, one forward per step).

    Rows stop at a stop token outside an image span (the stop token is yielded), or, for `image_span` requests, when
    their span closes. With an image vocabulary, every span holds exactly `model.image_span_length` codes. With
    `unconditional` requests (one per request), classifier-free guidance runs both in the same batch and samples from
    `uncond + guidance_scale * (cond - uncond)`. With an `engine`, decode steps run compiled on a static cache.

    On a GPU the host reads the stop state every 8 steps only (finished rows meanwhile emit padding), so the device
    never waits for the host inside a run."""
    if not requests:
        return
    batch = len(requests)
    if unconditional is not None and len(unconditional) != batch:
        raise ValueError(f"{batch} requests but {len(unconditional)} unconditional requests")
    every = [*requests, *(unconditional or [])]
    device = next(model.llm.parameters()).device
    plugins, embeds, mask, positions = _prompts(model, every, pad_id, device)
    selection = plugins[0] if len(set(plugins)) == 1 else plugins
    rows = DecodeRows.build(model, requests, sampling, stop_ids, pad_id, device)
    # Rows that all start inside a span emit only codes for a span's length: the head reads the code rows only.
    all_codes = isinstance(selection, str) and all(r.image_span for r in every) and not return_logits
    codes_steps = (model.image_span_length or 0) if all_codes and rows.constraint is not None else 0
    check_every = 1 if device.type == "cpu" else 8
    if engine is not None:
        session: EagerSession | StaticSession = StaticSession(engine, plugins, sampling.max_new_tokens)
    else:
        session = EagerSession(model, plugins, use_cache)
    try:
        hidden = session.prefill(embeds, mask, positions)
        head = model.llm.get_output_embeddings()
        for step in range(sampling.max_new_tokens):
            raw = head_logits(model, hidden, selection, step < codes_steps, head)  # [R, V]
            if unconditional is not None:
                raw = raw[batch:] + guidance_scale * (raw[:batch] - raw[batch:])  # [B, V]
            token = rows.pick(raw)
            yield Step(tokens=token, active=~rows.finished, logits=raw if return_logits else None)
            rows.advance(token, step)
            if step + 1 == sampling.max_new_tokens or ((step + 1) % check_every == 0 and bool(rows.finished.all())):
                return
            hidden = session.step(token if unconditional is None else token.repeat(2))  # guided halves see it
    finally:
        session.close()


def generate(model: HealthGPTModel, requests: Sequence[Request], sampling: SamplingParams, **kwargs) -> list[list[int]]:
    """Run `stream` to the end and return each row's new token ids (stop token included, padding removed); the
    tokens stay on the device until the end, so the host reads them once."""
    tokens: list[torch.Tensor] = []
    active: list[torch.Tensor] = []
    for step in stream(model, requests, sampling, **kwargs):
        tokens.append(step.tokens)
        active.append(step.active)
    if not tokens:
        return [[] for _ in requests]
    rows = torch.stack(tokens, dim=1).tolist()
    keep = torch.stack(active, dim=1).tolist()
    return [[t for t, k in zip(r, m, strict=True) if k] for r, m in zip(rows, keep, strict=True)]
