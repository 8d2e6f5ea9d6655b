"""What several benchmarks share: model sizes and questions (so figures compare like with like), the naive MoE-LoRA
baseline H-LoRA is measured against, and how a training step's time and kept activations are measured."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor, nn

from healthgpt.api import HealthGPT
from healthgpt.config import COMPREHENSION, HealthGPTConfig, LLMConfig, get_variant

K = TypeVar("K")  # a benchmark's key for one of its steps

QUESTIONS = ["Is there a lesion in this CT image?", "Which side is the lesion on?", "How many lesions are there?"]


def small_config() -> HealthGPTConfig:
    """nano's architecture with a 512-wide, 8-layer Phi-3 LLM (about 30 M LLM parameters)."""
    llm = LLMConfig(
        arch="phi3",
        source="small",
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        intermediate_size=1408,
        vocab_rows=512,
        max_position_embeddings=2048,
    )
    return get_variant("nano").replace(name="small", llm=llm)


class NaiveMoELoRA(nn.Module):
    """MoELoRA as usually written: k separate LoRA experts of rank R/k (B zero-initialised), each output weighted by
    its gate, then summed: k small products where H-LoRA does one fused product."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, num_experts: int) -> None:
        super().__init__()
        r = rank // num_experts
        self.base = base
        self.experts_A = nn.ModuleList(nn.Linear(base.in_features, r, bias=False) for _ in range(num_experts))
        self.experts_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for _ in range(num_experts))
        self.route = nn.Linear(base.in_features, num_experts, bias=False)
        self.scaling = alpha / rank * num_experts
        for b in self.experts_B:
            nn.init.zeros_(b.weight)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.softmax(self.route(x), dim=-1)  # [..., k]
        y = self.base(x)
        for e, (a, b) in enumerate(zip(self.experts_A, self.experts_B, strict=True)):
            y = y + gate[..., e : e + 1] * b(a(x)) * self.scaling
        return y


def build_on_device(variant: str, device: torch.device, dtype: str = "float32") -> HealthGPT:
    """A random-weight model of `variant` ('small' or a variant name such as nano or m3) built directly on `device`
    (no host copy, so real M3 shapes take seconds on a GPU), cast to `dtype`."""
    config = small_config() if variant == "small" else get_variant(variant)
    with torch.device(device):
        model = HealthGPT.random(config, seed=0)
    return model.to(device, dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by a device-to-device copy of a large buffer (each byte read once and written once):
    the memory-bandwidth ceiling a decode step is measured against."""
    src = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def step_bytes(model: HealthGPT, batch: int, length: int, plugin: str = COMPREHENSION) -> int:
    """Bytes one decode step must read: every LLM weight but the input embedding table (one row per token) and the
    other plugins' adapters, plus the K and V cache of `batch` rows of `length` positions."""
    embedding = model.model.llm.get_input_embeddings().weight
    others = tuple(f".plugins.{name}." for name in model.model.hlora.plugin_names if name != plugin)
    weights = sum(
        p.numel() * p.element_size()
        for name, p in model.model.llm.named_parameters()
        if p is not embedding and not any(o in name for o in others)
    )
    cfg = model.model.llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * length * batch * embedding.element_size()
    return weights + kv


@contextmanager
def saved_bytes() -> Iterator[list[int]]:
    """Count the bytes of distinct storages autograd keeps for backward inside the block."""
    seen: set[int] = set()
    total = [0]

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def measure_memory(step: Callable[[], None], device: torch.device) -> tuple[float, float | None]:
    """(MiB of activations saved for backward, CUDA peak MiB or None) of one call of `step`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with saved_bytes() as total:
        step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return total[0] / 2**20, peak


def time_rotated(
    steps: Mapping[K, Callable[[], None]], repeats: int, clock_kind: str, device: torch.device
) -> dict[K, list[float]]:
    """Seconds of each step over `repeats` rounds (process CPU time, or wall with `clock_kind="wall"`), the order
    rotated each round to spread drift evenly."""

    def clock() -> float:
        sync(device)
        return time.process_time() if clock_kind == "cpu" else time.perf_counter()

    times: dict[K, list[float]] = {key: [] for key in steps}
    keys = list(steps)
    for i in range(repeats):
        for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
            start = clock()
            steps[key]()
            times[key].append(clock() - start)
    return times
