"""A recipe's worker processes end when the recipe is killed by a signal its clean-up never sees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The worker: watches its parent when started with worker_env, and writes a heartbeat while it lives.
WORKER = """
import sys, time
from pathlib import Path
from healthgpt.workers import exit_with_parent
exit_with_parent(0.05)
beat = Path(sys.argv[1])
while True:
    beat.write_text(repr(time.monotonic()))
    time.sleep(0.05)
"""
# The recipe: starts the worker (watched or not) and waits, as run_stages and pretrain_nano do.
RECIPE = """
import subprocess, sys, time
from healthgpt.workers import worker_env
env = worker_env() if sys.argv[2] == "watched" else None
worker = subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[1]], env=env)
print(worker.pid, flush=True)
time.sleep(300)
"""


def _alive_after_the_recipe_is_terminated(tmp_path: Path, mode: str) -> bool:
    beat = tmp_path / f"{mode}.beat"
    recipe = subprocess.Popen(
        [sys.executable, "-c", RECIPE, str(beat), mode, WORKER], stdout=subprocess.PIPE, text=True
    )
    worker = int(recipe.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not beat.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert beat.exists(), "the worker never started"
        recipe.send_signal(signal.SIGTERM)  # Python's default: die at once, no finally blocks
        recipe.wait(timeout=30)
        time.sleep(1.0)  # twenty of the worker's checks
        before = beat.read_text()
        time.sleep(0.5)
        return beat.read_text() != before
    finally:
        recipe.kill()
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_watched_worker_exits_when_its_parent_is_terminated_and_an_unwatched_one_would_not(tmp_path: Path) -> None:
    assert _alive_after_the_recipe_is_terminated(tmp_path, "unwatched")  # the failure the watch prevents
    assert not _alive_after_the_recipe_is_terminated(tmp_path, "watched")
