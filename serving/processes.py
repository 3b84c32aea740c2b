"""The processes of vLLM servers and benchmarks: a server's process tree (every descendant noted while it runs, the
whole tree killed on stop: SIGTERM, a grace period, SIGKILL; the shared memory it leaves behind unlinked), a
launcher that makes a child die with hubc, freezing idle servers (with a watchdog for when hubc dies), sampling a
server's memory, waiting for it to go quiet, and signals that unwind a run.

The server runs in its own session (pid == pgid), so one `killpg` reaches the API server, its EngineCore and its
workers; processes that left the group (setsid) or lost their parent are found through the descendants noted before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Self

import psutil

from serving.errors import ServingError

if TYPE_CHECKING:
    from serving.server import VllmServer

PDEATHSIG_LAUNCHER = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)
"""`python -c` code that makes the command it runs get SIGTERM when hubc dies (PR_SET_PDEATHSIG, which survives
execve). argv: hubc's pid, then the command. Linux only, and only from hubc's main thread (the signal is tied to
the thread that started the child)."""


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


class PeakMemory:
    """Samples the memory of a process tree in a thread; `peak_mib` is the largest sum seen."""

    def __init__(self, pid: int | None, interval_s: float = 0.25) -> None:
        self._pid = pid
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.peak_mib = 0.0

    def __enter__(self) -> Self:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> None:
        if self._pid is None:
            return
        total = sum(tree_memory_bytes(p) for p in process_tree(self._pid))
        self.peak_mib = max(self.peak_mib, total / 2**20)


def tree_memory_bytes(proc: psutil.Process) -> int:
    """Proportional set size of one process (shared pages split among their users, so a tree's sum counts the
    shared libraries once), from /proc/PID/smaps_rollup; its RSS where that is unreadable."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(psutil.Error):
        return int(proc.memory_info().rss)
    return 0


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def quiesce(server: VllmServer, max_cpu: float, timeout_s: float, window_s: float = 0.3) -> bool:
    """Wait until the server's process tree uses less than `max_cpu` of one core; False after `timeout_s`."""
    procs = process_tree(server.pid) if server.pid is not None else []
    deadline = time.monotonic() + timeout_s
    while True:
        before = _cpu_seconds(procs)
        time.sleep(window_s)
        if (_cpu_seconds(procs) - before) / window_s < max_cpu:
            return True
        if time.monotonic() > deadline:
            return False


# Runs beside hubc while servers may be frozen. When its stdin closes (hubc finished, or died in any way, SIGKILL
# included) it SIGCONTs every process group it was told about: a stopped process does not act on the SIGTERM that
# hubc's death sends the API server (PR_SET_PDEATHSIG, PDEATHSIG_LAUNCHER), so without it a SIGKILLed hubc would leave
# stopped servers behind for good.
_THAW_ON_EXIT = (
    "import os, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "groups = [int(line) for line in sys.stdin]\n"
    "for group in groups:\n"
    "    try:\n"
    "        os.killpg(group, signal.SIGCONT)\n"
    "    except OSError:\n"
    "        pass\n"
)


class Freezer:
    """SIGSTOPs and SIGCONTs servers' process trees (a stopped process uses no CPU and never wakes up); a small
    watchdog process resumes every frozen server if hubc dies without doing it."""

    def __init__(self) -> None:
        self._frozen: dict[int, list[psutil.Process]] = {}
        self._watchdog: subprocess.Popen[str] | None = None

    def __enter__(self) -> Self:
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _THAW_ON_EXIT],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # never hold hubc's output pipes open
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in list(self._frozen):
            self._resume_pid(pid)
        if self._watchdog is not None:
            with contextlib.suppress(OSError, ValueError):
                assert self._watchdog.stdin is not None
                self._watchdog.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5.0)

    def freeze(self, server: VllmServer) -> None:
        """Stop every process of the server until `resume`."""
        if server.pid is None or server.pid in self._frozen:
            return
        if self._watchdog is not None and self._watchdog.stdin is not None:
            self._watchdog.stdin.write(f"{server.pid}\n")  # the API server leads its process group
            self._watchdog.stdin.flush()
        procs = process_tree(server.pid)
        self._frozen[server.pid] = procs
        signal_procs(procs, signal.SIGSTOP)

    def resume(self, server: VllmServer) -> None:
        """Let a frozen server run again (no-op if it is not frozen)."""
        if server.pid is not None:
            self._resume_pid(server.pid)

    def _resume_pid(self, pid: int) -> None:
        procs = self._frozen.pop(pid, None)
        if procs:
            signal_procs(procs, signal.SIGCONT)


def signal_procs(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)  # psutil refuses a pid that was reused


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit (SIGINT already raises KeyboardInterrupt) while a run is going, so the
    client and every server are stopped even between server contexts; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {}
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
