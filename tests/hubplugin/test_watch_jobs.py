"""Jobs of `hubc watch` run to the Hub: a delivery builds and pushes one variant per target through the local
worker, exactly once even when the worker is killed mid-job, and failures are retried, then reported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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


def kill_worker_and_watch(watch: Watch, job) -> None:
    """kill -9 of the job's worker, then of `hubc watch` (stopped first, so it cannot react in between)."""
    watch.proc.send_signal(signal.SIGSTOP)
    os.kill(int(job.owner.split(":")[-2]), signal.SIGKILL)
    watch.proc.kill()
    watch.proc.wait()


def test_kill_9_mid_compression_and_mid_push_then_restarts_complete_each_job_once(hub, tmp_path):
    sha = hub.repos["org/tiny"].refs["main"]
    config = write_config(tmp_path, [{"target": "a10g", **SMALL}, {"target": "cpu", **SMALL}])
    log = tmp_path / "watch.log"

    watch = Watch(config, log).start()
    assert watch.deliver(payload("org/tiny", sha))[0] == 202

    def compressing():
        for job in queue().running():
            stage = job.stage or ""
            if stage.startswith(("calibrating", "measuring", "quantizing")) and \
                    list(work_root().glob(f"job-{job.id}/.variant.partial-*")):
                return job
        return None

    first = wait_for(compressing, 120, "a job in the middle of its compression")
    kill_worker_and_watch(watch, first)
    assert queue().get(first.id).state == "running"  # as the dead worker left it
    assert list(work_root().glob(f"job-{first.id}/.variant.partial-*"))  # and its half-written checkpoint

    hub.hold_next_commit = True  # the next push lands, and its answer never reaches the worker
    watch = Watch(config, log).start()
    wait_for(hub.commit_landed.is_set, 120, "a push to land")
    pushing = [j for j in queue().running() if (j.stage or "").startswith("pushing")]
    assert len(pushing) == 1, queue().running()
    second = pushing[0]
    kill_worker_and_watch(watch, second)
    hub.release.set()
    assert len(hub.hubc_commits(second.variant_repo)) == 1  # the push landed; the worker died before knowing

    with Watch(config, log) as watch:
        wait_for(lambda: all(j.state == "done" for j in queue().jobs()), 180, "both jobs to be done", every=0.5)
        jobs = {j["id"]: j for j in hubc_jobs()}
        assert len(jobs) == 2
        assert jobs[first.id]["attempts"] >= 2 and "its worker died" in log.read_text()
        assert jobs[second.id]["reused"] is True  # done by finding its own commit, not by a second push
        assert jobs[second.id]["commit_sha"] == hub.hubc_commits(second.variant_repo)[0].sha
        assert_one_hubc_commit_per_variant(hub, sha, ["org/tiny-a10g", "org/tiny-cpu"])
        assert set(hub.repos) == {"org/tiny", "org/tiny-a10g", "org/tiny-cpu"}
        assert not list(work_root().iterdir())  # no staging folder, no work folder, no lock left

        # Acceptance 5: the Hub's delivery for hubc's own push makes no job.
        for job in jobs.values():
            status, answer, _ = watch.deliver(payload(job["variant_repo"], job["commit_sha"]))
            assert status == 200 and "hubc's own push" in answer["reason"]
        assert len(hubc_jobs()) == 2


def test_a_failing_job_is_retried_with_backoff_then_failed_with_its_reason(hub, tmp_path):
    sha = hub.repos["org/tiny"].refs["main"]
    # The token may write to org and tester, not to `elsewhere`: every push is refused.
    config = write_config(tmp_path, [{"target": "cpu", **SMALL}], variants={"owner": "elsewhere"},
                          retry={"max_attempts": 2, "backoff_seconds": 0.5})
    with Watch(config, tmp_path / "watch.log") as watch:
        assert watch.deliver(payload("org/tiny", sha))[0] == 202
        wait_for(lambda: [j.state for j in queue().jobs()] == ["failed"], 180, "the job to fail", every=0.5)
        [job] = hubc_jobs()
        assert job["attempts"] == 2 and job["variant_repo"] == "elsewhere/tiny-cpu"
        assert "may not write to 'elsewhere/tiny-cpu'" in job["error"] and "\n" not in job["error"]
        assert "hubc push" not in job["error"]  # its work folder is gone: no hint to push it by hand
        assert watch.log().count("will be retried") == 1 and "failed: the token may not write" in watch.log()
        table = subprocess.run([sys.executable, "-m", "hubplugin.cli", "jobs"], capture_output=True, text=True,
                               check=True).stdout
        assert "failed" in table and "2/2" in table and "may not write" in table
        hub.hold_listing = True  # the retried attempt stays mid-job, blocked in its first Hub call
        retried = subprocess.run([sys.executable, "-m", "hubplugin.cli", "jobs", "retry", str(job["id"])],
                                 capture_output=True, text=True, check=False)
        assert retried.returncode == 0, retried.stderr
        wait_for(hub.listing_held.is_set, 60, "the job to run again")
        # Cancelling a running job stops its worker's attempt: nothing is recorded for it, nothing is left.
        cancelled = subprocess.run([sys.executable, "-m", "hubplugin.cli", "jobs", "cancel", str(job["id"])],
                                   capture_output=True, text=True, check=False)
        assert cancelled.returncode == 0, cancelled.stderr
        wait_for(lambda: f"job {job['id']}: stopped: it was cancelled" in watch.log(), 60, "the worker to stop it")
        assert queue().get(job["id"]).state == "cancelled"
        wait_for(lambda: not list(work_root().iterdir()), 30, "its work folder to be removed")
    assert not any(r.startswith("elsewhere/") for r in hub.repos)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_delivery_builds_a_served_cpu_variant_and_a_validated_a10g_variant(hub, tmp_path):
    sha = hub.repos["org/tiny"].refs["main"]
    small = {"eval_windows": 2, "seq_len": 64}
    config = write_config(tmp_path, [{"target": "cpu", **small}, {"target": "a10g", **small}])
    with Watch(config, tmp_path / "watch.log") as watch:
        assert watch.deliver(payload("org/tiny", sha))[0] == 202
        wait_for(lambda: len(queue().jobs()) == 2 and all(j.state in ("done", "failed") for j in queue().jobs()),
                 600, "both variants", every=1)
        jobs = {j["target"]: j for j in hubc_jobs()}
        assert {t: j["state"] for t, j in jobs.items()} == {"cpu": "done", "a10g": "done"}, jobs
    assert_one_hubc_commit_per_variant(hub, sha, ["org/tiny-cpu", "org/tiny-a10g"])
    cpu = hub.files("org/tiny-cpu")["README.md"].decode()
    a10g = hub.files("org/tiny-a10g")["README.md"].decode()
    assert "Measured with a real vLLM" in cpu and "| vllm " in cpu  # served: latency and served quality
    assert f"at revision `{sha}`" in cpu and f"at revision `{sha}`" in a10g
    assert "not served here" in a10g and "| vllm" not in a10g
    assert jobs["cpu"]["variant_url"].endswith("/org/tiny-cpu")
