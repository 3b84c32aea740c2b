"""How fast does `hubc watch` answer Hub webhook deliveries under load, and does every replay collapse into one job?

    python benchmarks/webhook_load.py [--deliveries 500] [--concurrency 20] [--repos 25]

Starts the in-process fake Hub of tests/fakehub.py with `--repos` model repos (one commit each: a config.json),
starts `hubc watch --no-run` on it (real uvicorn, real SQLite queue in a temporary $HUBC_CACHE, two targets), and
sends `--deliveries` v3 `repo.content` deliveries — every repo's event replayed deliveries/repos times, shuffled —
from `--concurrency` threads, each delivery on a new HTTP connection as the Hub opens them. The dispatcher screens
the recorded deliveries against the fake Hub while the load runs. Response time is measured by the sender, from
connect to the last byte of the answer. Then it waits for every delivery to be screened and counts the jobs made,
which must equal the distinct (repo, sha, target) triples delivered.

Writes benchmarks/results/webhook_load.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SECRET = "benchmark-secret"
TARGETS = ("a10g", "cpu")


def cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return f"{m.group(1).strip() if m else platform.processor()}, {os.cpu_count()} cores"


def delivery(repo: str, sha: str) -> bytes:
    return json.dumps({
        "event": {"action": "update", "scope": "repo.content"},
        "repo": {"type": "model", "name": repo, "id": "6" * 24, "private": False, "headSha": sha,
                 "url": {"web": f"https://huggingface.co/{repo}"}, "owner": {"id": "5" * 24}},
        "webhook": {"id": "7" * 24, "version": 3},
        "updatedRefs": [{"ref": "refs/heads/main", "oldSha": None, "newSha": sha}],
    }).encode()


def post(host: str, port: int, body: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", "/webhook", body, {"Content-Type": "application/json", "X-Webhook-Secret": SECRET})
        answer = conn.getresponse()
        answer.read()
        status = answer.status
    finally:
        conn.close()
    return status, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--repos", type=int, default=25)
    parser.add_argument("--name", default="webhook_load", help="results file name under benchmarks/results")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from fakehub import FakeHub

    work = Path(tempfile.mkdtemp(prefix="hubc-webhook-load-"))
    hub = FakeHub().start()
    shas = {f"org/model-{i:03d}": hub.add_repo(f"org/model-{i:03d}", {"config.json": '{"model_type": "llama"}'})
            for i in range(args.repos)}
    events = [(repo, sha) for repo, sha in shas.items()] * -(-args.deliveries // args.repos)
    random.Random(0).shuffle(events)
    events = events[: args.deliveries]
    (work / "watch.yaml").write_text(json.dumps({"watch": {"owners": ["org"]}, "targets": list(TARGETS)}))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HUBC_CACHE": str(work / "cache"), "HF_HOME": str(work / "hf"),
           "HUBC_WEBHOOK_SECRET": SECRET, "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost"}
    log = open(work / "watch.log", "wb")  # noqa: SIM115 - held until the server stops
    proc = subprocess.Popen([sys.executable, "-m", "hubplugin.cli", "watch", "--config", str(work / "watch.yaml"),
                             "--port", "0", "--no-run"], stdout=log, stderr=log, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"listening on http://([\d.]+):(\d+)/webhook", (work / "watch.log").read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"hubc watch did not start:\n{(work / 'watch.log').read_text()}")
            time.sleep(0.1)
        host, port = m.group(1), int(m.group(2))
        for _ in range(5):  # warm-up: first-request costs are not what the Hub sees in steady state
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", "/health")
            conn.getresponse().read()
            conn.close()

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(lambda e: post(host, port, delivery(*e)), events))
        wall = time.perf_counter() - started

        from hubplugin.watch.queue import JobQueue

        queue = JobQueue(work / "cache" / "watch" / "jobs.sqlite")
        deadline = time.monotonic() + 120
        while any(queue.delivery(r, s)["state"] == "pending" for r, s in shas.items()):
            if time.monotonic() > deadline:
                raise SystemExit("deliveries were not screened within 120 s")
            time.sleep(0.2)
        jobs = queue.jobs()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        hub.stop()

    times_ms = [seconds * 1000 for _, seconds in answers]
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    triples = {(repo, sha, target) for repo, sha in set(events) for target in TARGETS}
    made = {(j.repo, j.sha, j.target) for j in jobs}
    result = {
        "date": datetime.date.today().isoformat(),
        "hubc_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=ROOT, check=False).stdout.strip(),
        "hardware": cpu_model(),
        "settings": {"deliveries": len(events), "concurrency": args.concurrency, "repos": args.repos,
                     "targets": list(TARGETS), "runner": "none (--no-run): the endpoint and the dispatcher only",
                     "connection": "a new HTTP connection per delivery"},
        "response_ms": {"p50": round(percentile(times_ms, 50), 2), "p95": round(percentile(times_ms, 95), 2),
                        "p99": round(percentile(times_ms, 99), 2), "max": round(max(times_ms), 2),
                        "mean": round(statistics.mean(times_ms), 2)},
        "throughput_per_s": round(len(events) / wall, 1),
        "statuses": statuses,
        "jobs_made": len(jobs),
        "distinct_triples": len(triples),
        "jobs_match_triples": made == triples and len(jobs) == len(triples),
        "p95_under_200ms": percentile(times_ms, 95) < 200,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result["response_ms"]
    md = [
        "# `hubc watch` under webhook load",
        "",
        (f"`python benchmarks/webhook_load.py --deliveries {len(events)} --concurrency {args.concurrency} "
        f"--repos {args.repos}` on {result['hardware']}, {result['date']}, hubc {result['hubc_commit']}."),
        "",
        (f"{len(events)} v3 `repo.content` deliveries ({args.repos} repos, each event replayed, shuffled) from "
        f"{args.concurrency} concurrent senders, a new connection each, to `hubc watch --no-run` (uvicorn, SQLite "
        "queue in WAL mode; the dispatcher screened deliveries against the fake Hub of tests/fakehub.py meanwhile). "
        "Times are the sender's, connect to last byte."),
        "",
        "| measure | value |",
        "|---|---|",
        f"| response time p50 | {r['p50']:.1f} ms |",
        f"| response time p95 | {r['p95']:.1f} ms |",
        f"| response time p99 / max | {r['p99']:.1f} / {r['max']:.1f} ms |",
        f"| deliveries per second | {result['throughput_per_s']} |",
        f"| answers | {', '.join(f'{n}× {s}' for s, n in sorted(statuses.items()))} |",
        f"| jobs made | {len(jobs)} (distinct repo, sha, target triples: {len(triples)}) |",
        "",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md))
    print("\n".join(md))
    if not (result["p95_under_200ms"] and result["jobs_match_triples"]):
        raise SystemExit("p95 over 200 ms or jobs made differ from the distinct triples")


if __name__ == "__main__":
    main()
