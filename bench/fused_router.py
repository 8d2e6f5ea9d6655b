"""Does fusing the H-LoRA router and A projections into one GEMM pay at decode shapes?

One M3-sized plugin input (qkv_proj: 3072 in, rank 64, 4 experts). "separate" runs `x @ A.T` and `x @ route.T` as two
products (what `HLoRAPlugin` does); "fused" runs one product over the stacked [rank + experts, 3072] weight and
splits the result. Both eager and under `torch.compile` (which may fuse on its own), timed interleaved in one run.

    python bench/fused_router.py [--device cuda] [--tokens 1 8 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _shared import sync


def separate(x: torch.Tensor, a: torch.Tensor, route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.linear(x, a), F.linear(x, route)


def fused(x: torch.Tensor, stacked: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    both = F.linear(x, stacked)
    return both[..., :rank], both[..., rank:]


def timed(fn, args: tuple, device: torch.device, repeats: int, inner: int) -> float:
    """Median microseconds per call over `repeats` timings of `inner` calls."""
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn(*args)
        sync(device)
        times.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(args.rank, 3072, device=device, dtype=dtype)
    route = torch.randn(args.experts, 3072, device=device, dtype=dtype)
    stacked = torch.cat([a, route])
    compiled = {"separate": torch.compile(separate), "fused": torch.compile(fused)}
    print(f"torch {torch.__version__}, {device}, {dtype}, threads {torch.get_num_threads()}, microseconds per call")
    print(f"{'tokens':>6} {'mode':<9} {'separate':>9} {'fused':>9} {'fused speed-up':>15}")
    for tokens in args.tokens:
        x = torch.randn(tokens, 3072, device=device, dtype=dtype)
        with torch.inference_mode():
            for mode, fns in (("eager", {"separate": separate, "fused": fused}), ("compiled", compiled)):
                sep = timed(fns["separate"], (x, a, route), device, args.repeats, args.inner)
                fus = timed(fns["fused"], (x, stacked, args.rank), device, args.repeats, args.inner)
                print(f"{tokens:>6} {mode:<9} {sep:>9.1f} {fus:>9.1f} {sep / fus:>14.2f}x")


if __name__ == "__main__":
    main()
