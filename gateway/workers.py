"""``gateway run --workers N``: N processes sharing the listeners through SO_REUSEPORT.

The parent only supervises: it prepares the Prometheus multiprocess directory
before any worker imports prometheus-client, starts the workers as fresh
interpreters (nothing inherited half-initialised from a fork), forwards
SIGTERM/SIGINT, marks dead workers so their live gauges stop counting, and
restarts a worker that dies unexpectedly.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["ADMIN_ENV", "WORKER_ENV", "supervise"]

log = logging.getLogger("gateway.workers")
WORKER_ENV = "GATEWAY_WORKER"
ADMIN_ENV = "GATEWAY_SERVE_ADMIN"
_RESTART_BACKOFF_SECONDS = 1.0


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]


def supervise(config_path: str, workers: int) -> int:
    """Run ``workers`` worker processes until a signal; return the exit code."""
    metrics_dir = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), WORKER_ENV: "1"}
    command = [sys.executable, "-m", "gateway.cli", "run", "--config", config_path]
    stopping = False

    def spawn(index: int) -> subprocess.Popen[bytes]:
        # Only worker 0 serves the admin listener: console sessions live in its
        # memory, and a sign-in must not be lost to another worker's socket.
        child_env = {**env, ADMIN_ENV: "1" if index == 0 else "0"}
        return subprocess.Popen(command, env=child_env)  # noqa: S603 - our own module

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    children = [spawn(i) for i in range(workers)]
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log.info("started %d workers", workers, extra={"fields": {"pids": [c.pid for c in children]}})
    exit_code = 0
    try:
        while children:
            time.sleep(0.2)
            for index, child in enumerate(list(children)):
                code = child.poll()
                if code is None:
                    continue
                _mark_dead(child.pid, metrics_dir)
                if stopping:
                    children.remove(child)
                    # A worker still starting when the signal came dies of it: that is
                    # a clean stop too, not a failure.
                    if code in (-signal.SIGTERM, -signal.SIGINT):
                        code = 0
                    exit_code = exit_code or code
                    continue
                log.error("worker %d exited with %d; restarting it", child.pid, code)
                time.sleep(_RESTART_BACKOFF_SECONDS)
                children[index] = spawn(index)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return exit_code
