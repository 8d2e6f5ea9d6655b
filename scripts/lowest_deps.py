"""Install the lowest versions `pyproject.toml` declares for the main dependencies into a fresh virtual environment
and run the quick test suite there, so the declared floors are floors that hold.

torch stays at the local CPU build (2.13.0): every other torch release on the registry is a CUDA build of several GB.

    python scripts/lowest_deps.py [--venv /tmp/healthgpt-lowest] [pytest arguments...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import tomllib
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"


def lowest_release(name: str, floor: str) -> str:
    """The oldest release of `name` on the package registry that satisfies `>= floor`."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True, check=True
    ).stdout
    listed = re.search(r"Available versions: (.*)", out)
    if listed is None:
        raise SystemExit(f"the registry lists no releases of {name}")
    releases = [Version(v) for v in listed.group(1).split(", ")]
    return str(min(v for v in releases if v >= Version(floor) and not v.is_prerelease))


def lowest_pins() -> list[str]:
    """`name==oldest release >= floor` for every main dependency with a `>=` floor (torch excepted)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for spec in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", spec.replace(" ", ""))
        if match and match.group(1) != "torch":
            pins.append(f"{match.group(1)}=={lowest_release(match.group(1), match.group(2))}")
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/healthgpt-lowest"))
    args, pytest_args = parser.parse_known_args()
    venv.create(args.venv, with_pip=True, clear=True)
    python = str(args.venv / "bin" / "python")
    pins = lowest_pins()
    print("lowest declared versions:", " ".join(pins), flush=True)
    install = [python, "-m", "pip", "install", "-q", TORCH, *pins, "-e", f"{ROOT}[test]"]
    subprocess.run(install, check=True)
    tests = [python, "-m", "pytest", "-m", "not slow", "-q", "-p", "no:cacheprovider", *pytest_args]
    env = {**os.environ, "PATH": f"{args.venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}  # its `healthgpt` script
    return subprocess.run(tests, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
