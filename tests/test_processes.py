"""xvla.processes: a stopped xvla leaves no child process running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

from xvla.processes import exit_on_sigterm, stop_pool

REPO = Path(__file__).resolve().parents[1]
# Process states are read from /proc, and process groups are POSIX.
pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc (Linux)")


def _alive(pid: int) -> bool:
    """Running (a zombie counts as gone: nothing may reap orphans inside a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_to_the_launcher_stops_its_whole_process_group(tmp_path: Path) -> None:
    """A launcher killed with SIGTERM (the way `kill` stops an `xvla demo`) takes torchrun and the training
    workers with it: before, the workers of a killed demo went on training beside the next run."""
    pids = tmp_path / "pids"
    worker = (
        "import subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pids)!r}, 'w').write(f'{{g.pid}}\\n'); time.sleep(120)"
    )
    launcher = (
        "import os, sys; from xvla.processes import exit_on_sigterm, run_process_group; "
        "exit_on_sigterm(); "
        f"run_process_group([sys.executable, '-c', {worker!r}], dict(os.environ))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher], env={**os.environ, "PYTHONPATH": str(REPO / "src")}
    )
    for _ in range(300):
        if pids.exists() and pids.read_text().endswith("\n"):
            break
        time.sleep(0.1)
    grandchild = int(pids.read_text())
    assert _alive(grandchild)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    for _ in range(100):
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_the_cli_turns_sigterm_into_an_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from xvla import cli, processes

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=lambda args: 0)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main([]) == 0
        assert signal.getsignal(signal.SIGTERM) is processes._sigterm_to_exit
    finally:
        signal.signal(signal.SIGTERM, previous)


def _mark_then_sleep(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(120)


def test_stop_pool_ends_running_tasks_now(tmp_path: Path) -> None:
    """Leaving a ProcessPoolExecutor waits for its running tasks (an experiment cell: minutes of training after
    its grid was stopped); stop_pool ends them at once, the task unwinding through SystemExit."""
    marker = tmp_path / "running"
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=exit_on_sigterm)
    future = pool.submit(_mark_then_sleep, str(marker))
    for _ in range(600):
        if marker.exists():
            break
        time.sleep(0.05)
    worker = int(marker.read_text())
    start = time.perf_counter()
    stop_pool(pool)
    assert time.perf_counter() - start < 30
    assert isinstance(future.exception(timeout=5), SystemExit)
    assert not _alive(worker)
