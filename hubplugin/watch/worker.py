"""The local worker: a process beside `hubc watch` that runs queued jobs one at a time, holding each job's lease
while it runs. `hubc watch` starts it (hubplugin.watch.runners.LocalRunner); it dies with `hubc watch`.

SIGTERM (hubc watch stopping) unwinds the job like Ctrl-C (optimize removes its staging folder, vLLM servers are
stopped) and puts it back in the queue without counting the attempt. A lost lease (the job was cancelled, or taken
back after this worker stalled) interrupts the job the same way, and nothing is recorded for it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

from hubplugin.cli_common import Terminated
from hubplugin.watch.jobrun import JobSpec, is_permanent, one_line, run_job
from hubplugin.watch.lease import Heartbeat, worker_id
from hubplugin.watch.queue import JobQueue

__all__ = ["run_worker"]


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} worker: {message}", file=sys.stderr, flush=True)


def _on_sigterm(signum, frame):
    raise Terminated


def run_worker(queue_path: str, lease_seconds: float, poll_seconds: float = 0.5) -> int:
    """Claim and run jobs until SIGTERM; returns the exit code."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A lost lease interrupts the job with SIGINT, even where the worker was started with SIGINT ignored
    # (`hubc watch &` in a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    queue = JobQueue(queue_path)
    me = worker_id()
    while True:
        try:
            job = queue.claim(me, lease_seconds)
            if job is None:
                time.sleep(poll_seconds)
                continue
            _run_one(queue, job, me, lease_seconds)
        except Terminated:
            return 143
        except KeyboardInterrupt:  # a lease lost just as its job ended
            continue


def _run_one(queue: JobQueue, job, me: str, lease_seconds: float) -> None:
    spec = JobSpec.of(job)
    ran_on = {"runner": "local", "host": socket.gethostname(), "pid": int(me.split(":")[-2])}
    _say(f"job {job.id}: {job.repo}@{job.sha[:12]} for {job.target} -> {job.variant_repo} "
         f"(attempt {job.attempts}/{job.max_attempts})")
    # A real SIGINT, not _thread.interrupt_main: it also breaks a main thread blocked in a network read.
    beat = Heartbeat(lambda: queue.heartbeat(job.id, me, lease_seconds), lease_seconds,
                     lambda: os.kill(os.getpid(), signal.SIGINT))
    beat.start()

    def progress(message: str) -> None:
        queue.set_stage(job.id, me, message)
        _say(f"job {job.id}: {message}")

    try:
        outcome = run_job(spec, progress)
    except Terminated:
        beat.stop()
        if not beat.lost:
            queue.release(job.id, me, "hubc watch stopped mid-job; queued again")
            _say(f"job {job.id}: stopped with hubc watch; queued again")
        raise
    except KeyboardInterrupt:
        beat.stop()
        if not beat.lost:
            raise Terminated from None  # Ctrl-C on the worker itself: stop like SIGTERM
        _say(f"job {job.id}: stopped: it was cancelled or taken back (lease lost)")
        return
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job, in one line
        beat.stop()
        state = queue.fail(job.id, me, one_line(exc), permanent=is_permanent(exc), ran_on=ran_on)
        _say(f"job {job.id}: {'failed' if state == 'failed' else 'will be retried'}: {one_line(exc)}")
        return
    beat.stop()
    if queue.finish(job.id, me, url=outcome.url, commit_sha=outcome.commit_sha, reused=outcome.reused,
                    ran_on=ran_on):
        _say(f"job {job.id}: done: {outcome.url} ({outcome.commit_sha[:12]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hubplugin.watch.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--queue", required=True, help="the SQLite job queue")
    parser.add_argument("--lease-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    return run_worker(args.queue, args.lease_seconds)


if __name__ == "__main__":
    sys.exit(main())
