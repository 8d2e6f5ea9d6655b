"""Serving throughput: the OpenAI-compatible server with dynamic batching on (up to 32 rows per forward pass) vs
off (one request at a time), at 1, 8 and 32 concurrent clients, side by side in one run.

Each configuration starts two real servers (subprocesses on loopback, same random weights); for every client count
the two are measured back to back (off first, then on) so neighbours' load hits both alike. Each client sends
chat completions with an image, one after another (greedy, a fixed token budget). Printed per row: requests/s,
p50/p95 latency, and the server process's CPU time per request (immune to other jobs on a shared machine).

    python bench/serve.py [--configs nano small] [--clients 1 8 32] [--max-tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
options = ServerOptions(max_batch_size=int(sys.argv[4]), max_queue=1024, request_timeout=3600, max_tokens=256)
serve(HealthGPT.random(config), "127.0.0.1", int(sys.argv[1]), options, log_level="warning")
"""


@dataclass
class Server:
    proc: subprocess.Popen
    url: str

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(config: HealthGPTConfig, threads: int, batch: int) -> Server:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [str(port), json.dumps(config.to_dict()), str(threads), str(batch)]
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


def payloads(model: str, count: int, max_tokens: int) -> list[dict]:
    """`count` chat requests over 4 images x 3 questions (different prompt lengths)."""
    uris = []
    for seed in range(4):
        image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 128, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return [
        {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": uris[i % 4]}},
                        {"type": "text", "text": QUESTIONS[i % 3]},
                    ],
                }
            ],
        }
        for i in range(count)
    ]


async def load(url: str, requests: list[dict], clients: int) -> tuple[float, list[float], list[str]]:
    """(wall seconds, latencies, answers in request order) for `clients` clients sharing the requests."""
    latencies: list[float] = []
    answers: list[str] = [""] * len(requests)
    todo = iter(range(len(requests)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:

        async def client() -> None:
            for i in todo:
                start = time.perf_counter()
                response = await http.post("/v1/chat/completions", json=requests[i])
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)
                answers[i] = response.json()["choices"][0]["message"]["content"]

        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        return time.perf_counter() - start, latencies, answers


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["nano", "small"], choices=["nano", "small"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2, help="at least 8 requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each server")
    args = parser.parse_args()
    print(f"torch threads per server: {args.threads}; {args.max_tokens} new tokens per request; greedy")
    header = "| config | clients | batching | req/s | p50 s | p95 s | server CPU s/req | req/s on/off |"
    print(header, "|---" * 8 + "|", sep="\n")
    for name in args.configs:
        config = small_config() if name == "small" else get_variant("nano")
        servers = {"off": start(config, args.threads, 1), "on": start(config, args.threads, 32)}
        try:
            warm = payloads(f"healthgpt-{name}", 2, 4)
            for server in servers.values():
                asyncio.run(load(server.url, warm, 1))
            for clients in args.clients:
                requests = payloads(f"healthgpt-{name}", max(8, clients * args.requests_per_client), args.max_tokens)
                rates, answers = {}, {}
                for mode, server in servers.items():
                    cpu = server.cpu_seconds()
                    wall, latencies, answers[mode] = asyncio.run(load(server.url, requests, clients))
                    cpu = (server.cpu_seconds() - cpu) / len(requests)
                    rates[mode] = len(requests) / wall
                    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
                    ratio = f"{rates['on'] / rates['off']:.2f}x" if mode == "on" else ""
                    row = [name, clients, mode, f"{rates[mode]:.2f}", f"{p50:.2f}", f"{p95:.2f}", f"{cpu:.3f}", ratio]
                    print("| " + " | ".join(map(str, row)) + " |", flush=True)
                if answers["on"] != answers["off"]:
                    print(f"  warning: {name} at {clients} clients answered differently with batching on", flush=True)
        finally:
            for server in servers.values():
                server.proc.terminate()
                server.proc.wait(30)


if __name__ == "__main__":
    main()
