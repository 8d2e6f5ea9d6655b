"""Weight-only quantization of the base LLM: memory and greedy decode rate for none / int8 / int4 side by side, and
the memory of the large variants computed from their configs.

Measured: one model (the shared small config on CPU; `--variant m3` shapes on `--device cuda`) with random weights,
quantized three ways; memory by part as stored and greedy decode tokens/s at batch 1 (the short prompt's prefill
included; runs of the three interleaved, best of `--repeats`). Computed: the bytes of L14 and XL32 by part from their
configs (the real architecture built on the meta device), plus the KV cache at `--context` tokens and the largest
full-precision linear held while quantizing: the peak of loading and answering at batch 1.

    python bench/quantize.py [--new-tokens 32] [--repeats 3]
    python bench/quantize.py --device cuda --variant m3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _shared import QUESTIONS, small_config

from healthgpt.api import HealthGPT
from healthgpt.checkpoints import resolve_dtype
from healthgpt.config import get_variant
from healthgpt.generation import SamplingParams, generate
from healthgpt.quantize import base_linears, estimate_memory, memory_by_part, quantize_base

GB = 1e9
MODES = (None, "int8", "int4")
GOALS_GB = {"l14": 10.0, "xl32": 22.0}  # int4: L14 under 10 GB, XL32 on a 24 GB card


def decode_rate(model: HealthGPT, new_tokens: int) -> float:
    """Greedy tokens/s of one run at batch 1, the short prompt's prefill included (about one decode step for a
    ~30-token prompt; subtracting a separately timed prefill was too noisy on a shared machine). On the model's
    default path: the compiled static-cache engine on CUDA, eager on a CPU."""
    request = model.build_request([{"role": "user", "content": QUESTIONS[0]}])
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    params = SamplingParams(max_new_tokens=new_tokens)
    generate(model.model, [request], params, **{**model.generation_kwargs(), "stop_ids": []})
    sync()
    return new_tokens / (time.perf_counter() - start)


def measured(args: argparse.Namespace) -> None:
    config = get_variant(args.variant) if args.variant else small_config()
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    with torch.device(device):
        reference = HealthGPT.random(config, seed=0)
    reference.to(dtype=dtype)
    models = {mode: copy.deepcopy(reference) if mode is not None else reference for mode in MODES}
    for mode, model in models.items():
        quantize_base(model.model, mode, device)
        decode_rate(model, 4)  # warm-up
    rates = dict.fromkeys(MODES, 0.0)
    for _ in range(args.repeats):  # interleaved, so a busy moment on a shared machine hits every mode alike
        for mode, model in models.items():
            rates[mode] = max(rates[mode], decode_rate(model, args.new_tokens))
    print(
        f"{config.name} shapes, random weights, {dtype}, {device}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, batch 1, {args.new_tokens} new tokens, best of {args.repeats}"
    )
    print(
        f"{'quantize':<8} {'base GB':>8} {'plugins GB':>10} {'vision GB':>9} {'VQGAN GB':>8} {'total GB':>8} "
        f"{'base x':>7} {'tok/s':>8} {'tok/s x':>8}"
    )
    full = memory_by_part(reference.model, reference.vqgan)["base"]
    for mode, model in models.items():
        parts = memory_by_part(model.model, model.vqgan)
        print(
            f"{mode or 'none':<8} {parts['base'] / GB:>8.3f} {parts['plugins'] / GB:>10.3f} "
            f"{parts['vision'] / GB:>9.3f} {parts['vqgan'] / GB:>8.3f} {sum(parts.values()) / GB:>8.3f} "
            f"{full / parts['base']:>7.2f} {rates[mode]:>8.1f} {rates[mode] / rates[None]:>8.2f}"
        )


def kv_cache_bytes(name: str, context: int, dtype: torch.dtype) -> int:
    llm = get_variant(name).llm
    head_dim = llm.hidden_size // llm.num_heads
    return 2 * llm.num_layers * llm.num_kv_heads * head_dim * context * dtype.itemsize


def computed(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16
    print(
        f"\ncomputed from the configs: {dtype} weights, KV cache of {args.context} tokens at batch 1, plus the "
        "largest full-precision linear while quantizing"
    )
    print(
        f"{'variant':<7} {'quantize':<8} {'base GB':>8} {'plugins GB':>10} {'vision GB':>9} {'VQGAN GB':>8} "
        f"{'KV GB':>6} {'peak GB':>8} {'goal':>10}"
    )
    for name in ("l14", "xl32"):
        config = get_variant(name)
        kv = kv_cache_bytes(name, args.context, dtype)
        with torch.device("meta"):
            largest = max(lin.weight.numel() for lin in base_linears(HealthGPT.random(config).model).values())
        for mode in (None, "int8", "int4", "nf4"):
            parts = estimate_memory(config, dtype, mode)
            peak = sum(parts.values()) + kv + (largest * dtype.itemsize if mode else 0)
            goal = f"< {GOALS_GB[name]:g} " + ("met" if peak / GB < GOALS_GB[name] else "MISSED")
            print(
                f"{name:<7} {mode or 'none':<8} {parts['base'] / GB:>8.2f} {parts['plugins'] / GB:>10.2f} "
                f"{parts['vision'] / GB:>9.2f} {parts['vqgan'] / GB:>8.2f} {kv / GB:>6.2f} {peak / GB:>8.2f} "
                f"{goal if mode == 'int4' else '':>10}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default=None, help="measure these shapes (m3 on a GPU); default: small config")
    parser.add_argument(
        "--dtype",
        default=None,
        help="weights of the measured model (default: bfloat16 on CUDA, as int4 there needs, else float32)",
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--context", type=int, default=4096, help="tokens of KV cache in the computed peak")
    args = parser.parse_args()
    measured(args)
    computed(args)


if __name__ == "__main__":
    main()
