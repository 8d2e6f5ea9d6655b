"""Greedy decoding throughput: our generation loop vs `transformers` `generate` on the same model (KV cache on).

Both run the same weights with the same H-LoRA plugin active and produce the same number of tokens; the ratio
printed is ours / theirs in tokens per second (> 1 means our loop is faster).

    python bench/decode.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from _shared import QUESTIONS, small_config

from healthgpt.api import HealthGPT
from healthgpt.config import COMPREHENSION, get_variant
from healthgpt.generation import SamplingParams, generate


def ours(model: HealthGPT, requests, new_tokens: int) -> int:
    out = generate(model.model, requests, SamplingParams(max_new_tokens=new_tokens), stop_ids=[], pad_id=model.pad_id)
    return sum(len(o) for o in out)


def theirs(model: HealthGPT, requests, new_tokens: int) -> int:
    ids = [r.input_ids for r in requests]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([[model.pad_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with model.model.hlora.use(COMPREHENSION):
        out = model.model.llm.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.pad_id,
        )
    return (out.shape[1] - width) * out.shape[0]


def timed(fn, *args) -> tuple[float, int]:
    start = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, text prompts, greedy, KV cache")
    print(f"{'model':<6} {'batch':>5} {'ours tok/s':>11} {'generate tok/s':>15} {'ratio':>6}")
    for name, config in (("nano", get_variant("nano")), ("small", small_config())):
        model = HealthGPT.random(config, seed=0)
        for batch in (1, 8):
            requests = [
                model.build_request([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(batch)
            ]
            ours(model, requests, 4), theirs(model, requests, 4)  # warm-up
            best = {}
            for label, fn in (("ours", ours), ("theirs", theirs)):
                runs = [timed(fn, model, requests, args.new_tokens) for _ in range(args.repeats)]
                seconds, tokens = min(runs)
                best[label] = tokens / seconds
            ratio = best["ours"] / best["theirs"]
            print(f"{name:<6} {batch:>5} {best['ours']:>11.1f} {best['theirs']:>15.1f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
