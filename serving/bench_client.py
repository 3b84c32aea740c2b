"""The processes around a benchmark run: vLLM's `bench serve` client, freezing idle servers (with a watchdog for
when hubc dies), sampling a server's memory, waiting for it to go quiet, and signals that unwind the run."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Self

import psutil

from serving.errors import ServingError
from serving.server import _PDEATHSIG_LAUNCHER, VllmServer, failure_reason

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class BenchError(ServingError):
    """`vllm bench serve` failed, or requests failed during a benchmark."""


class BenchClient:
    """One `python -m serving.vllm_cli --serve-jobs` process: vLLM's `bench serve`, run once per job."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._ready = False
        self._busy = False
        self._log: IO[bytes] | None = None

    def __enter__(self) -> Self:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer is a local folder; never look for the Hub
        args = [sys.executable, "-m", "serving.vllm_cli", "--serve-jobs"]
        if sys.platform == "linux" and threading.current_thread() is threading.main_thread():
            args = [sys.executable, "-c", _PDEATHSIG_LAUNCHER, str(os.getpid()), *args]  # dies with hubc
        self._log = open(self.log_path, "ab")  # closed in __exit__
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
            start_new_session=True,  # a terminal's SIGINT is hubc's to handle; hubc stops this process
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _answer(self, deadline: float, what: str) -> dict[str, Any]:
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{what} did not finish in time", hint=f"its log: {self.log_path}"
                    ) from None
                continue
            if line is None:
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                reason = failure_reason(log) or "it exited without a reason"
                raise BenchError(f"the vllm bench serve client died during {what}: {reason}",
                                 hint=f"its log: {self.log_path}")  # fmt: skip
            with contextlib.suppress(ValueError):
                return dict(json.loads(line))

    def run(self, argv: list[str], timeout_s: float, what: str) -> None:
        """Run one `vllm bench serve` with these arguments; raise BenchError with vLLM's reason if it fails."""
        assert self._proc is not None and self._proc.stdin is not None
        deadline = time.monotonic() + timeout_s
        if not self._ready:
            self._answer(deadline, "the start of vllm bench serve")
            self._ready = True
        self._proc.stdin.write(json.dumps({"argv": argv}) + "\n")
        self._proc.stdin.flush()
        self._busy = True
        answer = self._answer(deadline, what)
        self._busy = False
        if not answer.get("ok"):
            raise BenchError(f"{what} failed: {answer.get('error')}", hint=f"its log: {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close_on_error(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        """Exit callback: stop the client when a run is being abandoned (an error or an interrupt)."""
        if exc_type is not None:
            self.close()

    def close(self) -> None:
        """Stop the client (at once if a benchmark is running); idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.close()  # a finished client exits on EOF
            # An idle client exits on EOF; one in the middle of a benchmark is stopped at once.
            for sig, wait in (
                (None, 0.0 if self._busy else 2.0),
                (signal.SIGTERM, 5.0),
                (signal.SIGKILL, 5.0),
            ):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait)
                    break
        if self._log is not None:
            self._log.close()
            self._log = None


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
# hubc's death sends the API server (PR_SET_PDEATHSIG, serving/server.py), so without it a SIGKILLed hubc would leave
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
