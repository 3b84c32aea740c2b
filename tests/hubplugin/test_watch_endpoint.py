"""`hubc watch` as the Hub reaches it: real HTTP deliveries to a running `hubc watch --no-run` (jobs are queued, not
run), checked through `hubc jobs` and the endpoint's log."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from watch_helpers import SECRET, Watch, WatchHub, hubc_jobs, payload, point_client_at, wait_for, write_config

TARGETS = [{"target": "a10g", "serve": False}, {"target": "cpu", "serve": False}]


@pytest.fixture
def hub(monkeypatch, tiny_llama_dir):
    with WatchHub() as fake:
        point_client_at(monkeypatch, fake.url)
        fake.add_repo("org/tiny", tiny_llama_dir)
        yield fake


@pytest.fixture
def endpoint(hub, tmp_path):
    with Watch(write_config(tmp_path, TARGETS), tmp_path / "watch.log", no_run=True) as watch:
        yield watch


def settled(hub, repo: str, sha: str):
    """The dispatcher has screened the delivery (its verdict), read from the queue."""
    from hubplugin.watch import JobQueue, default_queue_path

    def verdict():
        row = JobQueue(default_queue_path()).delivery(repo, sha)
        return row if row and row["state"] != "pending" else None

    return wait_for(verdict, 30, f"the delivery of {repo}@{sha[:12]} to be screened")


def test_secret_and_unreadable_deliveries_are_refused_and_enqueue_nothing(hub, endpoint):
    sha = hub.repos["org/tiny"].refs["main"]
    good = payload("org/tiny", sha)
    for secret, query in ((None, ""), ("wrong", ""), (None, "?secret=wrong"), ("", "")):
        status, answer, _ = endpoint.deliver(good, secret=secret, query=query)
        assert status == 401, (secret, query, answer)
    bad = [
        (b"{not json", "malformed JSON"),
        (json.dumps({**good, "pad": "x" * (1 << 20)}).encode(), "over 1048576 bytes"),
        (json.dumps(payload("org/tiny", sha, version=2)).encode(), "payload version 2"),
        (json.dumps({**good, "webhook": {"id": "x"}}).encode(), "payload version None"),
        (b"[]", "not a JSON object"),
        (json.dumps({**good, "updatedRefs": [{"ref": "refs/heads/main", "newSha": "abc"}]}).encode(), "not a 40-hex"),
    ]
    for raw, reason in bad:
        status, answer, _ = endpoint.deliver(None, raw=raw)
        assert status == 400 and reason in answer["error"], (reason, answer)
    # The secret in the query string is accepted too (this delivery asks for nothing: a tag).
    status, answer, _ = endpoint.deliver(payload("org/tiny", sha, ref="refs/tags/v1"), secret=None,
                                         query=f"?secret={SECRET}")
    assert status == 200 and answer["status"] == "ignored"
    log = endpoint.log()
    assert log.count("401 refused") == 4 and log.count("400 refused") == len(bad)
    assert hubc_jobs() == []


def test_deliveries_that_ask_for_nothing_get_2xx_a_logged_reason_and_no_job(hub, endpoint):
    sha = hub.repos["org/tiny"].refs["main"]
    card = "---\nbase_model: org/tiny\nbase_model_relation: quantized\ntags: [hubc, w8a8-int8]\n---\n# variant\n"
    variant_sha = hub.add_repo("org/tiny-by-hand", {"README.md": card, "config.json": "{}"})
    empty_sha = hub.add_repo("org/empty", {".gitattributes": "*.bin filter=lfs\n"})
    stale = sha
    head = hub.add_commit("org/tiny", {"notes.txt": "newer"})
    answered = {
        "scope discussion/create is not a content update": payload("org/tiny", head, scope="discussion",
                                                                   action="create"),
        "repo created: no content to build yet": payload("org/new", None, scope="repo", action="create"),
        "dataset repos are not built": payload("org/tiny", head, kind="dataset"),
        "no update of refs/heads/main (updated: refs/tags/v1)": payload("org/tiny", head, ref="refs/tags/v1"),
        "refs/heads/main was deleted": payload("org/tiny", None),
        "elsewhere/model is not watched": payload("elsewhere/model", head),
    }
    for reason, body in answered.items():
        status, answer, _ = endpoint.deliver(body)
        assert status == 200 and reason in answer["reason"], (reason, answer)
        assert reason in endpoint.log()
    # These need the Hub's word, so they are recorded (202) and dropped by the dispatcher with the reason logged.
    screened = {
        ("org/tiny-by-hand", variant_sha): "is a hubc variant of org/tiny (card: base_model_relation quantized, "
                                           "tag hubc): hubc's own push",
        ("org/empty", empty_sha): "has no config.json",
        ("org/tiny", stale): f"{stale[:12]} is no longer the head of main ({head[:12]} is)",
    }
    for (repo, commit), reason in screened.items():
        status, answer, _ = endpoint.deliver(payload(repo, commit))
        assert status == 202, answer
        verdict = settled(hub, repo, commit)
        assert verdict["state"] == "ignored" and reason in verdict["reason"]
        wait_for(lambda r=reason: r in endpoint.log(), 10, "the reason in the log")
    assert hubc_jobs() == []


def test_replayed_and_concurrent_deliveries_make_one_job_per_target_and_a_new_sha_supersedes(hub, endpoint, tmp_path):
    sha = hub.repos["org/tiny"].refs["main"]
    event = payload("org/tiny", sha)
    answers = [endpoint.deliver(event) for _ in range(40)]
    threads = [threading.Thread(target=lambda: answers.append(endpoint.deliver(event))) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 50 and {status for status, _, _ in answers} == {202}
    assert sum(a["status"] == "queued" for _, a, _ in answers) == 1  # the other 49 are duplicates
    assert max(seconds for _, _, seconds in answers) < 1.0
    settled(hub, "org/tiny", sha)
    first = hubc_jobs()
    assert sorted((j["target"], j["sha"], j["state"]) for j in first) == [("a10g", sha, "queued"),
                                                                        ("cpu", sha, "queued")]
    assert {j["variant_repo"] for j in first} == {"org/tiny-a10g", "org/tiny-cpu"}

    newer = hub.add_commit("org/tiny", {"config.json": hub.files("org/tiny")["config.json"] + b"\n"})
    for _ in range(3):
        assert endpoint.deliver(payload("org/tiny", newer))[0] == 202
    settled(hub, "org/tiny", newer)
    assert endpoint.deliver(event)[0] == 202  # a replay of the old event changes nothing
    jobs = {(j["sha"], j["target"]): j for j in hubc_jobs()}
    assert len(jobs) == 4
    for target in ("a10g", "cpu"):
        old, new = jobs[(sha, target)], jobs[(newer, target)]
        assert old["state"] == "superseded" and f"superseded by {newer[:12]} (job {new['id']})" == old["error"]
        assert new["state"] == "queued"

    # A person cancels a queued job and queues it again; what a state does not allow is one line, exit code 2.
    job = jobs[(newer, "cpu")]["id"]
    run = [sys.executable, "-m", "hubplugin.cli", "jobs"]
    assert subprocess.run([*run, "cancel", str(job)], capture_output=True, text=True, check=False).returncode == 0
    assert {j["id"]: j["state"] for j in hubc_jobs()}[job] == "cancelled"
    again = subprocess.run([*run, "cancel", str(job)], capture_output=True, text=True, check=False)
    assert again.returncode == 2 and again.stderr.strip() == f"error: job {job} is cancelled, not queued or running; " \
                                                             "nothing to cancel"
    assert subprocess.run([*run, "retry", str(job)], capture_output=True, text=True, check=False).returncode == 0
    missing = subprocess.run([*run, "retry", "999"], capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and "no job 999" in missing.stderr and "Traceback" not in missing.stderr
    table = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert f"org/tiny@{newer[:12]}" in table and "superseded by" in table and table.count("queued") == 2

    # Jobs survive a restart of the endpoint.
    endpoint.stop()
    with Watch(endpoint.config, tmp_path / "watch2.log", no_run=True):
        assert {(j["sha"], j["target"], j["state"]) for j in hubc_jobs()} == {
            (sha, "a10g", "superseded"), (sha, "cpu", "superseded"), (newer, "a10g", "queued"),
            (newer, "cpu", "queued")}
