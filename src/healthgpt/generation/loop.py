"""The one generation loop every entry point uses: prefill, KV-cached decode (eager or compiled, see `decoders`),
sampling, stop tokens, streaming, left-padded batches, per-sample plugins, constrained image spans and guidance."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import HealthGPTModel, expand_image_slots
from .decoders import EagerSession, StaticEngine, StaticSession
from .sampling import RowSampling, SamplingParams
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


class DecodeRows:
    """Per-row decoding state as tensors [rows]: sampling settings, span constraint, stop rules, token counts.
    One per `stream` run, and one over all slots of a continuous batch (`slots`), whose rows join with `place` and
    leave with `clear`; either way every row decides alike, whatever its neighbours' settings."""

    def __init__(
        self, model: HealthGPTModel, rows: int, stop_ids: Sequence[int], pad_id: int, device: torch.device
    ) -> None:
        self.pad_id = pad_id
        self.sampling = RowSampling(rows, device)
        self.constraint: ImageSpanConstraint | None = None
        if model.image_vocab is not None and model.image_span_length is not None:
            no = torch.zeros(rows, dtype=torch.bool, device=device)
            self.constraint = ImageSpanConstraint(model.image_vocab, model.image_span_length, no, no)
        self.stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        self.stop_after_span = torch.zeros(rows, dtype=torch.bool, device=device)  # image-span rows end with it
        self.limits = torch.zeros(rows, dtype=torch.long, device=device)  # each row's token budget
        self.min_tokens = torch.zeros(rows, dtype=torch.long, device=device)  # stop tokens suppressed before this
        self.ignore_eos = torch.zeros(rows, dtype=torch.bool, device=device)  # stop tokens do not end the row
        self.count = torch.zeros(rows, dtype=torch.long, device=device)  # tokens generated
        self.finished = torch.ones(rows, dtype=torch.bool, device=device)  # empty rows count as finished
        # [rows, V] bool: tokens each row generated, kept from the first step a row has a repetition penalty (a row
        # placed later starts its own afresh), so runs without one spend nothing on it
        self.seen: torch.Tensor | None = None
        self._rows = torch.arange(rows, device=device)
        self._any_min_tokens = False  # on the host, so rows without `min_tokens` skip its mask

    @classmethod
    def build(
        cls,
        model: HealthGPTModel,
        requests: Sequence[Request],
        sampling: SamplingParams,
        stop_ids: Sequence[int],
        pad_id: int,
        device: torch.device,
    ) -> DecodeRows:
        """State for `requests`, all with the settings `sampling`."""
        rows = cls(model, len(requests), stop_ids, pad_id, device)
        for i, request in enumerate(requests):
            rows.place(i, request, sampling)
        return rows

    def place(
        self, row: int, request: Request, sampling: SamplingParams, *, min_tokens: int = 0, ignore_eos: bool = False
    ) -> None:
        """Start `row` afresh for `request` with its settings; `min_tokens` and `ignore_eos` are vLLM's extensions."""
        self.sampling.set(row, sampling)
        if self.constraint is not None:
            self.constraint.in_span[row] = request.image_span
            self.constraint.allow_start[row] = request.allow_images
            self.constraint.count[row] = 0
        self.stop_after_span[row] = request.image_span
        self.limits[row] = request.max_new_tokens or sampling.max_new_tokens
        self.min_tokens[row] = min_tokens
        self._any_min_tokens = self._any_min_tokens or min_tokens > 0
        self.ignore_eos[row] = ignore_eos
        self.count[row] = 0
        self.finished[row] = False
        if self.seen is not None:
            self.seen[row] = False

    def clear(self, row: int) -> None:
        """End `row` (its slot was freed): it emits padding until placed again."""
        self.sampling.clear(row)
        self.finished[row] = True

    def pick(self, raw: torch.Tensor) -> torch.Tensor:
        """Each row's next token from its raw logits [B, V] (pad for finished rows): stop tokens banned below
        `min_tokens`, repetition penalty, span constraint, then greedy or sampled choice."""
        scores = raw
        if self._any_min_tokens:
            is_stop = torch.zeros(raw.shape[-1], dtype=torch.bool, device=raw.device)
            is_stop[self.stops] = True
            scores = scores.masked_fill((self.count < self.min_tokens)[:, None] & is_stop, float("-inf"))
        if self.sampling.penalizes:
            if self.seen is None:
                self.seen = torch.zeros(raw.shape, dtype=torch.bool, device=raw.device)
            scores = self.sampling.penalize(scores, self.seen)
        if self.constraint is not None:
            scores = self.constraint(None, scores)
        return self.sampling.choose(scores).masked_fill(self.finished, self.pad_id)

    def advance(self, token: torch.Tensor) -> None:
        """Record the step's tokens [B] and which rows ended with them."""
        live = ~self.finished
        done_now = torch.isin(token, self.stops) & ~self.ignore_eos
        if self.constraint is not None:
            was_in_span = self.constraint.in_span
            closed = self.constraint.update(token)
            done_now = (done_now & ~was_in_span) | (self.stop_after_span & closed)
        if self.seen is not None:
            self.seen[self._rows, token] |= live
        self.count += live.long()
        self.finished = self.finished | done_now | (self.limits <= self.count)


def embed_prompts(
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
    plugins, embeds, mask, positions = embed_prompts(model, every, pad_id, device)
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
            rows.advance(token)
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
