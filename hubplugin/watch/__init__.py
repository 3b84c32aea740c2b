"""`hubc watch`: Hub webhooks in, compressed variants out.

A verified `repo.content` delivery for a watched model repo is recorded in a persistent SQLite queue
(hubplugin.watch.queue); the dispatcher screens it and creates one job per configured target; a runner (the local
worker, or Ray tasks) runs each job through the same `optimize` path as `hubc optimize --push`, exactly once.
"""

from hubplugin.watch.config import (
    RetrySpec,
    RunnerSpec,
    TargetSpec,
    WatchConfig,
    default_queue_path,
    load_config,
)
from hubplugin.watch.errors import JobStateError, PayloadError, WatchConfigError, WatchError
from hubplugin.watch.queue import STATES, Job, JobQueue

__all__ = [
    "STATES",
    "Job",
    "JobQueue",
    "JobStateError",
    "PayloadError",
    "RetrySpec",
    "RunnerSpec",
    "TargetSpec",
    "WatchConfig",
    "WatchConfigError",
    "WatchError",
    "default_queue_path",
    "load_config",
]
