"""Serving under a mixed workload: static batching (whole batches; a batch decodes until its longest row ends) vs
continuous batching (rows join and leave at every step), side by side in one run.

Each configuration starts two real servers (subprocesses on loopback, same random weights, 32 rows or slots each).
The workload: Poisson arrivals at several rates, about 10% image generations (`/v1/images/edits`, ct2mri) and 90%
short questions about an image (streamed chat completions), at most 32 requests in flight (32 clients: an arrival
that finds every client busy waits for one, and its clock starts when it is sent). Printed per rate: the mean number
of requests in flight (32 when the clients are saturated), the questions' time to first token p50/p95 (to the first
chunk with answer text, or the finish chunk of an answer whose first token was a stop token; not the server's
opening `role` chunk, which leaves before any decoding), the images' latency p50, throughput (requests/s) and the
p95 ratio static / continuous. The two servers are measured back to back with the same arrivals.

    python bench/serve.py [--configs nano small] [--rates 8 16 32] [--requests 96] [--grid 16] [--threads 1]
                          [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import numpy as np
from _shared import QUESTIONS, small_config
from PIL import Image

from healthgpt.config import HealthGPTConfig, get_variant

SERVER = """
import json, sys, torch
from healthgpt.api import HealthGPT
from healthgpt.config import HealthGPTConfig
from healthgpt.serving.server import ServerOptions, serve
torch.set_num_threads(int(sys.argv[3]))
config = HealthGPTConfig.from_dict(json.loads(sys.argv[2]))
options = ServerOptions(batching=sys.argv[4], max_batch_size=32, max_queue=1024, request_timeout=3600, max_tokens=256)
serve(HealthGPT.random(config), "127.0.0.1", int(sys.argv[1]), options, log_level="warning")
"""
MODES = ("static", "continuous")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str


def start(config: HealthGPTConfig, threads: int, batching: str) -> Server:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [str(port), json.dumps(config.to_dict()), str(threads), batching]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, *args])
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Server(proc, url)
        except httpx.TransportError:
            time.sleep(0.3)


def png(seed: int, size: int) -> bytes:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def workload(count: int, rate: float, seed: int = 0) -> list[tuple[float, str, int]]:
    """(arrival second, "image" or "question", index) for `count` Poisson arrivals at `rate` per second."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, count))
    kinds = np.where(rng.random(count) < 0.1, "image", "question")
    return [(float(t), str(k), i) for i, (t, k) in enumerate(zip(arrivals, kinds, strict=True))]


async def question(http: httpx.AsyncClient, model: str, index: int, max_tokens: int) -> float:
    """Time to the first streamed token of one chat completion about an image (see `first_token`)."""
    uri = "data:image/png;base64," + base64.b64encode(png(index % 4, 96)).decode()
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]},
                ],
            }
        ],
    }
    start, first = time.perf_counter(), None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and first_token(line):
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("a streamed answer ended without a token or a finish reason")
    return first


def first_token(line: str) -> bool:
    """Whether an SSE line carries the answer's first token: text, or the finish chunk of an answer whose first
    token was a stop token. The server's opening chunk (`role` with empty content, sent before any decoding) is not."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[len("data: ") :]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content")) or choices[0].get("finish_reason") is not None


async def image(http: httpx.AsyncClient, model: str, index: int) -> float:
    """Latency of one ct2mri generation."""
    start = time.perf_counter()
    files = {"image": ("ct.png", png(index, 96), "image/png")}
    response = await http.post("/v1/images/edits", data={"model": model, "prompt": "ct2mri"}, files=files)
    response.raise_for_status()
    return time.perf_counter() - start


async def run(url: str, model: str, arrivals: list[tuple[float, str, int]], max_tokens: int, clients: int) -> dict:
    """Send the arrivals on time, at most `clients` in flight (a request that finds them all busy waits for one, and
    its clock starts when it is sent): TTFTs of questions, image latencies, wall seconds, mean requests in flight."""
    gate = asyncio.Semaphore(clients)
    ttft: list[float] = []
    images: list[float] = []
    busy: list[float] = []  # seconds each request was in flight
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        begin = time.perf_counter()

        async def one(at: float, kind: str, index: int) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - begin)))
            async with gate:
                sent = time.perf_counter()
                if kind == "image":
                    images.append(await image(http, model, index))
                else:
                    ttft.append(await question(http, model, index, max_tokens))
                busy.append(time.perf_counter() - sent)

        await asyncio.gather(*[one(*a) for a in arrivals])
        wall = time.perf_counter() - begin
    return {"ttft": ttft, "images": images, "wall": wall, "in_flight": sum(busy) / wall}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def config_for(name: str, grid: int) -> HealthGPTConfig:
    """The named config with a `grid` x `grid` code grid, so an image takes grid² + 1 steps."""
    config = small_config() if name == "small" else get_variant("nano")
    factor = config.vq.image_size // round(config.vq.num_image_tokens**0.5)
    return config.replace(vq=dataclasses.replace(config.vq, image_size=grid * factor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["nano", "small"], choices=["nano", "small"])
    parser.add_argument("--rates", nargs="+", type=float, default=[8, 16, 32], help="arrivals per second")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=16, help="answer budget of a question")
    parser.add_argument("--grid", type=int, default=16, help="code grid of a generated image (grid² codes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each server")
    parser.add_argument("--clients", type=int, default=32, help="most requests in flight at once")
    args = parser.parse_args()
    print(
        f"{args.clients} clients, {args.requests} requests per rate (~10% images of {args.grid**2} codes), "
        f"questions of {args.max_tokens} tokens, greedy; torch threads per server: {args.threads}"
    )
    columns = ["config", "rate/s", "batching", "in flight", "question TTFT p50 s", "p95 s", "image p50 s", "req/s"]
    columns.append("p95 static/cont.")
    print("| " + " | ".join(columns) + " |", "|---" * len(columns) + "|", sep="\n")
    for name in args.configs:
        config = config_for(name, args.grid)
        model = f"healthgpt-{config.name}"
        servers = {mode: start(config, args.threads, mode) for mode in MODES}
        try:
            for server in servers.values():  # warm-up: one of each kind
                warm = [(0.0, "question", 0), (0.0, "image", 1)]
                asyncio.run(run(server.url, model, warm, args.max_tokens, args.clients))
            for rate in args.rates:
                arrivals = workload(args.requests, rate)
                found = {
                    mode: asyncio.run(run(servers[mode].url, model, arrivals, args.max_tokens, args.clients))
                    for mode in MODES
                }
                p95 = {mode: percentile(r["ttft"], 95) for mode, r in found.items()}
                for mode, r in found.items():
                    ratio = f"{p95['static'] / p95['continuous']:.1f}x" if mode == "continuous" else ""
                    row = [
                        name,
                        f"{rate:g}",
                        mode,
                        f"{r['in_flight']:.1f}",
                        f"{percentile(r['ttft'], 50):.3f}",
                        f"{p95[mode]:.3f}",
                        f"{percentile(r['images'], 50):.2f}",
                        f"{args.requests / r['wall']:.2f}",
                        ratio,
                    ]
                    print("| " + " | ".join(row) + " |", flush=True)
        finally:
            for server in servers.values():
                server.proc.terminate()
                server.proc.wait(30)


if __name__ == "__main__":
    main()
