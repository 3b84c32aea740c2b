"""What the benchmarks that drive the `hubc` command share: running it as a user would (the CLI module, from the
project root) and reading back the records of its last `hubc bench` run from hubc's results store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hubc(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `hubc ARGS` (echoed to stderr), stopping the benchmark if it fails; `capture`: keep its stdout."""
    print("$ hubc " + " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "hubplugin.cli", *args], cwd=ROOT, check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)


def last_bench_run(traffic: str) -> list:
    """The latency records (serving.store.Record) of the most recent `hubc bench` run at `traffic`, base included."""
    from serving.bench import Traffic
    from serving.store import LATENCY, ResultsStore

    records = ResultsStore().records(kind=LATENCY, traffic=str(Traffic.parse(traffic)))
    if not records:
        sys.exit(f"no latency records at {traffic}: did `hubc bench` run?")
    run_id = records[-1].settings["run_id"]
    return [r for r in records if r.settings["run_id"] == run_id]
