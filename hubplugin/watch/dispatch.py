"""The dispatcher: a thread of `hubc watch` that turns recorded deliveries into jobs and keeps jobs moving.

Each tick it (1) screens new deliveries against the Hub — a repo whose card says it is a hubc variant, a commit that
is no longer main's head, a repo without config.json make no job — and creates one job per target for the rest,
superseding queued jobs of older commits; (2) takes back running jobs whose worker is gone or whose lease lapsed
(a failed attempt, retried with backoff); (3) lets the runner start and collect jobs. The endpoint never waits for
any of it.
"""

from __future__ import annotations

import logging
import threading
import time

from hubplugin.watch.config import WatchConfig
from hubplugin.watch.jobrun import one_line
from hubplugin.watch.lease import owner_alive, worker_id
from hubplugin.watch.queue import JobQueue
from hubplugin.watch.runners import Runner

__all__ = ["Dispatcher"]

SCREEN_BATCH = 16
SCREEN_TRIES = 8
"""Tries to read a delivery's repo from the Hub (backoff 5 s, doubling) before it is dropped with the reason."""


class Dispatcher:
    """Runs `tick()` every `interval` seconds in a thread until `stop()`."""

    def __init__(self, config: WatchConfig, queue: JobQueue, runner: Runner | None, log: logging.Logger,
                 interval: float = 0.2) -> None:
        self.config, self.queue, self.runner, self.log, self.interval = config, queue, runner, log, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hubc-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception as exc:  # noqa: BLE001 - one bad tick (a locked database, a Hub hiccup) must not stop it
                    self.log.error("dispatcher: %s", one_line(exc))
                self._stop.wait(self.interval)
        finally:
            if self.runner is not None:  # from this thread: the local worker was started by it
                self.runner.stop(self.queue)

    def tick(self) -> None:
        self.screen()
        if self.runner is not None:
            self.reclaim()
            self.runner.tick(self.queue)

    def screen(self) -> None:
        from hubplugin.watch.hubio import HubUnavailable, screen

        # A batch per tick, so a slow Hub never keeps the runner from renewing its leases for long.
        for repo, sha, tries in self.queue.pending_deliveries()[:SCREEN_BATCH]:
            try:
                reason = screen(repo, sha)
            except HubUnavailable as exc:
                if tries + 1 >= SCREEN_TRIES:
                    self.queue.settle_delivery(repo, sha, "ignored", f"{exc}; gave up after {SCREEN_TRIES} tries")
                    self.log.warning("delivery %s@%s dropped: %s (after %d tries)", repo, sha[:12], exc, SCREEN_TRIES)
                else:
                    self.queue.defer_delivery(repo, sha, str(exc), delay=5.0 * 2 ** tries)
                    self.log.warning("delivery %s@%s: %s; trying again", repo, sha[:12], exc)
                continue
            if reason is not None:
                self.queue.settle_delivery(repo, sha, "ignored", reason)
                self.log.info("delivery %s@%s ignored: %s", repo, sha[:12], reason)
                continue
            variants = [(spec, self.config.variant_repo(repo, spec)) for spec in self.config.targets]
            created, superseded = self.queue.create_jobs(repo, sha, variants, private=self.config.private,
                                                         retry=self.config.retry)
            note = f"jobs {', '.join(map(str, created))}" if created else "no new job (already queued)"
            if superseded:
                note += f"; superseded queued jobs {', '.join(map(str, superseded))}"
            self.queue.settle_delivery(repo, sha, "accepted", note)
            self.log.info("delivery %s@%s: %s", repo, sha[:12], note)

    def reclaim(self) -> None:
        """Running jobs whose owner died (same machine) or whose lease lapsed go back to the queue as a failed
        attempt."""
        now, me = time.time(), worker_id()
        for job in self.queue.running():
            if job.owner == me:
                continue  # this process's own (Ray) jobs: its runner renews and settles them
            alive = owner_alive(job.owner) if job.owner else False
            if alive is False or (job.lease_until or 0) < now:
                why = "its worker died" if alive is False else "its lease lapsed"
                reason = f"attempt {job.attempts} stopped: {why} (at: {job.stage or 'start'})"
                state = self.queue.fail(job.id, job.owner or "", reason)
                if state is not None:
                    self.log.warning("job %d: %s; %s", job.id, reason,
                                     "failed" if state == "failed" else "will be retried")
