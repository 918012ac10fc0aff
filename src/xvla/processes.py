"""How xvla's child processes end with their parent: a stopped run leaves nothing training behind.

SIGTERM's default action ends a Python process without unwinding, so its children (torchrun and its training
workers, simulator pools, experiment cells) would go on running. `exit_on_sigterm` turns SIGTERM into SystemExit,
so every `finally` and context manager runs; `run_process_group` and `stop_pool` are those cleanups for the two
kinds of children xvla starts. Standard library only: `xvla.cli` calls this before importing anything heavy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor


def _sigterm_to_exit(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit (exit code 143) in this process; only the main thread can install it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_to_exit)


def run_process_group(cmd: list[str], env: dict[str, str], grace_s: float = 10.0) -> int:
    """Run `cmd` in a process group of its own and wait for its exit code. However the wait ends early (an
    error, Ctrl-C, SystemExit from SIGTERM) the whole group is stopped, SIGTERM and after `grace_s` SIGKILL, so no
    process of the group outlives the wait."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
            # whatever is left, workers whose launcher has already gone included
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # nothing left in the group
        os.killpg(pgid, sig)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Terminate a process pool's workers now: `shutdown` (and leaving its `with` block) waits for the running
    tasks, which for an experiment cell is minutes of training after its grid was stopped. Each worker gets
    SIGTERM, which `exit_on_sigterm` (the pool's initializer) turns into an unwinding exit."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(timeout=30)
        if worker.is_alive():
            worker.kill()
