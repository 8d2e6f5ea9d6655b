"""Where a generation run's forward passes happen. Two sessions with one interface (prefill, then one token per row
per step, each returning the last hidden states):

- `EagerSession`: transformers' `DynamicCache`, a growing attention mask; the reference path (`enforce_eager`).
- `StaticSession`: a preallocated `StaticCache` and a one-token step compiled by `torch.compile` (CUDA graphs on a
  GPU through `mode="reduce-overhead"`). Shapes are bucketed so compilation is bounded: rows round up to a power of
  two and the cache length up to a multiple of `LENGTH_BUCKET`; every step of a run has the same shapes, and the
  position written is a tensor, so the graph is replayed, never retraced. Prefill runs eagerly (SDPA) into the same
  cache.

The plugin selection is set (under the model's lock) around each call, as a name for a uniform batch (fast path: one
plugin runs) or as a tensor of plugin indices per row for a mixed one (every plugin runs, each row keeps its own).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from transformers import DynamicCache, StaticCache

from ..model import HealthGPTModel

LENGTH_BUCKET = 256
RECOMPILE_LIMIT = 64  # (row bucket, length bucket, plugin form) triples one process may compile


def _row_bucket(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


def _length_bucket(length: int) -> int:
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


class EagerSession:
    """The reference decode path: a growing mask and a `DynamicCache` (or, with `use_cache=False`, a full recompute
    of the sequence at every step, for tests of the cache itself)."""

    def __init__(self, model: HealthGPTModel, plugins: Sequence[str], use_cache: bool = True) -> None:
        self.model = model
        self.selection: str | tuple[str, ...] = plugins[0] if len(set(plugins)) == 1 else tuple(plugins)
        self.use_cache = use_cache
        self.cache: DynamicCache | None = None

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with self.model.hlora.use(self.selection):
            out = self.model.llm.get_decoder()(
                inputs_embeds=embeds,
                attention_mask=self.mask,
                position_ids=positions,
                cache=self.cache,
                use_cache=self.use_cache,
            )
        self.cache = out.cache if self.use_cache else None
        return out.last_hidden_state[:, -1]

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run the prompts ([R, T, H] embeddings, [R, T] mask and positions); hidden states of the last position."""
        self.mask, self.positions, self.embeds = mask, positions, embeds
        self.cache = DynamicCache(config=self.model.llm.config) if self.use_cache else None
        return self._forward(embeds, positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([R]); hidden states [R, H] of that position."""
        with self.model.hlora.use(self.selection):
            embed = self.model.llm.get_input_embeddings()(tokens[:, None])  # [R, 1, H]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        if self.use_cache:
            return self._forward(embed, self.positions[:, -1:])
        self.embeds = torch.cat([self.embeds, embed], dim=1)
        return self._forward(self.embeds, self.positions)

    def close(self) -> None:
        self.cache = None


class StaticEngine:
    """Per model: the compiled one-token step and a pool of static caches per (rows, length) bucket, so a bucket's
    cache keeps its address (CUDA graphs replay on it) and concurrent runs each take their own."""

    def __init__(self, model: HealthGPTModel) -> None:
        self.model = model
        self._pool: dict[tuple[int, int], list[StaticCache]] = {}
        self._lock = threading.Lock()
        cuda = next(model.llm.parameters()).device.type == "cuda"
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.step = torch.compile(self._step, mode="reduce-overhead" if cuda else None, dynamic=False)

    def _step(
        self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, cache: StaticCache
    ) -> torch.Tensor:
        """One token per row into the static cache; `valid` [R, L] marks the cache positions each row attends to."""
        embed = self.model.llm.get_input_embeddings()(tokens[:, None])
        out = self.model.llm.get_decoder()(
            inputs_embeds=embed,
            attention_mask=valid[:, None, None, :],
            position_ids=positions[:, None],
            cache=cache,
            use_cache=True,
        )
        return out.last_hidden_state[:, -1]

    def take(self, rows: int, length: int) -> StaticCache:
        """A reset cache for the bucket (a new one when every cache of the bucket is in use)."""
        with self._lock:
            free = self._pool.setdefault((rows, length), [])
            cache = free.pop() if free else StaticCache(config=self.model.llm.config, max_cache_len=length)
        if cache.is_initialized:
            cache.reset()
        return cache

    def give_back(self, rows: int, length: int, cache: StaticCache) -> None:
        with self._lock:
            self._pool[(rows, length)].append(cache)


class StaticSession:
    """One run on the static engine: rows padded to their bucket (padding rows attend to position 0 only)."""

    def __init__(self, engine: StaticEngine, plugins: Sequence[str], max_new_tokens: int) -> None:
        self.engine = engine
        self.model = engine.model
        self.rows = len(plugins)
        self.padded = _row_bucket(self.rows)
        self.max_new_tokens = max_new_tokens
        names = self.model.hlora.plugin_names
        if len(set(plugins)) == 1:
            self.selection: str | torch.Tensor = plugins[0]
        else:
            index = [names.index(p) for p in plugins] + [0] * (self.padded - self.rows)
            self.selection = torch.tensor(index, device=self._device)
        self.cache: StaticCache | None = None

    @property
    def _device(self) -> torch.device:
        return next(self.model.llm.parameters()).device

    def _pad_rows(self, t: torch.Tensor, value: float | bool | int = 0) -> torch.Tensor:
        extra = self.padded - self.rows
        if not extra:
            return t
        return torch.cat([t, t.new_full((extra, *t.shape[1:]), value)])

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Eager prefill of the prompts into a fresh static cache; hidden states [R, H] of the last position."""
        width = embeds.shape[1]
        self.length = _length_bucket(width + self.max_new_tokens)
        self.cache = self.engine.take(self.padded, self.length)
        valid = torch.zeros((self.padded, self.length), dtype=torch.bool, device=embeds.device)
        valid[: self.rows, :width] = mask.bool()
        valid[self.rows :, 0] = True
        self.valid = valid
        causal = torch.ones((width, self.length), dtype=torch.bool, device=embeds.device).tril()  # [T, L]
        attend = valid[:, None, None, :] & causal[None, None]  # [R, 1, T, L]
        attend[self.rows :, :, :, 0] = True
        self.position = positions[:, -1]
        with self.model.hlora.use(self.selection):
            out = self.model.llm.get_decoder()(
                inputs_embeds=self._pad_rows(embeds),
                attention_mask=attend,
                position_ids=self._pad_rows(positions),
                cache=self.cache,
                use_cache=True,
            )
        self.written = width
        return out.last_hidden_state[: self.rows, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([R]); hidden states [R, H] from the compiled step."""
        self.valid[: self.rows, self.written] = True
        self.position = self.position + 1
        with self.model.hlora.use(self.selection):
            hidden = self.engine.step(self._pad_rows(tokens), self._pad_rows(self.position), self.valid, self.cache)
        self.written += 1
        hidden = hidden[: self.rows]
        return hidden.clone() if hidden.is_cuda else hidden  # a CUDA-graph output is overwritten by the next replay

    def close(self) -> None:
        if self.cache is not None:
            self.engine.give_back(self.padded, self.length, self.cache)
            self.cache = None
