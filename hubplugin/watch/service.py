"""`hubc watch`: the endpoint (uvicorn serving hubplugin.watch.app), the dispatcher thread and the runner, on one
SQLite queue. Everything that can be wrong (the secret, the port, the token, the Ray cluster) fails before the
endpoint accepts its first delivery."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable

from hubplugin.watch.config import WatchConfig
from hubplugin.watch.errors import WatchError

__all__ = ["serve", "watch_logger"]


def watch_logger() -> logging.Logger:
    """One line per event on stderr, with the time."""
    log = logging.getLogger("hubc.watch")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise WatchError(f"cannot listen on {host}:{port} ({exc.strerror})",
                         hint="choose another --port, or stop what uses it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config: WatchConfig, *, host: str, port: int, run_jobs: bool = True,
          say: Callable[[str], None] = print) -> None:
    """Run the endpoint until SIGINT/SIGTERM; on the way out the runner puts its running jobs back in the queue."""
    secret = os.environ.get(config.secret_env)
    if not secret:
        raise WatchError(f"{config.secret_env} is not set",
                         hint=f"export {config.secret_env}=... with the secret of the Hub webhook "
                              "(watch.yaml `secret_env` names another variable)")
    import uvicorn

    from hubplugin.watch.app import create_app
    from hubplugin.watch.dispatch import Dispatcher
    from hubplugin.watch.queue import JobQueue
    from hubplugin.watch.runners import make_runner

    log = watch_logger()
    queue = JobQueue(config.queue_path())
    runner = make_runner(config, log) if run_jobs else None
    if runner is not None:
        runner.start()
    sock = _listen(host, port)
    dispatcher = Dispatcher(config, queue, runner, log)
    server = uvicorn.Server(uvicorn.Config(create_app(config, queue, secret, log), log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    jobs = f"runner: {runner.name}" if runner else "jobs are queued, not run (--no-run)"
    say(f"listening on http://{shown}:{bound}/webhook (queue: {queue.path}; {jobs})")
    dispatcher.start()
    try:
        server.run(sockets=[sock])
    finally:
        dispatcher.stop()
        sock.close()
