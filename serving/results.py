"""What one `hubc bench` run measured: every round of every checkpoint, the numbers that summarise them, and the
report. Latency percentiles are vLLM's over the requests of a run (median over rounds); throughput, one number per
run, is summarised as p50/p95 across rounds."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from advisor.measurement import CheckpointInfo, Traffic

THROUGHPUT_METRICS = ("output_throughput_tok_s", "request_throughput_rps")
"""Per-run throughputs (vLLM's `output_throughput` and `request_throughput`), summarised as p50/p95 across rounds."""


@dataclass
class RoundMetrics:
    """One `vllm bench serve` run on one checkpoint."""

    round: int
    ttft_ms_p50: float
    ttft_ms_p95: float
    tpot_ms_p50: float
    tpot_ms_p95: float
    itl_ms_p50: float
    itl_ms_p95: float
    output_throughput_tok_s: float
    """Generated tokens per second over the run."""
    request_throughput_rps: float
    peak_memory_mib: float
    """Peak memory of the server's whole process tree during the run (sum of PSS; RSS where PSS is unreadable)."""
    duration_s: float
    completed: int
    seed: int


_MEDIAN_METRICS = [f.name for f in dataclasses.fields(RoundMetrics)][1:9]


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) of `values`, interpolated linearly between the closest ranks (numpy's default
    method): the median for q=50, the smallest value for q=0."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def throughput_percentiles(values: Sequence[float], name: str) -> dict[str, float]:
    """`{name}_p50` and `{name}_p95` of one throughput's per-round values. Higher is better, so p95 is the slow
    tail, the rate 95% of rounds reached (the 5th percentile of the values), as latency p95 is the slow tail."""
    return {f"{name}_p50": percentile(values, 50), f"{name}_p95": percentile(values, 5)}


def stored_throughput(metrics: dict[str, Any]) -> dict[str, float]:
    """Throughput p50/p95 of a stored latency record (`CheckpointResult.metrics`). Records written before these
    were stored have their per-round values, from which they are computed the same way; {} when neither is there."""
    keys = [f"{name}_{p}" for name in THROUGHPUT_METRICS for p in ("p50", "p95")]
    if all(isinstance(metrics.get(key), int | float) for key in keys):
        return {key: float(metrics[key]) for key in keys}
    rounds = metrics.get("rounds") or []
    out: dict[str, float] = {}
    for name in THROUGHPUT_METRICS:
        values = [
            float(r[name]) for r in rounds if isinstance(r, dict) and isinstance(r.get(name), int | float)
        ]
        if values and len(values) == len(rounds):
            out |= throughput_percentiles(values, name)
    return out


@dataclass
class CheckpointResult:
    """Every round of one checkpoint, and the numbers that summarise them."""

    checkpoint: CheckpointInfo
    role: str
    """`base` or `variant`."""
    rounds: list[RoundMetrics] = field(default_factory=list)
    measurement_id: int | None = None
    """Row id of the stored record."""

    @property
    def summary(self) -> dict[str, float]:
        """Median over rounds of each latency/throughput number (`output_throughput_tok_s` and
        `request_throughput_rps` are these medians, the names older stores have); throughput p50/p95 across
        rounds (`output_throughput_tok_s_p50`, `..._p95`, `request_throughput_rps_p50`, `..._p95`); peak memory,
        the maximum over rounds."""
        out = {name: statistics.median(getattr(r, name) for r in self.rounds) for name in _MEDIAN_METRICS}
        for name in THROUGHPUT_METRICS:
            out |= throughput_percentiles([getattr(r, name) for r in self.rounds], name)
        out["peak_memory_mib"] = max(r.peak_memory_mib for r in self.rounds)
        return out

    @property
    def spread(self) -> float:
        """Relative range of TPOT p50 across rounds: (max - min) / median."""
        values = [r.tpot_ms_p50 for r in self.rounds]
        return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else float("inf")

    def metrics(self) -> dict[str, Any]:
        """What the store keeps: the summary, the spread, and every round."""
        return {
            **self.summary,
            "tpot_ms_p50_spread": self.spread if len(self.rounds) > 1 else None,  # unknown from one round
            "rounds": [asdict(r) for r in self.rounds],
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON reports."""
        return {
            "checkpoint": asdict(self.checkpoint),
            "label": self.checkpoint.label,
            "role": self.role,
            "measurement_id": self.measurement_id,
            **self.metrics(),
        }


@dataclass
class BenchReport:
    """The result of one interleaved benchmark run."""

    traffic: Traffic
    results: list[CheckpointResult]
    hardware: str
    """Hardware actually used."""
    vllm_version: str
    settings: dict[str, Any]
    """Server and benchmark settings, as stored with every record."""
    rounds: int
    converged: bool
    """Whether every checkpoint's TPOT p50 spread ended at or below `max_spread`."""
    run_id: str
    notes: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    """Server logs, the client's log and vLLM's result files of this run."""

    @property
    def base(self) -> CheckpointResult | None:
        """The base's result, when a base was given."""
        return next((r for r in self.results if r.role == "base"), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON reports."""
        return {
            "traffic": str(self.traffic),
            "hardware": self.hardware,
            "engine": "vllm",
            "vllm_version": self.vllm_version,
            "settings": self.settings,
            "rounds": self.rounds,
            "converged": self.converged,
            "run_id": self.run_id,
            "notes": self.notes,
            "log_dir": str(self.log_dir) if self.log_dir else None,
            "results": [r.to_dict() for r in self.results],
        }
