"""`runner: {kind: ray}`: jobs run as Ray tasks on a Ray cluster started on this machine (`ray start --head` on
127.0.0.1, one declared GPU), with the SQLite queue as their record: variants for two targets, a Ray worker killed
mid-compression, another killed mid-push together with `hubc watch`, and each variant pushed exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from watch_helpers import (
    SMALL,
    Watch,
    WatchHub,
    assert_one_hubc_commit_per_variant,
    hubc_jobs,
    payload,
    point_client_at,
    queue,
    wait_for,
    work_root,
    write_config,
)


@pytest.fixture
def hub(monkeypatch, tiny_llama_dir):
    with WatchHub() as fake:
        point_client_at(monkeypatch, fake.url)
        monkeypatch.setenv("HF_TOKEN", fake.token)
        fake.add_repo("org/tiny", tiny_llama_dir)
        yield fake


@pytest.fixture
def ray_cluster(hub, monkeypatch):
    """A Ray head on 127.0.0.1 with 2 CPUs and 1 declared GPU, its workers in this test's environment; stopped by
    stopping the `ray start --block` process that started it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a loopback cluster of this test (token auth: README)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    ray = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--num-gpus", "1", "--include-dashboard", "false",
                             "--disable-usage-stats", "--temp-dir", temp, "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def pid_of(job_id: int) -> int:
    """The process running a job, from its work folder's lock (the Ray worker that took the task)."""
    return json.loads((work_root() / f"job-{job_id}.lock").read_text())["pid"]


def test_ray_runner_builds_both_variants_once_through_killed_workers_and_a_restart(hub, ray_cluster, tmp_path):
    sha = hub.repos["org/tiny"].refs["main"]
    config = write_config(tmp_path, [{"target": "cpu", **SMALL}, {"target": "a10g", **SMALL}],
                          runner={"kind": "ray", "address": ray_cluster, "num_cpus": 1, "num_gpus": 1,
                                  "max_parallel": 2})
    log = tmp_path / "watch.log"
    watch = Watch(config, log).start()
    assert watch.deliver(payload("org/tiny", sha))[0] == 202

    def compressing():
        partial = sorted(work_root().glob("job-*/.variant.partial-*")) if work_root().exists() else []
        return int(partial[0].parent.name.split("-")[1]) if partial else None

    first = wait_for(compressing, 180, "a Ray task in the middle of its compression")
    os.kill(pid_of(first), signal.SIGKILL)
    hub.hold_next_commit = True
    wait_for(lambda: f"job {first}: the Ray task failed (" in watch.log(), 60, "Ray to report the dead worker")

    wait_for(hub.commit_landed.is_set, 180, "a push to land")
    held = next(j for j in queue().jobs() if f"/{j.variant_repo}/commit/" in hub.held_path)
    os.kill(pid_of(held.id), signal.SIGKILL)
    watch.proc.kill()  # and the driver with it: Ray stops the tasks it owned
    watch.proc.wait()
    hub.release.set()

    with Watch(config, log):
        wait_for(lambda: len(queue().jobs()) == 2 and all(j.state == "done" for j in queue().jobs()), 240,
                 "both jobs to be done", every=0.5)
        jobs = {j["target"]: j for j in hubc_jobs()}
    byid = {j["id"]: j for j in jobs.values()}
    assert byid[first]["attempts"] >= 2 and "WorkerCrashedError" in log.read_text()
    assert byid[held.id]["attempts"] >= 2 and byid[held.id]["reused"] is True
    assert_one_hubc_commit_per_variant(hub, sha, ["org/tiny-cpu", "org/tiny-a10g"])
    # The GPU target's task asked Ray for the GPU; the CPU target's did not.
    assert jobs["a10g"]["ran_on"]["runner"] == "ray" and jobs["a10g"]["ran_on"]["resources"].get("GPU") == 1
    assert "GPU" not in jobs["cpu"]["ran_on"]["resources"]
    assert set(hub.repos) == {"org/tiny", "org/tiny-cpu", "org/tiny-a10g"}
    assert not list(work_root().iterdir())
