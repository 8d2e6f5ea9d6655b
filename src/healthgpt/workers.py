"""Worker processes that end with the process that started them.

The recipes train parts side by side in `python -m ...` children. When the parent dies of a signal Python does not
turn into an exception (SIGTERM from a scheduler or `timeout`, SIGKILL), its clean-up never runs, and a child would
train on for many minutes and then write into a folder the user may have started again. A child started with
`worker_env` therefore watches its parent and exits once it is gone. Written here because nothing maintained covers
`subprocess` children portably: Linux's PR_SET_PDEATHSIG needs ctypes and a pre-exec hook, and `multiprocessing`'s
daemon flag applies only to its own processes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

PARENT_VARIABLE = "HEALTHGPT_WORKER_PARENT"


def worker_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) naming this process as the parent the worker must not outlive."""
    return {**(os.environ if env is None else env), PARENT_VARIABLE: str(os.getpid())}


def exit_with_parent(interval: float = 1.0) -> None:
    """In a worker started with `worker_env`, a daemon thread ends the process (exit status 1) within `interval`
    seconds of its parent's death; elsewhere nothing. The variable is removed, so the worker's own children do not
    watch the wrong parent."""
    parent = os.environ.pop(PARENT_VARIABLE, None)
    if parent is None:
        return
    pid = int(parent)

    def watch() -> None:
        while os.getppid() == pid:  # a child whose parent dies is handed to another process
            time.sleep(interval)
        log.error("worker %d: its parent process %d is gone; exiting", os.getpid(), pid)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
