"""The one generation loop every entry point uses: prefill, KV-cached decode (eager or compiled, see `decoders`),
sampling, stop tokens, streaming, left-padded batches, per-sample plugins, constrained image spans and guidance."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import HealthGPTModel, expand_image_slots
from .decoders import EagerSession, StaticEngine, StaticSession
from .sampling import SamplingParams
from .spans import ImageSpanConstraint


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


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask [B, T] of rows padded on the left (answers then start at the same column)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def head_logits(model: HealthGPTModel, hidden: torch.Tensor, plugin: str, codes_only: bool) -> torch.Tensor:
    """fp32 logits [R, V] of the last hidden states. With `codes_only` (every row must emit a code) only the code
    rows of the head are read and the other columns are -inf, which the span constraint would impose anyway."""
    head = model.llm.get_output_embeddings()
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
    rows = [expand_image_slots(r.input_ids, model.num_patches) for r in every]
    if any(not r for r in rows):
        raise ValueError("empty prompt: every request needs at least one token")
    ids, mask = left_pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    images = [r.pixel_values for r in every if r.pixel_values is not None and len(r.pixel_values)]
    pixel_values = torch.cat(images).to(device) if images else None
    plugins = model.check_plugins([r.plugin for r in every], len(every))
    uniform = len(set(plugins)) == 1

    constraint = None
    stop_after_span = torch.tensor([r.image_span for r in requests], device=device)
    span_length = model.image_span_length if model.image_vocab is not None else None
    if span_length is not None:
        allow = torch.tensor([r.allow_images for r in requests], device=device)
        constraint = ImageSpanConstraint(model.image_vocab, span_length, stop_after_span, allow)
    # Rows that all start inside a span emit only codes for `span_length` steps: the head reads the code rows only.
    codes_steps = span_length if span_length and uniform and all(r.image_span for r in every) else 0
    procs = sampling.processors(constraint)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    limits = torch.tensor([r.max_new_tokens or sampling.max_new_tokens for r in requests], device=device)
    generated = torch.empty((batch, 0), dtype=torch.long, device=device)
    check_every = 1 if device.type == "cpu" else 8

    with model.hlora.use(plugins[0] if uniform else plugins):  # embedding tables may be per plugin (fusion layers)
        embeds = model.embed(ids, pixel_values, plugins)  # [R, T, H], R = B or 2B rows
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [R, T]: left padding does not shift positions
    if engine is not None:
        session: EagerSession | StaticSession = StaticSession(engine, plugins, sampling.max_new_tokens)
    else:
        session = EagerSession(model, plugins, use_cache)
    try:
        hidden = session.prefill(embeds, mask, positions)
        for step in range(sampling.max_new_tokens):
            codes_only = step < codes_steps and not return_logits
            raw = head_logits(model, hidden, plugins[0] if uniform else plugins, codes_only)  # [R, V]
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
                was_in_span = constraint.in_span
                closed = constraint.update(token)
                done_now = (done_now & ~was_in_span) | (stop_after_span & closed)
            finished = finished | done_now | (limits <= step + 1)
            if step + 1 == sampling.max_new_tokens or ((step + 1) % check_every == 0 and bool(finished.all())):
                return
            generated = torch.cat([generated, token[:, None]], dim=1)
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
