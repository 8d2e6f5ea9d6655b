"""Iteration-level batching over KV-cache slots (continuous batching): a row joins the running batch as soon as a
slot is free and leaves it at the step it ends, so a short question never waits for a long answer or an image.

Each slot is one row of a preallocated cache of `max_len` positions that writes at its own position (transformers'
`StaticCache` writes every row at one shared position, so the layer is ours). Requests that join at one step are
prefilled together (eagerly and left-padded, as `stream` prefills a batch) and their keys and values copied into
their slots; every step then runs one forward
over the slots in use (up to the longest row's length), each row with its own plugin, and decides every row's token
at once through one `DecodeRows` (per-row sampling settings, generators, image-span state and stop rules).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import Cache
from transformers.cache_utils import StaticLayer

from ..model import HealthGPTModel, expand_image_slots
from .decoders import EagerSession
from .loop import DecodeRows, Request, embed_prompts, head_logits
from .sampling import SamplingParams


@dataclass
class Window:
    """The part of the cache one step reads: slots [0, rows) and positions [0, width). Free slots are taken lowest
    first, so running rows stay at the front and a step costs what its rows and their lengths need."""

    rows: int
    width: int


class SlotLayer(StaticLayer):
    """A static cache layer whose rows write one token each at their own position (`positions`, shared by every
    layer of the cache and advanced by the batch) and that returns only the keys and values of `window`."""

    def __init__(self, max_cache_len: int, positions: torch.Tensor, window: Window) -> None:
        super().__init__(max_cache_len)
        self.positions = positions
        self.window = window

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, width = self.window.rows, self.window.width
        index = torch.arange(rows, device=key_states.device)
        self.keys[index, :, self.positions[:rows]] = key_states[:, :, 0]
        self.values[index, :, self.positions[:rows]] = value_states[:, :, 0]
        return self.keys[:rows, :, :width], self.values[:rows, :, :width]


@dataclass(eq=False)
class Row:
    """One running request: its slot (and its guidance twin's), settings and what it produced so far."""

    request: Request
    sampling: SamplingParams
    slot: int
    twin: int | None = None  # the unconditional twin's slot (classifier-free guidance)
    guidance_scale: float = 1.0
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def budget(self) -> int:
        return self.request.max_new_tokens or self.sampling.max_new_tokens

    @property
    def slots(self) -> list[int]:
        """Its slot, and its twin's."""
        return [self.slot] if self.twin is None else [self.slot, self.twin]


@dataclass(frozen=True)
class Admission:
    """A request joining the batch: its prompt (and its unconditional twin for classifier-free guidance), sampling
    settings, and vLLM's `min_tokens` / `ignore_eos` extensions."""

    request: Request
    sampling: SamplingParams
    unconditional: Request | None = None
    guidance_scale: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False

    @property
    def slots(self) -> int:
        """Slots it takes: one, or two with a twin."""
        return 1 if self.unconditional is None else 2


def positions_needed(model: HealthGPTModel, request: Request, unconditional: Request | None, budget: int) -> int:
    """Cache positions a request's longest row needs (prompt with image slots, plus the answer budget)."""
    rows = [r for r in (request, unconditional) if r is not None]
    return max(len(expand_image_slots(r.input_ids, model.num_patches)) for r in rows) + budget


class SlotBatch:
    """The running batch of one model: `slots` rows of at most `max_len` positions each. `admit` prefills requests
    into free slots, `step` advances every running row by one token and frees the slots of rows that ended. Every
    row decides through one `DecodeRows` over all slots (a twin's row there stays empty)."""

    def __init__(
        self, model: HealthGPTModel, slots: int, max_len: int, *, stop_ids: Sequence[int], pad_id: int
    ) -> None:
        self.model = model
        self.slots = slots
        self.max_len = max_len
        param = next(model.llm.parameters())
        self.device = param.device
        cfg = model.llm.config
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)  # next position of each slot
        self.lengths = [0] * slots  # the same, on the host
        self.window = Window(slots, max_len)
        self.cache = Cache(
            layers=[SlotLayer(max_len, self.positions, self.window) for _ in range(cfg.num_hidden_layers)]
        )
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache.early_initialization(slots, cfg.num_key_value_heads, head_dim, param.dtype, self.device)
        self.last = torch.full((slots,), pad_id, dtype=torch.long, device=self.device)  # token each slot feeds next
        self.plugins = [model.plugin_names[0]] * slots
        # looked up once: transformers walks the model for them at every call
        self.decoder, self.embed = model.llm.get_decoder(), model.llm.get_input_embeddings()
        self.head = model.llm.get_output_embeddings()
        self.state = DecodeRows(model, slots, stop_ids, pad_id, self.device)
        self.rows: list[Row] = []
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self._pending: dict[int, torch.Tensor] = {}  # slot -> logits of a just-admitted row's first token

    @property
    def free_slots(self) -> int:
        return len(self._free)

    # ----- joining -------------------------------------------------------------------------------------------
    def _prefill(self, prompts: Sequence[Request]) -> list[int]:
        """Run the prompts as one left-padded batch (as `stream` does; one prompt runs exactly as `HealthGPT.ask`
        runs it), copy each one's keys and values into the lowest free slot and keep its last logits for the next
        step; the slots, in order."""
        plugins, embeds, mask, positions = embed_prompts(self.model, prompts, self.state.pad_id, self.device)
        session = EagerSession(self.model, plugins)
        hidden = session.prefill(embeds, mask, positions)
        logits = head_logits(self.model, hidden, session.selection, False, self.head)  # [P, V]
        assert session.cache is not None
        width = embeds.shape[1]
        slots = [heapq.heappop(self._free) for _ in prompts]
        for i, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
            length = len(expand_image_slots(prompt.input_ids, self.model.num_patches))
            for layer, filled in zip(self.cache.layers, session.cache.layers, strict=True):
                layer.keys[slot, :, :length] = filled.keys[i, :, width - length :]
                layer.values[slot, :, :length] = filled.values[i, :, width - length :]
            self.positions[slot] = self.lengths[slot] = length
            self.plugins[slot] = prompt.plugin
            self._pending[slot] = logits[i]
        return slots

    @torch.inference_mode()
    def admit(self, *joining: Admission) -> list[Row]:
        """Prefill the requests (and their guidance twins) together into free slots; their first tokens come with
        the next `step`. All or none: a request that cannot join raises and none joins."""
        need = sum(a.slots for a in joining)
        if need > len(self._free):
            raise RuntimeError(f"{need} free slot(s) needed, {len(self._free)} free")
        for a in joining:
            budget = a.request.max_new_tokens or a.sampling.max_new_tokens
            longest = positions_needed(self.model, a.request, a.unconditional, budget)
            if longest > self.max_len:
                raise ValueError(f"the prompt and answer need {longest} positions; a slot holds {self.max_len}")
        twins = [a.unconditional for a in joining if a.unconditional is not None]
        slots = iter(self._prefill([*(a.request for a in joining), *twins]))
        rows = [Row(a.request, a.sampling, next(slots), None, a.guidance_scale) for a in joining]
        for a, row in zip(joining, rows, strict=True):
            row.twin = None if a.unconditional is None else next(slots)
            self.state.place(row.slot, a.request, a.sampling, min_tokens=a.min_tokens, ignore_eos=a.ignore_eos)
        self.rows.extend(rows)
        return rows

    # ----- stepping ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def release(self, row: Row) -> None:
        """Free a row's slots now (it ended, was cancelled or timed out)."""
        if row in self.rows:
            self.rows.remove(row)
            self.state.clear(row.slot)
            self._free_slots(row.slots)

    def _free_slots(self, slots: list[int]) -> None:
        for slot in slots:
            self._pending.pop(slot, None)
            self.positions[slot] = self.lengths[slot] = 0
            self.last[slot] = self.state.pad_id
            heapq.heappush(self._free, slot)

    def _forward(self, rows: int, advance: list[int]) -> torch.Tensor:
        """One token for each of the first `rows` slots at its own position; fp32 logits [rows, V]. Only the
        `advance` slots (rows that fed a real token) move on; the others' writes land where their next real token
        will overwrite them."""
        self.window.rows, self.window.width = rows, max(self.lengths[:rows]) + 1
        positions = self.positions[:rows]
        valid = torch.arange(self.window.width, device=self.device)[None] <= positions[:, None]  # [R, W]
        names = self.plugins[:rows]
        plugins = names[0] if len(set(names)) == 1 else tuple(names)
        with self.model.hlora.use(plugins):
            embeds = self.embed(self.last[:rows, None])
            out = self.decoder(
                inputs_embeds=embeds,
                attention_mask=valid[:, None, None, :],
                position_ids=positions[:, None],
                cache=self.cache,
                use_cache=True,
            )
        for slot in advance:
            self.lengths[slot] += 1
        self.positions[advance] += 1
        return head_logits(self.model, out.last_hidden_state[:, -1], plugins, False, self.head)

    def _logits(self) -> torch.Tensor:
        """Raw logits [slots, V] of every running row's next token: from the step's forward, or from its prefill
        for a row that just joined; a guided row's are `twin + scale * (own - twin)`."""
        advance = [s for row in self.rows if row.slot not in self._pending for s in row.slots]
        logits = None
        if advance:
            logits = self._forward(max(s for row in self.rows for s in row.slots) + 1, advance)
        width = (logits if logits is not None else next(iter(self._pending.values()))).shape[-1]
        raw = torch.zeros(self.slots, width, device=self.device)
        if logits is not None:
            raw[: len(logits)] = logits
        for slot, pending in self._pending.items():
            raw[slot] = pending
        self._pending.clear()
        guided = [row for row in self.rows if row.twin is not None]
        if guided:
            own = torch.tensor([row.slot for row in guided], device=self.device)
            twin = torch.tensor([row.twin for row in guided], device=self.device)
            scale = torch.tensor([row.guidance_scale for row in guided], device=self.device)[:, None]
            raw[own] = raw[twin] + scale * (raw[own] - raw[twin])
        return raw

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int]]:
        """Advance every running row by one token: (row, token) pairs; rows that ended are released. One read of
        the device per step, whatever the rows' settings."""
        if not self.rows:
            return []
        token = self.state.pick(self._logits())
        self.state.advance(token)
        self.last.copy_(token)
        for row in self.rows:
            if row.twin is not None:
                self.last[row.twin] = token[row.slot]  # the guided halves see the same token
        tokens, finished = torch.stack((token, self.state.finished.long())).tolist()
        produced = []
        for row in list(self.rows):
            row.tokens.append(tokens[row.slot])
            row.finished = bool(finished[row.slot])
            produced.append((row, tokens[row.slot]))
            if row.finished:
                self.release(row)
        return produced
