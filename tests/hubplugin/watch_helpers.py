"""What the `hubc watch` tests share: a fake Hub that also lists commits and can hold a commit's answer, Hub webhook
payloads (version 3), and a running `hubc watch` subprocess that tests deliver to over real HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import yaml
from fakehub import FakeHub, HubError
from fakehub_http import Handler

SECRET = "s3cret-for-tests"


class WatchHub(FakeHub):
    """The fake Hub plus `GET /api/models/{repo}/commits/{rev}` (HfApi.list_repo_commits), a switch that holds the
    answer to the next commit after the commit has landed (to kill a pusher between the two), and one that holds
    every commit listing (a job's first Hub call) until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_next_commit = False
        self.hold_listing = False
        self.listing_held = threading.Event()
        self.held_path = ""
        self.commit_landed = threading.Event()
        self.release = threading.Event()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> WatchHub:
        hub = self

        class WatchHandler(Handler):
            fake = hub

            def do_GET(self) -> None:
                m = re.match(r"^/api/models/([^/]+/[^/]+)/commits/([^/?]+)", self.path)
                if m is None:
                    return super().do_GET()
                if hub.hold_listing:  # a job's first Hub call: it waits here, mid-job, until release
                    hub.listing_held.set()
                    hub.release.wait(120)
                try:
                    repo = hub.readable(m.group(1), hub.account({k.lower(): v for k, v in self.headers.items()}))
                    status, data = 200, hub.commit_list(repo.repo_id)
                except HubError as e:
                    status, data = e.status, {"error": e.message}
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 404:
                    self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()
                self.wfile.write(body)

            def send_response(self, code, message=None) -> None:
                if code == 200 and self.command == "POST" and "/commit/" in self.path and hub.hold_next_commit:
                    hub.hold_next_commit = False
                    hub.held_path = self.path
                    hub.commit_landed.set()
                    hub.release.wait(120)
                super().send_response(code, message)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), WatchHandler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def commit_list(self, repo_id: str) -> list[dict]:
        """The repo's commits as the Hub lists them: newest first."""
        date = "2026-01-01T00:00:00.000Z"  # the Hub's format, which the client parses strictly
        return [{"id": c.sha, "title": c.message.split("\n")[0], "message": c.message,
                 "authors": [{"user": "tester"}], "date": date} for c in reversed(self.commits(repo_id))]

    def hubc_commits(self, repo_id: str) -> list:
        return [c for c in self.commits(repo_id) if c.message.startswith("hubc:")]


def point_client_at(monkeypatch, endpoint: str) -> None:
    """Send this process's huggingface_hub and every subprocess (through HF_ENDPOINT) to `endpoint`: the places
    hub-protocol.md §1.1 lists, as tests/conftest.py does for its fake Hub."""
    from huggingface_hub import constants, hf_api

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


def payload(repo: str, sha: str | None, *, scope: str = "repo.content", action: str = "update", kind: str = "model",
            ref: str = "refs/heads/main", version: int = 3) -> dict:
    """A Hub webhook delivery of payload version 3 (hub-docs webhooks.md)."""
    return {
        "event": {"action": action, "scope": scope},
        "repo": {"type": kind, "name": repo, "id": "6" * 24, "private": False, "headSha": sha,
                 "url": {"web": f"https://huggingface.co/{repo}", "api": f"https://huggingface.co/api/models/{repo}"},
                 "owner": {"id": "5" * 24}},
        "webhook": {"id": "7" * 24, "version": version},
        "updatedRefs": [{"ref": ref, "oldSha": None, "newSha": sha}],
    }


def wait_for(condition, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def write_config(folder: Path, targets: list, **extra) -> Path:
    config = {"watch": {"owners": ["org"]}, "targets": targets,
              "retry": {"max_attempts": 4, "backoff_seconds": 0.5}, "lease_seconds": 20, **extra}
    path = folder / "watch.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Watch:
    """`hubc watch --config CONFIG --port 0` as a subprocess, with its stderr in `log_path`."""

    def __init__(self, config: Path, log_path: Path, env: dict | None = None, no_run: bool = False) -> None:
        self.config, self.log_path, self.no_run = config, log_path, no_run
        self.env = {**os.environ, "HUBC_WEBHOOK_SECRET": SECRET, "HUBC_DEBUG": "", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Watch:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        args = [sys.executable, "-m", "hubplugin.cli", "watch", "--config", str(self.config), "--port", "0"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args + (["--no-run"] if self.no_run else []), stdout=log, stderr=log,
                                         env=self.env)

        def listening():
            assert self.proc.poll() is None, self.log()
            new = self.log_path.read_bytes()[offset:].decode(errors="replace")
            m = re.search(r"listening on (http://\S+/webhook)", new)
            return m and m.group(1)

        self.url = wait_for(listening, 120, "hubc watch to listen")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def deliver(self, body, secret: str | None = SECRET, query: str = "", raw: bytes | None = None):
        """POST a delivery; returns (status, JSON answer, seconds)."""
        data = raw if raw is not None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-Webhook-Secret"] = secret
        request = urllib.request.Request(self.url + query, data=data, headers=headers, method="POST")
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, text = answer.status, answer.read()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read()
        return status, json.loads(text or b"{}"), time.perf_counter() - started

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Watch:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def hubc_jobs(env: dict | None = None, *args: str) -> list[dict]:
    """`hubc jobs --format json`, as a user runs it."""
    out = subprocess.run([sys.executable, "-m", "hubplugin.cli", "jobs", "--format", "json", *args],
                         capture_output=True, text=True, env={**os.environ, **(env or {})}, check=True)
    return json.loads(out.stdout)


SMALL = {"serve": False, "eval_windows": 2, "seq_len": 64}
"""A target's settings for fast jobs: no vLLM serving, 2 evaluation windows of 64 tokens."""


def queue():
    """The job queue `hubc watch` uses in this test's environment."""
    from hubplugin.watch import JobQueue, default_queue_path

    return JobQueue(default_queue_path())


def work_root() -> Path:
    return Path(os.environ["HUBC_CACHE"]) / "watch" / "work"


def card_of(hub: FakeHub, repo: str, revision: str = "main") -> dict:
    return yaml.safe_load(hub.files(repo, revision)["README.md"].decode().split("---")[1])


def assert_one_hubc_commit_per_variant(hub: WatchHub, sha: str, repos: list[str]) -> None:
    """Each variant repo has exactly one hubc commit, whose card pins org/tiny at `sha`."""
    for repo in repos:
        commits = hub.hubc_commits(repo)
        assert len(commits) == 1, (repo, [c.message for c in hub.commits(repo)])
        card = card_of(hub, repo, commits[0].sha)
        assert (card["base_model"], card["base_model_revision"]) == ("org/tiny", sha)
        assert card["base_model_relation"] == "quantized" and "hubc" in card["tags"]
