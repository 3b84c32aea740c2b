"""vLLM's own `vllm bench serve`, as one client process that runs benchmark after benchmark (vLLM imported once)."""

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
from pathlib import Path
from typing import IO, Any, Self

from serving.errors import ServingError
from serving.logs import failure_reason
from serving.processes import PDEATHSIG_LAUNCHER

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
            args = [sys.executable, "-c", PDEATHSIG_LAUNCHER, str(os.getpid()), *args]  # dies with hubc
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
