"""Forward+backward time of one M3-sized H-LoRA layer vs plain LoRA of the same total rank vs a naive MoE-LoRA.

All three wrap the same frozen nn.Linear (M3 qkv_proj, 3072 -> 9216) and train only their adapters; the input
requires grad, as it does inside a network. Methods are timed interleaved in one run (warm-up, then the median
and the minimum of N repeats), and ratios are against LoRA. By default one thread is timed by its process CPU
time, which a busy shared machine barely disturbs (wall time there measures the neighbours); `--clock wall
--threads 2` times the usual way. Run: `python bench/hlora.py` (about 75 s of CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _shared import NaiveMoELoRA
from torch import Tensor, nn

from healthgpt.config import PluginConfig
from healthgpt.hlora import HLoRALinear, PluginSelection


class LoRALinear(nn.Module):
    """Minimal plain LoRA: base(x) + B A x · alpha / r."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def hlora_layer(base: nn.Linear, plugins: dict[str, PluginConfig], active: str | list[str]) -> HLoRALinear:
    """An H-LoRA wrapper of `base` holding `plugins`, with `active` selected (one name or one per sample)."""
    layer = HLoRALinear(base, PluginSelection())
    for name, cfg in plugins.items():
        layer.add_plugin(name, cfg)
    layer.selection.set(active)
    return layer


def time_step(layer: nn.Module, x: Tensor, grad: Tensor, clock: Callable[[], float]) -> float:
    """Seconds for one forward + backward (adapter grads and input grad)."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    start = clock()
    layer(x).backward(grad)
    return clock() - start


def run(rank: int, experts: list[int], x: Tensor, base: nn.Linear, repeats: int, clock: Callable[[], float]) -> None:
    alpha = 2.0 * rank
    grad = torch.randn(*x.shape[:-1], base.out_features)
    samples = x.shape[0]
    methods: dict[str, Callable[[], nn.Module]] = {
        "base only (frozen)": lambda: base,
        "LoRA": lambda: LoRALinear(base, rank, alpha),
    }
    for k in experts:
        cfg = PluginConfig(rank=rank, alpha=alpha, num_experts=k)
        methods[f"H-LoRA k={k}"] = lambda cfg=cfg: hlora_layer(base, {"p": cfg}, "p")
        methods[f"MoE-LoRA k={k}"] = lambda k=k: NaiveMoELoRA(base, rank, alpha, k)
    mixed = PluginConfig(rank=rank, alpha=alpha, num_experts=4)
    methods["H-LoRA k=4, 2 plugins per-sample"] = lambda: hlora_layer(
        base, {"a": mixed, "b": mixed}, ["a", "b"] * (samples // 2)
    )
    layers = {name: make() for name, make in methods.items()}
    times: dict[str, list[float]] = {name: [] for name in layers}
    for layer in layers.values():  # warm-up
        time_step(layer, x, grad, clock)
    for i in range(repeats):
        names = list(layers)
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate to spread drift evenly
            times[name].append(time_step(layers[name], x, grad, clock))

    med = {name: statistics.median(t) for name, t in times.items()}
    low = {name: min(t) for name, t in times.items()}
    print(f"\nR = {rank}, tokens = {x.shape[0] * x.shape[1]}, {base.in_features} -> {base.out_features}")
    print(f"{'method':34s} {'median ms':>10s} {'x LoRA':>7s} {'min ms':>8s} {'x LoRA':>7s}")
    for name in times:
        print(
            f"{name:34s} {med[name] * 1e3:10.1f} {med[name] / med['LoRA']:7.3f} "
            f"{low[name] * 1e3:8.1f} {low[name] / low['LoRA']:7.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--samples", type=int, default=4, help="batch rows; tokens = samples x seq")
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = nn.Linear(3072, 9216, bias=False).requires_grad_(False)  # M3 qkv_proj
    x = torch.randn(args.samples, args.seq, 3072, requires_grad=True)  # [B, T, in]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32 CPU, {args.clock} time, "
        f"median and min of {args.repeats} after 1 warm-up"
    )
    for rank in args.ranks:
        run(rank, args.experts, x, base, args.repeats, clock)


if __name__ == "__main__":
    main()
