"""Iteration-level batching over KV-cache slots (continuous batching): a row joins the running batch as soon as a
slot is free and leaves it at the step it ends, so a short question never waits for a long answer or an image.

Each slot is one row of a preallocated cache of `max_len` positions that writes at its own position (transformers'
`StaticCache` writes every row at one shared position, so the layer is ours). A new request is prefilled alone
(eagerly, as `HealthGPT.ask` does) and its keys and values copied into its slot; every step then runs one forward
over all slots, each with its own plugin, sampling settings, generator, image-span state and stop rules.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import StaticLayer

from ..model import HealthGPTModel, expand_image_slots
from .loop import DecodeRows, Request, head_logits
from .sampling import SamplingParams


class SlotLayer(StaticLayer):
    """A static cache layer whose rows write one token each at their own position (`positions`, shared by every
    layer of the cache and advanced by the batch)."""

    def __init__(self, max_cache_len: int, positions: torch.Tensor) -> None:
        super().__init__(max_cache_len)
        self.positions = positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows = torch.arange(key_states.shape[0], device=key_states.device)
        self.keys[rows, :, self.positions] = key_states[:, :, 0]
        self.values[rows, :, self.positions] = value_states[:, :, 0]
        return self.keys, self.values


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


def positions_needed(model: HealthGPTModel, request: Request, unconditional: Request | None, budget: int) -> int:
    """Cache positions a request's longest row needs (prompt with image slots, plus the answer budget)."""
    rows = [r for r in (request, unconditional) if r is not None]
    return max(len(expand_image_slots(r.input_ids, model.num_patches)) for r in rows) + budget


class SlotBatch:
    """The running batch of one model: `slots` rows of at most `max_len` positions each. `admit` prefills a request
    into free slots, `step` advances every running row by one token and frees the slots of rows that ended."""

    def __init__(
        self, model: HealthGPTModel, slots: int, max_len: int, *, stop_ids: Sequence[int], pad_id: int
    ) -> None:
        self.model = model
        self.slots = slots
        self.max_len = max_len
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        param = next(model.llm.parameters())
        self.device = param.device
        cfg = model.llm.config
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)  # next position of each slot
        self.cache = Cache(layers=[SlotLayer(max_len, self.positions) for _ in range(cfg.num_hidden_layers)])
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache.early_initialization(slots, cfg.num_key_value_heads, head_dim, param.dtype, self.device)
        self.last = torch.full((slots,), pad_id, dtype=torch.long, device=self.device)  # token each slot feeds next
        self.plugins = [model.plugin_names[0]] * slots
        self.rows: list[Row] = []
        self._free = list(range(slots))
        self._pending: dict[int, torch.Tensor] = {}  # slot -> logits of a just-admitted row's first token
        self._state: dict[int, DecodeRows] = {}  # Row.id -> its decoding state

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def slots_needed(self, unconditional: Request | None) -> int:
        return 1 if unconditional is None else 2

    # ----- joining -------------------------------------------------------------------------------------------
    def _prefill(self, request: Request, slot: int) -> None:
        """Run one prompt alone and copy its keys and values into `slot`; keep its last logits for the next step."""
        ids = torch.tensor([expand_image_slots(request.input_ids, self.model.num_patches)], device=self.device)
        pixels = None if request.pixel_values is None else request.pixel_values.to(self.device)
        with self.model.hlora.use(request.plugin):
            embeds = self.model.embed(ids, pixels, [request.plugin])
            out = self.model.llm.get_decoder()(inputs_embeds=embeds, cache=DynamicCache(config=self.model.llm.config))
        length = ids.shape[1]
        for layer, filled in zip(self.cache.layers, out.cache.layers, strict=True):
            layer.keys[slot, :, :length] = filled.keys[0]
            layer.values[slot, :, :length] = filled.values[0]
        self.positions[slot] = length
        self.plugins[slot] = request.plugin
        self._pending[slot] = head_logits(self.model, out.last_hidden_state[:, -1], request.plugin, False)[0]

    def admit(
        self,
        request: Request,
        sampling: SamplingParams,
        *,
        unconditional: Request | None = None,
        guidance_scale: float = 1.0,
        min_tokens: int = 0,
        ignore_eos: bool = False,
    ) -> Row:
        """Prefill `request` (and its guidance twin) into free slots; its first token comes with the next `step`."""
        need = self.slots_needed(unconditional)
        if need > len(self._free):
            raise RuntimeError(f"{need} free slot(s) needed, {len(self._free)} free")
        row = Row(request, sampling, self._free[0], None, guidance_scale)
        longest = positions_needed(self.model, request, unconditional, row.budget)
        if longest > self.max_len:
            raise ValueError(f"the prompt and answer need {longest} positions; a slot holds {self.max_len}")
        self._free.pop(0)
        with torch.inference_mode():
            self._prefill(request, row.slot)
            if unconditional is not None:
                row.twin = self._free.pop(0)
                self._prefill(unconditional, row.twin)
        self._state[row.id] = DecodeRows.build(
            self.model,
            [request],
            sampling,
            self.stop_ids,
            self.pad_id,
            self.device,
            min_tokens=min_tokens,
            ignore_eos=ignore_eos,
        )
        self.rows.append(row)
        return row

    # ----- stepping ------------------------------------------------------------------------------------------
    def release(self, row: Row) -> None:
        """Free a row's slots now (it ended, was cancelled or timed out)."""
        if row in self.rows:
            self.rows.remove(row)
            for slot in (row.slot, row.twin):
                if slot is not None:
                    self._pending.pop(slot, None)
                    self.positions[slot] = 0
                    self._free.append(slot)
            self._state.pop(row.id, None)

    def _forward(self, advance: torch.Tensor) -> torch.Tensor:
        """One token for every slot at its own position; fp32 logits [slots, V]. Only the `advance` slots (rows that
        fed a real token) move on; the others' writes land where their next real token will overwrite them."""
        valid = torch.arange(self.max_len, device=self.device)[None] <= self.positions[:, None]  # [S, L]
        with self.model.hlora.use(tuple(self.plugins)):
            embeds = self.model.llm.get_input_embeddings()(self.last[:, None])
            out = self.model.llm.get_decoder()(
                inputs_embeds=embeds,
                attention_mask=valid[:, None, None, :],
                position_ids=self.positions[:, None],
                cache=self.cache,
                use_cache=True,
            )
        self.positions += advance
        return head_logits(self.model, out.last_hidden_state[:, -1], tuple(self.plugins), False)

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int]]:
        """Advance every running row by one token: (row, token) pairs; rows that ended are released."""
        advance = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        for row in self.rows:
            if row.slot not in self._pending:
                advance[[s for s in (row.slot, row.twin) if s is not None]] = 1
        logits = self._forward(advance) if bool(advance.any()) else None
        produced = []
        for row in list(self.rows):
            own = self._pending.pop(row.slot) if row.slot in self._pending else logits[row.slot]
            raw = own
            if row.twin is not None:
                twin = self._pending.pop(row.twin) if row.twin in self._pending else logits[row.twin]
                raw = twin + row.guidance_scale * (own - twin)
            state = self._state[row.id]
            token = state.pick(raw[None].float())
            state.advance(token, len(row.tokens))
            row.tokens.append(int(token))
            row.finished = bool(state.finished[0])
            produced.append((row, int(token)))
            for slot in (row.slot, row.twin):
                if slot is not None:
                    self.last[slot] = token[0]
            if row.finished:
                self.release(row)
        return produced
