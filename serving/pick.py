"""Pick the checkpoint to serve: the fastest one, at the team's traffic, that meets a latency SLO and a quality
budget, from measurements in the results store (what the store lacks is measured first, on real vLLM servers).

The rule (`rank`): among checkpoints whose TPOT (p50 by default) is at most `max_tpot_ms` and whose served
perplexity is at most `max_ppl_increase` above the base's, the lowest TPOT wins. Two TPOTs closer than the
measurement noise (the larger of the two checkpoints' round-to-round spread, at least `TIE_FLOOR`) are a tie, which
the smaller checkpoint wins, then the better perplexity. The base itself is a candidate (its increase is 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from advisor.measurement import LATENCY, QUALITY, CheckpointInfo, MeasurementRecord, hardware
from serving.bench import BenchConfig, bench
from serving.errors import ServingError
from serving.pareto import pareto_plot
from serving.quality import QualityConfig, measure_quality
from serving.results import stored_throughput
from serving.server import ServerConfig, VllmServer, installed_vllm_version
from serving.store import ResultsStore, latest_latency, latest_quality

TIE_FLOOR = 0.02
"""Smallest relative TPOT difference that is not a tie, whatever the measured spread (a setting, not a
measurement: the reason says which of the two decided a tie)."""

__all__ = ["SLO", "TIE_FLOOR", "Candidate", "PickConfig", "PickError", "PickResult", "QualityConfig", "base_ref",
           "pick", "rank"]


class PickError(ServingError):
    """The candidates cannot be compared (no base, different tokenizers, ...)."""


@dataclass
class SLO:
    """What the served checkpoint must meet; None leaves a dimension unconstrained."""

    max_tpot_ms: float | None = None
    """Largest acceptable time per output token, ms, at `tpot_percentile`."""
    max_ppl_increase: float | None = None
    """Largest acceptable served-perplexity increase over the base, as a fraction (0.05 = +5%)."""
    tpot_percentile: int = 50
    """Which TPOT percentile the SLO is on: 50 or 95."""

    def __post_init__(self) -> None:
        if self.tpot_percentile not in (50, 95):
            raise ValueError("tpot_percentile must be 50 or 95 (what vllm bench serve is asked for)")


@dataclass
class PickConfig:
    """Everything `pick` is told."""

    slo: SLO = field(default_factory=SLO)
    bench: BenchConfig = field(default_factory=BenchConfig)
    """How missing latency is measured (traffic, rounds, server settings)."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    remeasure: bool = False
    """Measure everything again instead of using stored measurements."""
    plot: Path | None = None
    """Where to write the Pareto plot (PNG); None writes none."""

    def server_config(self) -> ServerConfig:
        """The bench server settings, with room for a quality window."""
        server = self.bench.server_config()
        needed = self.quality.seq_len + 16
        if server.max_model_len < needed:
            server = replace(server, max_model_len=needed)
        return server


@dataclass
class Candidate:
    """One checkpoint with the numbers the choice is made from."""

    checkpoint: CheckpointInfo
    role: str
    """`base` or `variant`."""
    tpot_ms_p50: float
    tpot_ms_p95: float
    ttft_ms_p50: float
    ttft_ms_p95: float
    throughput_tok_s: float
    """Output tokens/s, p50 across the rounds of the latency measurement."""
    peak_memory_mib: float
    tpot_spread: float | None
    """Round-to-round relative range of TPOT p50 in the latency measurement; None when it is unknown (one
    round)."""
    perplexity: float | None
    ppl_increase: float | None
    """Served perplexity over the base's, minus 1; None when it cannot be compared."""
    latency_id: int | None
    quality_id: int | None
    measured_now: list[str] = field(default_factory=list)
    """What was measured in this call (`latency`, `quality`); empty when everything came from the store."""
    meets_slo: bool = False
    pareto: bool = False
    rank: int | None = None
    """1 = the choice; None for checkpoints that miss the SLO."""
    throughput_tok_s_p95: float | None = None
    """Output tokens/s that 95% of the rounds reached (p95, the slow tail); None for a record without rounds."""

    @property
    def label(self) -> str:
        return self.checkpoint.label

    def tpot(self, percentile: int) -> float:
        """TPOT at the SLO's percentile."""
        return self.tpot_ms_p50 if percentile == 50 else self.tpot_ms_p95

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


@dataclass
class PickResult:
    """Ranked candidates, the choice and why."""

    candidates: list[Candidate]
    """Meeting the SLO first, in rank order; then the rest by TPOT."""
    choice: Candidate | None
    reason: str
    """One sentence."""
    slo: SLO
    traffic: str
    hardware: str
    vllm_version: str
    dtype: str
    quality_text: str
    plot: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "choice": self.choice.label if self.choice else None,
            "choice_path": self.choice.checkpoint.path if self.choice else None,
            "reason": self.reason,
            "slo": asdict(self.slo),
            "traffic": self.traffic,
            "hardware": self.hardware,
            "engine": "vllm",
            "vllm_version": self.vllm_version,
            "dtype": self.dtype,
            "quality_text": self.quality_text,
            "plot": str(self.plot) if self.plot else None,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def base_ref(candidates: Sequence[CheckpointInfo]) -> str | None:
    """The base the candidates were made from, per hubc's report.json: its local folder when it still exists,
    else its Hub id; None when no candidate says. Raises PickError when they name different bases."""
    refs = set()
    for info in candidates:
        if info.base_path and Path(info.base_path).is_dir():
            refs.add(info.base_path)
        elif info.base_model_id:
            refs.add(info.base_model_id)
    if len(refs) > 1:
        raise PickError(
            f"the checkpoints come from different base models ({', '.join(sorted(refs))})",
            hint="pick among variants of one model, or name the base with --base",
        )
    return next(iter(refs), None)


def pick(
    candidates: Sequence[CheckpointInfo],
    base: CheckpointInfo,
    config: PickConfig | None = None,
    store: ResultsStore | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> PickResult:
    """Rank `base` and `candidates` against the SLO and name the best; measures (and stores) what `store` lacks."""
    config = config or PickConfig()
    store = store or ResultsStore()
    entries = [base] + [c for c in candidates if c.fingerprint != base.fingerprint]
    if len({e.fingerprint for e in entries}) != len(entries):
        raise PickError("a checkpoint was given twice", hint="pass each checkpoint once")
    server = config.server_config()
    hw, version = hardware(env=server.env), installed_vllm_version() or ""
    latency: dict[str, MeasurementRecord | None] = {}
    quality: dict[str, MeasurementRecord | None] = {}
    q = config.quality
    text = Path(q.text).name  # the label advisor.evaluate.read_text gives shipped texts and files alike
    if not config.remeasure:
        for e in entries:
            latency[e.fingerprint] = latest_latency(store, e, str(config.bench.traffic), server.dtype, hw, version)
            quality[e.fingerprint] = latest_quality(store, e, text, q.seq_len, q.windows, server.dtype, hw, version)
    measured: dict[str, list[str]] = {e.fingerprint: [] for e in entries}

    need_latency = [e for e in entries if latency.get(e.fingerprint) is None]
    need_quality = {e.fingerprint for e in entries if quality.get(e.fingerprint) is None}
    if need_latency:
        progress(f"measuring latency of {', '.join(e.label for e in need_latency)} ({config.bench.traffic})")

        def also_quality(info: CheckpointInfo, srv: VllmServer) -> None:
            if info.fingerprint in need_quality:
                quality[info.fingerprint] = measure_quality(srv, info, config.quality, store, progress)
                need_quality.discard(info.fingerprint)
                measured[info.fingerprint].append(QUALITY)

        bench_config = replace(config.bench, server=server)
        with_base = base if base in need_latency else None
        report = bench(
            [e for e in need_latency if e is not with_base], bench_config, base=with_base, store=store,
            progress=progress, on_server=also_quality,
        )  # fmt: skip
        for result in report.results:
            fp = result.checkpoint.fingerprint
            latency[fp] = next(
                r for r in store.records(kind=LATENCY, fingerprint=fp) if r.id == result.measurement_id
            )
            measured[fp].append(LATENCY)
    for info in entries:
        if info.fingerprint in need_quality:
            progress(f"measuring served perplexity of {info.label}")
            with VllmServer(info.path, server, config.bench.log_dir) as srv:
                quality[info.fingerprint] = measure_quality(srv, info, config.quality, store, progress)
            measured[info.fingerprint].append(QUALITY)

    base_quality = quality[base.fingerprint]
    assert base_quality is not None
    ranked = [
        _candidate(info, "base" if info is base else "variant", latency[info.fingerprint],
                   quality[info.fingerprint], base_quality, measured[info.fingerprint])
        for info in entries
    ]  # fmt: skip
    choice, reason = rank(ranked, config.slo)
    result = PickResult(
        candidates=ranked,
        choice=choice,
        reason=reason,
        slo=config.slo,
        traffic=str(config.bench.traffic),
        hardware=hw,
        vllm_version=_latest_version(latency.values()),
        dtype=server.dtype,
        quality_text=f"{config.quality.text}, {config.quality.windows} x {config.quality.seq_len} tokens",
    )
    if config.plot is not None:
        result.plot = pareto_plot(result, config.plot)
    return result


def rank(candidates: list[Candidate], slo: SLO) -> tuple[Candidate | None, str]:
    """Mark SLO, Pareto front and rank on each candidate, reorder the list (SLO-meeting first, in rank order), and
    return the choice with a one-sentence reason."""
    pct = slo.tpot_percentile
    for c in candidates:
        c.meets_slo = (slo.max_tpot_ms is None or c.tpot(pct) <= slo.max_tpot_ms) and (
            slo.max_ppl_increase is None
            or (c.ppl_increase is not None and c.ppl_increase <= slo.max_ppl_increase)
        )
        c.pareto = c.ppl_increase is not None and not any(
            o is not c and o.ppl_increase is not None
            and o.tpot(pct) <= c.tpot(pct) and o.ppl_increase <= c.ppl_increase
            and (o.tpot(pct) < c.tpot(pct) or o.ppl_increase < c.ppl_increase)
            for o in candidates
        )  # fmt: skip
    eligible = sorted((c for c in candidates if c.meets_slo), key=lambda c: c.tpot(pct))
    ordered: list[Candidate] = []
    while (
        eligible
    ):  # group the fastest with everything tied with it, then order the group by size and quality
        lead = eligible[0]
        group = [c for c in eligible if _tied(lead, c, pct)]
        group.sort(key=lambda c: (c.checkpoint.size_bytes, c.ppl_increase or 0.0, c.tpot(pct)))
        ordered += group
        eligible = [c for c in eligible if c not in group]
    for i, c in enumerate(ordered, 1):
        c.rank = i
    rest = sorted((c for c in candidates if not c.meets_slo), key=lambda c: c.tpot(pct))
    candidates[:] = ordered + rest
    slo_text = _slo_text(slo)
    if not ordered:
        fastest = min(candidates, key=lambda c: c.tpot(pct))
        return None, (
            f"no checkpoint meets {slo_text}: the fastest, {fastest.label}, has TPOT p{pct} "
            f"{fastest.tpot(pct):.1f} ms and perplexity {_pct(fastest.ppl_increase)} vs the base"
        )
    best, fastest = ordered[0], min(ordered, key=lambda c: c.tpot(pct))
    meets = f"of the {len(ordered)} of {len(candidates)} checkpoints that meet {slo_text}"
    quality = f"at perplexity {_pct(best.ppl_increase)} vs the base"
    if fastest is best:
        reason = f"{best.label} has the lowest TPOT p{pct} ({best.tpot(pct):.1f} ms) {meets}, {quality}"
        tied = [c for c in ordered[1:] if _tied(best, c, pct)]
        if tied:
            reason += (
                f"; {', '.join(c.label for c in tied)} {'is' if len(tied) == 1 else 'are'} as fast within the "
                "measurement noise but not smaller"
            )
        return best, reason
    smaller = best.checkpoint.size_bytes < fastest.checkpoint.size_bytes
    return best, (
        f"{best.label} is as fast as {fastest.label} within the measurement noise (TPOT p{pct} "
        f"{best.tpot(pct):.1f} vs {fastest.tpot(pct):.1f} ms; {_noise_text(best, fastest)}) and "
        + (f"smaller ({_mb(best)} vs {_mb(fastest)})" if smaller else "better in quality")
        + f", the best {meets}, {quality}"
    )


def _noise_text(a: Candidate, b: Candidate) -> str:
    """What the tie rests on: the spreads measured, which are unknown, and the floor when it decided."""
    known = [c.tpot_spread for c in (a, b) if c.tpot_spread is not None and math.isfinite(c.tpot_spread)]
    unknown = [c.label for c in (a, b) if c.tpot_spread is None or not math.isfinite(c.tpot_spread)]
    parts = [f"rounds varied by up to {max(known):.1%}"] if known else []
    if unknown:
        parts.append(f"the spread of {' and '.join(unknown)} is unknown (one round)")
    if not known or max(known) < TIE_FLOOR:
        parts.append(f"differences under {TIE_FLOOR:.0%} count as a tie")
    return "; ".join(parts)


def _mb(c: Candidate) -> str:
    return f"{c.checkpoint.size_bytes / 1e6:.0f} MB"


def _tied(a: Candidate, b: Candidate, pct: int) -> bool:
    noise = max(TIE_FLOOR, _finite(a.tpot_spread), _finite(b.tpot_spread))
    return abs(a.tpot(pct) - b.tpot(pct)) <= noise * min(a.tpot(pct), b.tpot(pct))


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else 0.0


def _slo_text(slo: SLO) -> str:
    parts = []
    if slo.max_tpot_ms is not None:
        parts.append(f"TPOT p{slo.tpot_percentile} <= {slo.max_tpot_ms:g} ms")
    if slo.max_ppl_increase is not None:
        parts.append(f"perplexity at most {slo.max_ppl_increase:+.1%} over the base")
    return " and ".join(parts) or "no SLO"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2%}"


def _candidate(
    info: CheckpointInfo,
    role: str,
    latency: MeasurementRecord | None,
    quality: MeasurementRecord | None,
    base_quality: MeasurementRecord,
    measured: list[str],
) -> Candidate:
    assert latency is not None and quality is not None
    m = latency.metrics
    throughput = stored_throughput(m)
    ppl = float(quality.metrics["perplexity"])
    comparable = quality.settings.get("windows_sha") == base_quality.settings.get("windows_sha")
    return Candidate(
        checkpoint=info,
        role=role,
        tpot_ms_p50=float(m["tpot_ms_p50"]),
        tpot_ms_p95=float(m["tpot_ms_p95"]),
        ttft_ms_p50=float(m["ttft_ms_p50"]),
        ttft_ms_p95=float(m["ttft_ms_p95"]),
        throughput_tok_s=float(throughput.get("output_throughput_tok_s_p50", m["output_throughput_tok_s"])),
        throughput_tok_s_p95=throughput.get("output_throughput_tok_s_p95"),
        peak_memory_mib=float(m.get("peak_memory_mib", 0.0)),
        tpot_spread=_spread(m.get("tpot_ms_p50_spread")),
        perplexity=ppl,
        ppl_increase=ppl / float(base_quality.metrics["perplexity"]) - 1.0 if comparable else None,
        latency_id=latency.id,
        quality_id=quality.id,
        measured_now=measured,
    )


def _spread(value: Any) -> float | None:
    """The stored spread; None (unknown) when a one-round record stored none."""
    return float(value) if isinstance(value, int | float) else None


def _latest_version(records: Any) -> str:
    versions = [r.engine_version for r in records if r is not None]
    return versions[-1] if versions else ""
