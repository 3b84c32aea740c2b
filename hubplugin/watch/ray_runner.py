"""Jobs as Ray tasks: `runner: {kind: ray, address: ...}` in watch.yaml.

The dispatcher of `hubc watch` claims a job in the SQLite queue (it holds the lease and renews it while the task
runs), submits one Ray task with a resource request (`num_gpus` for GPU targets, `num_cpus` for all) and records
what the task returns. Ray places and runs the tasks; hubc schedules nothing. Tasks are not retried by Ray
(`max_retries=0`): a task whose worker dies fails, and the queue retries the job with its own backoff and attempt
count, so the queue stays the one record. Ray fate-shares tasks with the driver, so tasks of a `hubc watch` that
died are stopped by Ray, and their jobs are taken back by the next `hubc watch`.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import asdict

from hubplugin.watch.config import WatchConfig
from hubplugin.watch.errors import WatchError
from hubplugin.watch.jobrun import JobSpec, is_permanent, one_line, run_job
from hubplugin.watch.lease import worker_id
from hubplugin.watch.queue import JobQueue

__all__ = ["RayRunner", "ray_job"]


def ray_job(spec: dict) -> dict:
    """The Ray task: run one job on whichever node Ray chose; the outcome (or the error, in one line) as a dict."""
    import ray

    ctx = ray.get_runtime_context()
    ran_on = {"runner": "ray", "host": socket.gethostname(), "pid": os.getpid(), "node": ctx.get_node_id(),
              "resources": ctx.get_assigned_resources()}
    job = JobSpec.from_dict(spec)

    def progress(message: str) -> None:
        print(f"[job {job.job_id}] » {message}", file=sys.stderr, flush=True)

    try:
        outcome = run_job(job, progress)
    except Exception as exc:  # noqa: BLE001 - the driver records it on the job
        return {"ok": False, "error": one_line(exc), "permanent": is_permanent(exc), "ran_on": ran_on}
    return {"ok": True, **asdict(outcome), "ran_on": ran_on}


class RayRunner:
    """Submits due jobs as Ray tasks, at most `runner.max_parallel` at once."""

    name = "ray"

    def __init__(self, config: WatchConfig, log: logging.Logger) -> None:
        self.config, self.spec, self.log = config, config.runner, log
        self.owner = worker_id()
        self.inflight: dict[int, object] = {}
        self._task = None
        self._warned_gpu = False

    def start(self) -> None:
        import ray

        env = {k: os.environ[k] for k in self.spec.forward_env if k in os.environ}
        options = {"namespace": "hubc", "runtime_env": {"env_vars": env} if env else None}
        if self.spec.address is None:
            options["include_dashboard"] = False
        try:
            ray.init(address=self.spec.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.spec.address or "a new local instance"
            raise WatchError(f"cannot connect to the Ray cluster at {where} ({one_line(exc)[:200]})",
                             hint="start one with `ray start --head`, or fix runner.address in watch.yaml") from None
        self._task = ray.remote(ray_job)
        resources = ray.cluster_resources()
        self.log.info("Ray cluster: %s CPUs, %s GPUs", resources.get("CPU", 0), resources.get("GPU", 0))

    def _resources(self, target: str) -> dict:
        from advisor.targets import get_target

        gpu = get_target(target).kind == "gpu"
        return {"num_cpus": self.spec.num_cpus, "num_gpus": self.spec.num_gpus if gpu else 0}

    def tick(self, queue: JobQueue) -> None:
        import ray

        lease = self.config.lease_seconds
        for job_id, ref in list(self.inflight.items()):
            if not queue.heartbeat(job_id, self.owner, lease):
                ray.cancel(ref, force=True)
                del self.inflight[job_id]
                self.log.info("job %d: cancelled or taken back; its Ray task was cancelled", job_id)
        if self.inflight:
            refs = list(self.inflight.values())
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for job_id in [j for j, r in self.inflight.items() if r in ready]:
                self._record(queue, job_id, self.inflight.pop(job_id))
        while len(self.inflight) < self.spec.max_parallel:
            job = queue.claim(self.owner, lease)
            if job is None:
                break
            resources = self._resources(job.target)
            if resources["num_gpus"] and not ray.cluster_resources().get("GPU") and not self._warned_gpu:
                self._warned_gpu = True
                self.log.warning("job %d asks for %g GPU and the Ray cluster has none now: it waits for one "
                                 "(runner.num_gpus: 0 builds GPU targets without one)", job.id, resources["num_gpus"])
            self.inflight[job.id] = self._task.options(name=f"hubc-job-{job.id}", max_retries=0,
                                                       **resources).remote(JobSpec.of(job).to_dict())
            queue.set_stage(job.id, self.owner, f"submitted to Ray ({resources['num_cpus']:g} CPU, "
                                                f"{resources['num_gpus']:g} GPU)")
            self.log.info("job %d: %s@%s for %s submitted to Ray", job.id, job.repo, job.sha[:12], job.target)

    def _record(self, queue: JobQueue, job_id: int, ref) -> None:
        import ray

        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the worker died, the node was lost, the task was cancelled
            reason = f"the Ray task failed ({type(exc).__name__}): {str(exc).strip().splitlines()[0][:300]}"
            state = queue.fail(job_id, self.owner, reason)
            self.log.warning("job %d: %s; %s", job_id, reason, "failed" if state == "failed" else "will be retried")
            return
        if out["ok"]:
            queue.finish(job_id, self.owner, url=out["url"], commit_sha=out["commit_sha"], reused=out["reused"],
                         ran_on=out["ran_on"])
            self.log.info("job %d: done: %s (%s)", job_id, out["url"], out["commit_sha"][:12])
        else:
            state = queue.fail(job_id, self.owner, out["error"], permanent=out["permanent"], ran_on=out["ran_on"])
            self.log.warning("job %d: %s: %s", job_id, "failed" if state == "failed" else "will be retried",
                             out["error"])

    def stop(self, queue: JobQueue) -> None:
        import ray

        for job_id, ref in self.inflight.items():
            ray.cancel(ref, force=True)
            queue.release(job_id, self.owner, "hubc watch stopped mid-job; queued again")
        self.inflight.clear()
        if ray.is_initialized():
            ray.shutdown()
