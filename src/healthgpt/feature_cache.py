"""A bounded LRU of projected image features keyed by the image's content hash and the plugin, so a second question
about the same image skips the vision tower (chats, several questions per study, the server's many users)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch


class FeatureCache:
    """{(sha256 of the pixel values, plugin): features [P, H]} holding at most `max_entries` images (0: off)."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def features(
        self,
        pixel_values: torch.Tensor,
        plugins: Sequence[str],
        compute: Callable[[torch.Tensor, Sequence[str]], torch.Tensor],
    ) -> torch.Tensor:
        """Features [N, P, H] of N images: cached ones looked up, the others computed by `compute(pixels, plugins)`
        in one call and remembered."""
        if self.max_entries <= 0:
            return compute(pixel_values, plugins)
        host = pixel_values.detach().to("cpu", torch.float32).contiguous()
        keys = [(hashlib.sha256(host[i].numpy().tobytes()).hexdigest(), p) for i, p in enumerate(plugins)]
        with self._lock:
            found = {k: self._entries[k] for k in keys if k in self._entries}
            for k in found:
                self._entries.move_to_end(k)
        missing = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = compute(pixel_values[missing], [plugins[i] for i in missing])
            with self._lock:
                for i, feats in zip(missing, computed, strict=True):
                    found[keys[i]] = self._entries[keys[i]] = feats
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return torch.stack([found[k] for k in keys])
