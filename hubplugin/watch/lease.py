"""Who holds a running job, and keeping that lease alive.

A lease owner is `host:pid:start-time`: on the same machine, a dead owner is recognised at once (no waiting for the
lease to lapse), and a reused pid is not mistaken for the owner. On another machine only the lease's expiry tells.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

import psutil

__all__ = ["Heartbeat", "owner_alive", "worker_id"]


def worker_id(pid: int | None = None) -> str:
    """This process's (or `pid`'s) lease owner name."""
    proc = psutil.Process(pid or os.getpid())
    return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.2f}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process named by `owner` still runs; None when it is on another machine (only its lease can
    tell)."""
    parts = owner.split(":")
    if len(parts) < 3 or ":".join(parts[:-2]) != socket.gethostname():
        return None
    try:
        proc = psutil.Process(int(parts[-2]))
        # A killed worker stays a zombie until its parent (or init) reaps it: it runs nothing.
        return f"{proc.create_time():.2f}" == parts[-1] and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False


class Heartbeat:
    """Renews a job's lease every third of its length in a thread; when renewing fails (the job was cancelled or
    taken back), calls `on_lost` once (the worker then stops the job)."""

    def __init__(self, renew: Callable[[], bool], lease_seconds: float, on_lost: Callable[[], None]) -> None:
        self._renew, self._on_lost = renew, on_lost
        self._interval = max(0.2, lease_seconds / 3)
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name="hubc-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                held = self._renew()
            except Exception:  # noqa: BLE001, S112 - a busy or locked database: try again at the next beat
                continue
            if not held:
                self.lost = True
                self._on_lost()
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
