"""Greedy decoding throughput, side by side in one run on the same random-weight model: our loop eager, our loop
on the compiled static-cache engine, transformers `generate` (dynamic cache) and `generate` with
`cache_implementation="static"`; plus the bytes one decode step reads, the measured device copy bandwidth and the
fraction of the bandwidth limit each reaches.

    python bench/decode.py                                   # CPU: nano and small, batch 1 and 8
    python bench/decode.py --device cuda --variant m3 --dtype bfloat16 --batch 1 32 --prompt-tokens 640 \
        --new-tokens 128                                      # GPU: real M3 shapes, random weights
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from _shared import QUESTIONS, build_on_device, copy_bandwidth, step_bytes, sync

from healthgpt.api import HealthGPT
from healthgpt.config import COMPREHENSION
from healthgpt.generation import SamplingParams, StaticEngine, generate


def requests_for(model: HealthGPT, batch: int, prompt_tokens: int | None) -> list:
    """`batch` text questions; with `prompt_tokens`, each padded with filler words to about that length."""
    out = []
    for i in range(batch):
        question = QUESTIONS[i % len(QUESTIONS)]
        request = model.build_request([{"role": "user", "content": question}])
        if prompt_tokens and len(request.input_ids) < prompt_tokens:
            filler = " ".join(["lesion"] * prompt_tokens)
            request = model.build_request([{"role": "user", "content": filler + " " + question}])
            request = dataclasses.replace(request, input_ids=request.input_ids[-prompt_tokens:])
        out.append(request)
    return out


def ours(model: HealthGPT, requests: list, new_tokens: int, engine: StaticEngine | None) -> int:
    params = SamplingParams(max_new_tokens=new_tokens)
    out = generate(model.model, requests, params, stop_ids=[], pad_id=model.pad_id, engine=engine)
    return sum(len(o) for o in out)


def theirs(model: HealthGPT, requests: list, new_tokens: int, cache: str | None) -> int:
    ids = [r.input_ids for r in requests]
    width = max(len(i) for i in ids)
    device = model.device
    input_ids = torch.tensor([[model.pad_id] * (width - len(i)) + i for i in ids], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
    extra = {"cache_implementation": cache} if cache else {}
    with model.model.hlora.use(COMPREHENSION), torch.inference_mode():
        out = model.model.llm.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.pad_id,
            **extra,
        )
    return (out.shape[1] - width) * out.shape[0]


def rate(fn, repeats: int, device: torch.device, *args) -> float:
    """Best tokens per second over `repeats` runs (after one warm-up run, which also compiles)."""
    fn(*args)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        n = fn(*args)
        sync(device)
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", nargs="+", default=["nano", "small"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, {args.dtype}, greedy")
    print(f"device copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write of a large buffer)")
    head = f"{'model':<6} {'batch':>5} {'eager':>9} {'compiled':>9} {'generate':>9} {'static':>9} {'comp/eager':>10}"
    print(head + f" {'comp/static':>11} {'MB/step':>8} {'limit tok/s':>11} {'of limit':>8}")
    for variant in args.variant:
        model = build_on_device(variant, device, args.dtype)
        engine = StaticEngine(model.model)
        for batch in args.batch:
            requests = requests_for(model, batch, args.prompt_tokens)
            found = {
                "eager": rate(ours, args.repeats, device, model, requests, args.new_tokens, None),
                "compiled": rate(ours, args.repeats, device, model, requests, args.new_tokens, engine),
                "generate": rate(theirs, args.repeats, device, model, requests, args.new_tokens, None),
                "static": rate(theirs, args.repeats, device, model, requests, args.new_tokens, "static"),
            }
            length = len(requests[0].input_ids) + args.new_tokens // 2
            read = step_bytes(model, batch, length)
            limit = bandwidth / read * batch  # tokens per second if a step only read its bytes at copy speed
            print(
                f"{variant:<6} {batch:>5} {found['eager']:>9.1f} {found['compiled']:>9.1f} {found['generate']:>9.1f} "
                f"{found['static']:>9.1f} {found['compiled'] / found['eager']:>10.2f} "
                f"{found['compiled'] / found['static']:>11.2f} {read / 1e6:>8.1f} {limit:>11.1f} "
                f"{found['compiled'] / limit:>8.1%}"
            )


if __name__ == "__main__":
    main()
