"""The fusion layer at run time: the LLM's embedding table and head with whole replacement tables for some plugins,
chosen per sample by the same selection as the H-LoRA plugins (REFERENCE §2.4; `checkpoints` loads them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hlora import PluginSelection

if TYPE_CHECKING:
    from .model import HealthGPTModel


class PluginTable(nn.Module):
    """The LLM's input embedding or output head, with whole replacement tables for some plugins (the generation
    plugin's fusion layer). The model's `PluginSelection` picks the table per call or per sample, as for H-LoRA.
    `weight` stays the base table, so the HF key names and `get_input_embeddings().weight` are unchanged."""

    def __init__(self, base: nn.Embedding | nn.Linear, selection: PluginSelection) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.padding_idx = getattr(base, "padding_idx", None)
        self.is_embedding = isinstance(base, nn.Embedding)
        self.tables = nn.ParameterDict()
        self.selection = selection

    def _lookup(self, x: Tensor, name: str | None) -> Tensor:
        weight = self.tables[name] if name is not None and name in self.tables else self.weight
        if self.is_embedding:
            return F.embedding(x, weight, self.padding_idx)  # [..., H]
        return F.linear(x, weight, self.bias)  # [..., V]

    def forward(self, x: Tensor) -> Tensor:
        active = self.selection.active
        if active is None or isinstance(active, str):
            return self._lookup(x, active)
        if isinstance(active, Tensor):  # per-row plugin indices (compiled decode): each row keeps its own table
            out = self._lookup(x, None)
            for index, name in enumerate(self.selection.names):
                if name in self.tables:
                    keep = (active == index).view(-1, *[1] * (out.dim() - 1))
                    out = torch.where(keep, self._lookup(x, name), out)
            return out
        if len(active) != x.shape[0]:
            raise ValueError(f"per-sample plugin selection has {len(active)} entries but the input has {x.shape[0]}")
        out = self._lookup(x, None)
        for name, rows in self.selection.groups(x.device):
            if name in self.tables:
                out = out.index_copy(0, rows, self._lookup(x.index_select(0, rows), name))
        return out


def set_plugin_tables(model: HealthGPTModel, plugin: str, embedding: Tensor, head: Tensor) -> None:
    """Give `plugin` its own embedding table and head, cast to the base tables' dtype and device (no copy when they
    already match, e.g. memory-mapped from a bundle)."""
    llm = model.llm
    for table, get, put in (
        (embedding, llm.get_input_embeddings, llm.set_input_embeddings),
        (head, llm.get_output_embeddings, llm.set_output_embeddings),
    ):
        module = get()
        if not isinstance(module, PluginTable):
            module = PluginTable(module, model.hlora.selection)
            put(module)
        module.tables[plugin] = nn.Parameter(
            table.to(dtype=module.weight.dtype, device=module.weight.device), requires_grad=False
        )
