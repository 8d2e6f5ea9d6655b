"""Issue 17's figures of one or more models on held-out phantoms, side by side with the goals: what the VQGAN alone
keeps, CT<->MRI, reconstruction, super-resolution against bicubic, report-to-CXR findings, closed questions.

    python bench/phantom_goals.py [--models nano] [--cases 50] [--guidance 1.5] [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from healthgpt.api import HealthGPT
from healthgpt.evaluation.phantom_goals import GOALS, goals_met, phantom_goals
from healthgpt.io.atomic import write_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["nano"], help="embedded names or bundle folders")
    parser.add_argument("--cases", type=int, default=50, help="held-out head phantoms (and as many chest films)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--guidance", type=float, help="classifier-free guidance of every generated image (default: each model's own)"
    )
    parser.add_argument("--json", type=Path, help="write every model's figures here")
    args = parser.parse_args()
    figures, met, seconds = {}, {}, {}
    for name in args.models:
        start = time.perf_counter()
        model = HealthGPT.from_pretrained(name)
        figures[name] = phantom_goals(model, n=args.cases, seed=args.seed, guidance_scale=args.guidance)
        met[name], seconds[name] = goals_met(figures[name]), time.perf_counter() - start
    width = max(len(path) for path, _, _ in GOALS)
    scales = ", ".join(f"{name} {figures[name]['guidance_scale']:g}" for name in args.models)
    print(f"{args.cases} held-out cases, seed {args.seed}, guidance {scales}; SSIM x100")
    print(f"{'figure':<{width}}  goal       " + "".join(f"{name:>16}" for name in args.models))
    for path, op, goal in GOALS:
        task, figure = path.split(".")
        cells = "".join(f"{figures[n][task][figure]:>12.3f} {'ok' if met[n][path] else '--':>3}" for n in args.models)
        print(f"{path:<{width}}  {op:>2} {goal:<7g}" + cells)
    print("goals met: " + ", ".join(f"{n} {sum(met[n].values())}/{len(GOALS)} ({seconds[n]:.0f} s)" for n in met))
    if args.json:
        write_atomic(args.json, json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
