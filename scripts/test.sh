#!/usr/bin/env bash
# Install healthgpt with its test dependencies (CPU torch, Debian's Chromium for the browser test) and run the tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: Debian's chromium is not installed (the browser test will say so)" >&2
  fi
fi
# torch first and pinned: the CPU build from the local wheel store, never a CUDA wheel.
python -m pip install -q torch==2.13.0 -e ".[test]"
python -m pytest "$@"
