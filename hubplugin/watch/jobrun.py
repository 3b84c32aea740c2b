"""One job, wherever it runs (the local worker or a Ray task): exactly `hubc optimize REPO --revision SHA --target T
--push VARIANT`, through hubplugin.optimize.optimize, in a work folder of its own.

Exactly once: before any work the variant repo's commits are read, and a hubc commit whose card pins this base
commit means the job was done by an attempt that died after its push landed, so nothing is pushed again. Nothing
half-written: the work folder is locked (flock) while the job runs and removed when it ends; a folder whose lock
no live process holds is what a killed attempt left, and any job on that machine removes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from hubplugin.watch.config import TargetSpec
from hubplugin.watch.errors import WatchError

__all__ = ["JobOutcome", "JobSpec", "is_permanent", "one_line", "run_job", "work_root"]

_JOB_DIR = re.compile(r"^job-(\d+)(\.lock)?$")


@dataclass(frozen=True)
class JobSpec:
    """Everything a runner needs to build one variant (no queue access: a Ray task may run on another machine)."""

    job_id: int
    repo: str
    sha: str
    variant_repo: str
    private: bool
    target: TargetSpec

    @classmethod
    def of(cls, job) -> JobSpec:
        """The spec of a hubplugin.watch.queue.Job."""
        return cls(job.id, job.repo, job.sha, job.variant_repo, job.private, job.spec)

    def to_dict(self) -> dict:
        return {**asdict(self), "target": self.target.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        return cls(**{**data, "target": TargetSpec.from_dict(data["target"])})


@dataclass(frozen=True)
class JobOutcome:
    url: str
    commit_sha: str
    reused: bool
    """The variant repo already had this commit's variant; nothing was pushed."""


def work_root() -> Path:
    """Where jobs build their checkpoints on this machine: $HUBC_CACHE/watch/work."""
    from hubplugin.source import cache_dir

    return cache_dir() / "watch" / "work"


def one_line(exc: BaseException) -> str:
    """An error as the one line `hubc jobs` shows: the message and, for hubc's errors, what to do."""
    from advisor.errors import HintedError

    if isinstance(exc, HintedError):
        text = exc.message if not exc.hint else f"{exc.message}; {exc.hint}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def is_permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix (the model, the recipe or the quality gate), so the job fails at once."""
    from advisor.errors import AdvisorError
    from hubplugin.errors import ModelNotFoundError, NotAModelError, QualityGateError

    return isinstance(exc, (AdvisorError, ModelNotFoundError, NotAModelError, QualityGateError))


def run_job(spec: JobSpec, progress: Callable[[str], None] = lambda s: None) -> JobOutcome:
    """Build and push the variant of `spec`, or find it already pushed. Raises what optimize raises."""
    from hubplugin.watch.hubio import HubUnavailable, find_variant_commit

    root = work_root()
    root.mkdir(parents=True, exist_ok=True)
    sweep(root)
    with _work_folder(root, spec.job_id) as folder:
        try:
            found = find_variant_commit(spec.variant_repo, spec.repo, spec.sha)
        except HubUnavailable as exc:
            raise WatchError(str(exc), hint="retried later") from None
        if found is not None:
            progress(f"{spec.variant_repo} already has hubc's commit {found.commit_sha[:12]} for "
                     f"{spec.repo}@{spec.sha[:12]}: not pushed again")
            return JobOutcome(found.url, found.commit_sha, reused=True)
        from advisor.errors import HintedError
        from hubplugin.errors import QualityGateError
        from hubplugin.optimize import optimize

        config = spec.target.optimize_config(out=folder / "variant", push=spec.variant_repo, private=spec.private,
                                             revision=spec.sha)
        try:
            result = optimize(spec.repo, spec.target.target, config, progress)
        except HintedError as exc:
            # The work folder goes with the job, so a hint to push it by hand would point at nothing.
            hint = "; ".join(part for part in (exc.hint or "").split("; ") if str(folder) not in part)
            exc.hint = hint or None
            raise
        if result.push_refused:
            raise QualityGateError(result.push_refused,
                                   hint="set accept_quality_loss or a larger max_ppl_increase for this target in "
                                        "watch.yaml, or another recipe, then `hubc jobs retry ID`")
        if result.source.revision != spec.sha:
            raise WatchError(f"{spec.repo} was read at {result.source.revision}, not {spec.sha}")
        return JobOutcome(result.push_url or "", result.push_commit or "", reused=False)


@contextmanager
def _work_folder(root: Path, job_id: int) -> Iterator[Path]:
    """An empty folder for the job, locked while it runs and removed after, whatever happens."""
    lock_path, folder = root / f"job-{job_id}.lock", root / f"job-{job_id}"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WatchError(f"job {job_id} is still running in another process on {socket.gethostname()} "
                             f"({lock_path})", hint="retried once that process ends") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        shutil.rmtree(folder, ignore_errors=True)  # what an attempt killed on this machine left
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def sweep(root: Path) -> list[str]:
    """Remove the work folders of attempts that died (their lock is held by no live process); returns their
    names."""
    removed = []
    for entry in sorted(root.iterdir()):
        m = _JOB_DIR.match(entry.name)
        if m is None or (m.group(2) and (root / f"job-{m.group(1)}").exists()):
            continue
        lock_path = root / f"job-{m.group(1)}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live attempt
        try:
            shutil.rmtree(root / f"job-{m.group(1)}", ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            removed.append(f"job-{m.group(1)}")
        finally:
            os.close(fd)
    return removed
