"""The job queue: one SQLite file (WAL mode) that is the single record of what the Hub asked for (deliveries), what
is to be built (jobs, keyed by repo, commit sha, target and recipe hash) and what hubc pushed.

Every process (the endpoint, the dispatcher, the local worker) opens it on its own; a connection per thread.
Running jobs hold a lease (owner + expiry) that their worker renews; a job whose lease lapses, or whose owner
process is gone, is taken back and retried, so a killed worker never leaves a job stuck in `running`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from hubplugin.watch.config import RetrySpec, TargetSpec
from hubplugin.watch.errors import JobStateError

__all__ = ["STATES", "Job", "JobQueue"]

STATES = ("queued", "running", "done", "failed", "superseded", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    repo TEXT NOT NULL, sha TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', reason TEXT,
    received INTEGER NOT NULL DEFAULT 1, first_at REAL NOT NULL, last_at REAL NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, PRIMARY KEY (repo, sha));
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    repo TEXT NOT NULL, sha TEXT NOT NULL, target TEXT NOT NULL, recipe_hash TEXT NOT NULL,
    variant_repo TEXT NOT NULL, spec TEXT NOT NULL, private INTEGER NOT NULL, retry TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
    next_at REAL NOT NULL, owner TEXT, lease_until REAL, stage TEXT,
    variant_url TEXT, commit_sha TEXT, reused INTEGER NOT NULL DEFAULT 0, error TEXT, ran_on TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    UNIQUE (repo, sha, target, recipe_hash));
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, next_at);
CREATE INDEX IF NOT EXISTS jobs_variant ON jobs (variant_repo);
CREATE TABLE IF NOT EXISTS pushes (commit_sha TEXT PRIMARY KEY, variant_repo TEXT NOT NULL, job_id INTEGER);
"""


@dataclass(frozen=True)
class Job:
    """One variant to build: `repo` at commit `sha` for `target`, pushed to `variant_repo`."""

    id: int
    repo: str
    sha: str
    target: str
    recipe_hash: str
    variant_repo: str
    spec: TargetSpec
    private: bool
    retry: RetrySpec
    state: str
    attempts: int
    max_attempts: int
    next_at: float
    owner: str | None
    lease_until: float | None
    stage: str | None
    variant_url: str | None
    commit_sha: str | None
    reused: bool
    """Done without pushing again: the variant repo already had hubc's commit for this sha (a worker died after
    its push landed)."""
    error: str | None
    ran_on: dict | None
    created_at: float
    updated_at: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["ref"] = f"{self.repo}@{self.sha}"
        return d


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["spec"] = TargetSpec.from_dict(json.loads(d["spec"]))
    d["retry"] = RetrySpec(**json.loads(d["retry"]))
    d["private"], d["reused"] = bool(d["private"]), bool(d["reused"])
    d["ran_on"] = json.loads(d["ran_on"]) if d["ran_on"] else None
    return Job(**d)


class JobQueue:
    """The SQLite queue at `path` (created with its folder when missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._db()
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash of the process loses nothing
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ---- deliveries ---------------------------------------------------------------------------------------------
    def add_delivery(self, repo: str, sha: str) -> bool:
        """Record a delivery to screen; True when (repo, sha) is new, False for a replay or duplicate."""
        now = time.time()
        row = self._db().execute(
            "INSERT INTO deliveries (repo, sha, first_at, last_at, next_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (repo, sha) DO UPDATE SET received = received + 1, last_at = excluded.last_at "
            "RETURNING received", (repo, sha, now, now, now)).fetchone()
        return row[0] == 1

    def pending_deliveries(self) -> list[tuple[str, str, int]]:
        """(repo, sha, tries) of deliveries waiting to be screened, oldest first."""
        rows = self._db().execute("SELECT repo, sha, tries FROM deliveries WHERE state = 'pending' AND next_at <= ? "
                                  "ORDER BY first_at", (time.time(),)).fetchall()
        return [tuple(r) for r in rows]

    def settle_delivery(self, repo: str, sha: str, state: str, reason: str) -> None:
        self._db().execute("UPDATE deliveries SET state = ?, reason = ? WHERE repo = ? AND sha = ?",
                           (state, reason, repo, sha))

    def defer_delivery(self, repo: str, sha: str, reason: str, delay: float) -> None:
        self._db().execute("UPDATE deliveries SET tries = tries + 1, reason = ?, next_at = ? WHERE repo = ? AND sha = ?",
                           (reason, time.time() + delay, repo, sha))

    def delivery(self, repo: str, sha: str) -> dict | None:
        row = self._db().execute("SELECT * FROM deliveries WHERE repo = ? AND sha = ?", (repo, sha)).fetchone()
        return dict(row) if row else None

    def own_push(self, repo: str, sha: str) -> str | None:
        """Why a commit is hubc's own doing (a variant repo it builds, or a commit it pushed), else None."""
        db = self._db()
        if db.execute("SELECT 1 FROM pushes WHERE commit_sha = ?", (sha,)).fetchone():
            return f"{sha[:12]} is a commit hubc pushed to {repo} (hubc's own push)"
        if db.execute("SELECT 1 FROM jobs WHERE variant_repo = ? LIMIT 1", (repo,)).fetchone():
            return f"{repo} is a variant repo hubc pushes to (hubc's own push)"
        return None

    # ---- jobs ---------------------------------------------------------------------------------------------------
    def create_jobs(self, repo: str, sha: str, variants: list[tuple[TargetSpec, str]], *, private: bool,
                    retry: RetrySpec) -> tuple[list[int], list[int]]:
        """One job per (target spec, variant repo), unless it exists; a new job supersedes the queued jobs of other
        commits that would push to the same variant repo. Returns (new job ids, superseded job ids)."""
        now, created, superseded = time.time(), [], []
        with self._tx() as db:
            for spec, variant_repo in variants:
                cur = db.execute(
                    "INSERT OR IGNORE INTO jobs (repo, sha, target, recipe_hash, variant_repo, spec, private, retry, "
                    "state, max_attempts, next_at, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                    (repo, sha, spec.target, spec.recipe_hash(), variant_repo, json.dumps(spec.to_dict()),
                     int(private), json.dumps(asdict(retry)), retry.max_attempts, now, now, now))
                if cur.rowcount != 1:
                    continue
                created.append(cur.lastrowid)
                rows = db.execute(
                    "UPDATE jobs SET state = 'superseded', error = ?, updated_at = ? WHERE repo = ? AND "
                    "variant_repo = ? AND sha != ? AND state = 'queued' RETURNING id",
                    (f"superseded by {sha[:12]} (job {cur.lastrowid})", now, repo, variant_repo, sha)).fetchall()
                superseded += [r[0] for r in rows]
        return created, superseded

    def claim(self, owner: str, lease_seconds: float) -> Job | None:
        """Take the oldest due queued job for `owner`, counting an attempt; None when nothing is due."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' AND next_at <= ? ORDER BY id LIMIT 1",
                             (now,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, owner = ?, lease_until = ?, "
                       "stage = 'claimed', updated_at = ? WHERE id = ?", (owner, now + lease_seconds, now, row[0]))
        return self.get(row[0])

    def heartbeat(self, job_id: int, owner: str, lease_seconds: float) -> bool:
        """Renew the lease; False when the job is no longer this owner's (cancelled, or taken back)."""
        now = time.time()
        cur = self._db().execute("UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ? AND state = 'running'",
                                 (now + lease_seconds, job_id, owner))
        return cur.rowcount == 1

    def set_stage(self, job_id: int, owner: str, stage: str) -> bool:
        cur = self._db().execute("UPDATE jobs SET stage = ?, updated_at = ? WHERE id = ? AND owner = ? AND "
                                 "state = 'running'", (stage[:200], time.time(), job_id, owner))
        return cur.rowcount == 1

    def finish(self, job_id: int, owner: str, *, url: str, commit_sha: str, reused: bool, ran_on: dict) -> bool:
        """Mark the job done with its variant; False when it was no longer this owner's."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'done', variant_url = ?, commit_sha = ?, reused = ?, error = NULL, "
                "stage = NULL, owner = NULL, lease_until = NULL, ran_on = ?, updated_at = ? "
                "WHERE id = ? AND owner = ? AND state = 'running' RETURNING variant_repo",
                (url, commit_sha, int(reused), json.dumps(ran_on), now, job_id, owner))
            row = cur.fetchone()
            if row is not None:
                db.execute("INSERT OR IGNORE INTO pushes (commit_sha, variant_repo, job_id) VALUES (?, ?, ?)",
                           (commit_sha, row[0], job_id))
        return row is not None

    def fail(self, job_id: int, owner: str, reason: str, *, permanent: bool = False,
             ran_on: dict | None = None) -> str | None:
        """Record a failed attempt: queued again after the job's backoff, or `failed` once its attempts are spent
        (or at once when `permanent`). Returns the new state, None when the job was no longer this owner's."""
        job = self.get(job_id)
        now = time.time()
        spent = permanent or job.attempts >= job.max_attempts
        state = "failed" if spent else "queued"
        next_at = now if spent else now + job.retry.delay(job.attempts)
        cur = self._db().execute(
            "UPDATE jobs SET state = ?, error = ?, next_at = ?, stage = NULL, owner = NULL, lease_until = NULL, "
            "ran_on = COALESCE(?, ran_on), updated_at = ? WHERE id = ? AND owner = ? AND state = 'running'",
            (state, " ".join(reason.split())[:500], next_at, json.dumps(ran_on) if ran_on else None, now, job_id, owner))
        return state if cur.rowcount == 1 else None

    def release(self, job_id: int, owner: str, reason: str) -> bool:
        """Put a running job back in the queue without counting the attempt (hubc was stopped, not the job)."""
        cur = self._db().execute(
            "UPDATE jobs SET state = 'queued', attempts = attempts - 1, error = ?, next_at = ?, stage = NULL, "
            "owner = NULL, lease_until = NULL, updated_at = ? WHERE id = ? AND owner = ? AND state = 'running'",
            (reason, time.time(), time.time(), job_id, owner))
        return cur.rowcount == 1

    def running(self) -> list[Job]:
        return self._select("WHERE state = 'running' ORDER BY id")

    def due(self) -> int:
        """How many queued jobs could start now."""
        return self._db().execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND next_at <= ?",
                                  (time.time(),)).fetchone()[0]

    def jobs(self) -> list[Job]:
        return self._select("ORDER BY id")

    def get(self, job_id: int) -> Job:
        found = self._select("WHERE id = ?", (job_id,))
        if not found:
            raise JobStateError(f"no job {job_id} in {self.path}", hint="list the jobs with `hubc jobs`")
        return found[0]

    def _select(self, where: str, args: tuple = ()) -> list[Job]:
        return [_job(r) for r in self._db().execute(f"SELECT * FROM jobs {where}", args).fetchall()]

    # ---- what a person asks through `hubc jobs` -----------------------------------------------------------------
    def retry(self, job_id: int) -> Job:
        """Queue a failed, cancelled or superseded job again, with its attempts reset."""
        job = self.get(job_id)
        if job.state not in ("failed", "cancelled", "superseded"):
            hint = f"its variant is at {job.variant_url}" if job.state == "done" else "only failed, cancelled or " \
                                                                                      "superseded jobs are retried"
            raise JobStateError(f"job {job_id} is {job.state}", hint=hint)
        now = time.time()
        self._db().execute("UPDATE jobs SET state = 'queued', attempts = 0, error = NULL, next_at = ?, updated_at = ? "
                           "WHERE id = ? AND state = ?", (now, now, job_id, job.state))
        return self.get(job_id)

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued or running job (a running one is stopped by its worker, which loses its lease)."""
        job = self.get(job_id)
        if job.state not in ("queued", "running"):
            raise JobStateError(f"job {job_id} is {job.state}, not queued or running", hint="nothing to cancel")
        self._db().execute("UPDATE jobs SET state = 'cancelled', error = 'cancelled by hand', owner = NULL, "
                           "lease_until = NULL, stage = NULL, updated_at = ? WHERE id = ? AND state = ?",
                           (time.time(), job_id, job.state))
        return self.get(job_id)
