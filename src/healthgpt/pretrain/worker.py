"""`python -m healthgpt.pretrain.worker ARGS_JSON`: the VQGAN part of `pretrain_nano`, run in its own process
so that it trains on a second core while the LM and CLIP train in the caller."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from healthgpt.config import HealthGPTConfig
from healthgpt.io.atomic import write_atomic
from healthgpt.pretrain.nano import WORKER_RESULT, NanoBudget, pretrain_vqgan_part, timed
from healthgpt.workers import exit_with_parent


def main(argv: list[str]) -> None:
    """Train, then write the metrics to `<folder>/worker_metrics.json` for the parent to read."""
    exit_with_parent()
    args = json.loads(argv[0])
    budget = NanoBudget(**{k: tuple(v) if isinstance(v, list) else v for k, v in args["budget"].items()})
    folder = Path(args["folder"])
    config = HealthGPTConfig.from_dict(args["config"])
    metrics = timed(pretrain_vqgan_part, config, budget, args["seed"], folder, args["progress"], args["threads"])
    write_atomic(folder / WORKER_RESULT, json.dumps(metrics))  # the parent reads it whole or not at all


if __name__ == "__main__":
    main(sys.argv[1:])
