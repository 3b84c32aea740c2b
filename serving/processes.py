"""A vLLM server's process tree: every descendant noted while it runs, the whole tree killed on stop (SIGTERM, a
grace period, SIGKILL), and the shared memory it leaves behind unlinked.

The server runs in its own session (pid == pgid), so one `killpg` reaches the API server, its EngineCore and its
workers; processes that left the group (setsid) or lost their parent are found through the descendants noted before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from serving.errors import ServingError


class ProcessTree:
    """The processes of one server started with `start_new_session=True`."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._pgid = proc.pid  # session leader: pid == pgid
        self._known: dict[int, psutil.Process] = {}

    def remember(self) -> None:
        """Note every descendant now, so ones that later leave the process group (setsid) or lose their parent
        can still be killed."""
        try:
            root = psutil.Process(self._proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                self._known.setdefault(proc.pid, proc)
        except psutil.Error:
            pass

    def kill(self, grace_s: float) -> None:
        """SIGTERM the whole tree, SIGKILL what is left after `grace_s`, then unlink the shared memory it mapped.
        Raises ServingError if a process survives SIGKILL."""
        self.remember()
        # Killed processes (and the multiprocessing resource tracker, which is SIGKILLed when it outlives the
        # grace period) leave vLLM's shared memory behind, a 160 MB ring buffer when stopped mid-start: note what
        # the tree maps while it dies, and unlink what is left once it is dead.
        segments = _shared_memory_of(self.survivors())
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (alive := self.survivors()):
            segments |= _shared_memory_of(alive)
            self._remember_children_of_known()
            time.sleep(0.2)
        if stubborn := self.survivors():
            segments |= _shared_memory_of(stubborn)
            self._signal_all(signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and self.survivors():
                time.sleep(0.1)
        try:
            self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        left = self.survivors()
        if left:
            raise ServingError(
                f"vLLM processes survived SIGKILL: {', '.join(map(str, left))}",
                hint="kill them by hand",
            )
        for segment in segments:
            with contextlib.suppress(OSError):
                segment.unlink(missing_ok=True)

    def survivors(self) -> list[int]:
        """Pids of the tree still running: known descendants, and anything left in the server's process group."""
        self._proc.poll()  # reap the root so it does not linger as a zombie
        alive = set()
        for proc in self._known.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.add(proc.pid)
            except psutil.Error:
                pass
        return sorted(alive | _group_members(self._pgid))

    def _remember_children_of_known(self) -> None:
        for proc in list(self._known.values()):
            try:
                for child in proc.children(recursive=True):
                    self._known.setdefault(child.pid, child)
            except psutil.Error:
                pass

    def _signal_all(self, sig: int) -> None:
        try:
            os.killpg(self._pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for proc in self._known.values():
            try:
                if proc.is_running():  # psutil checks the pid was not reused
                    proc.send_signal(sig)
            except psutil.Error:
                pass


def _shared_memory_of(pids: list[int]) -> set[Path]:
    """Files under /dev/shm (POSIX shared memory, semaphores) these processes map or hold open (Linux /proc)."""
    segments = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                _, _, path = line.partition("/dev/shm/")
                if path and not path.endswith(" (deleted)"):
                    segments.add(Path("/dev/shm", path))
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("/dev/shm/") and not target.endswith(" (deleted)"):
                        segments.add(Path(target))
    return segments


def _group_members(pgid: int) -> set[int]:
    members = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.add(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return members
