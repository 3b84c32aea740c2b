"""Where jobs run. A runner takes due jobs from the queue and runs each through hubplugin.watch.jobrun.run_job; the
SQLite queue stays the record of every job whatever runs it.

- `LocalRunner` (default): one worker process beside the endpoint (hubplugin.watch.worker), one job at a time.
- `RayRunner` (hubplugin.watch.ray_runner): each job a Ray task with a resource request, on a Ray cluster.

Both are driven by the dispatcher thread of `hubc watch` calling `tick()`; `stop()` ends their work, putting running
jobs back in the queue.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Protocol

from hubplugin.watch.config import WatchConfig
from hubplugin.watch.queue import JobQueue

__all__ = ["LocalRunner", "Runner", "make_runner"]


class Runner(Protocol):
    """What the dispatcher needs of a runner."""

    name: str

    def start(self) -> None:
        """Connect or check what the runner needs, before the endpoint accepts deliveries (fail fast)."""

    def tick(self, queue: JobQueue) -> None:
        """Start due jobs while there is room, and collect the finished ones."""

    def stop(self, queue: JobQueue) -> None:
        """Stop the jobs in flight and put them back in the queue."""


class LocalRunner:
    """A worker process (`python -m hubplugin.watch.worker`) beside the endpoint, running one job at a time; started
    when a job is due, restarted when it dies (its job is then taken back by the dispatcher and retried)."""

    name = "local"

    def __init__(self, config: WatchConfig, log: logging.Logger) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from hubplugin import hub

        # Jobs push: a missing or read-only token fails now, not after the first compression.
        hub.check_push_access(f"{self.config.variant_owner or 'hubc'}/access-check")

    def tick(self, queue: JobQueue) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.log.warning("worker %d exited (%s)", self.proc.pid,
                             f"killed by signal {-code}" if code < 0 else f"exit code {code}")
            self._kill_group(self.proc.pid)
            self.proc = None
        if self.proc is None and queue.due() > 0:
            from serving.processes import PDEATHSIG_LAUNCHER

            args = [sys.executable, "-m", "hubplugin.watch.worker", "--queue", str(queue.path),
                    "--lease-seconds", str(self.config.lease_seconds)]
            # The worker gets SIGTERM if hubc watch dies, and runs in its own process group, so that whatever it
            # leaves behind when killed (a vLLM server) is stopped with one killpg.
            # Its progress goes to the log line by line; progress bars would fill it with carriage returns.
            env = {"TQDM_DISABLE": "1", **os.environ}
            self.proc = subprocess.Popen([sys.executable, "-c", PDEATHSIG_LAUNCHER, str(os.getpid()), *args],
                                         start_new_session=True, env=env)
            self.log.info("worker %d started", self.proc.pid)

    def stop(self, queue: JobQueue) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # the worker puts its job back in the queue
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.log.warning("worker %d did not stop in 60 s: killed", self.proc.pid)
        self._kill_group(self.proc.pid)
        self.proc.wait()

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def make_runner(config: WatchConfig, log: logging.Logger) -> Runner:
    """The runner watch.yaml asks for."""
    if config.runner.kind == "ray":
        from hubplugin.watch.ray_runner import RayRunner

        return RayRunner(config, log)
    return LocalRunner(config, log)
