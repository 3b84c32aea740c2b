"""The latency cost model: a roofline per target, calibrated by the measurements in the results store.

What a checkpoint costs (bytes a decode step reads, FLOPs per token, per format) is read from its own files by
`advisor.checkpoint_features`; this module turns it into milliseconds.

The traffic is what `hubc bench` sends (`vllm bench serve`, random prompts of `in` tokens, `out` tokens each, all
requests queued at once, at most `concurrency` in flight). Equal lengths make requests run in waves of
`concurrency`: a wave is prefilled together, then decodes as one batch (so a decode step carries no other
request's prefill, and none is modelled). So
- a decode step (TPOT) reads the weights once plus every sequence's KV cache at the mean context `in + out/2`,
  and multiplies `2 x params x concurrency` (+ attention) FLOPs: memory-bound at small batches;
- the median request's first token (TTFT) waits for about half of its wave's prefill, `in x (concurrency+1)/2`
  tokens of `2 x params` FLOPs each (+ causal attention): compute-bound at the peak rate of the format's compute
  dtype (int8 for W8A8-int8, FP8 for FP8 where the target has FP8 units, the served dtype otherwise). vLLM's
  chunked-prefill token budget (`max_num_batched_tokens`, 2048 on CPU servers) is not modelled: a wave larger
  than it is prefilled over several steps, which the half-wave count only approximates.

The roofline (`roofline`) turns these into a lower bound from the catalog's bandwidth and peak rates: max(bytes /
bandwidth, FLOPs / peak) for a decode step and for the wave's prefill. `cpu` has neither number in the catalog.

The fit (`LatencyModel.fit`): a non-negative linear model (scikit-learn `LinearRegression(positive=True)`,
weighted by 1/measured so that it minimises relative error and a slow emulated format does not dominate the shared
terms) on the same features, over every stored `hubc bench` record of the same hardware and served dtype:
    TPOT = sum over formats b_f * weight bytes_f  +  k * KV bytes  +  c * decode FLOPs  +  o  +  l * layers
    TTFT = sum over formats p_f * prefill FLOPs_f  +  o'  +  w * weight bytes
`l` is a cost per decoder layer and step that bytes and FLOPs do not carry (norms, rotary, attention bookkeeping,
one kernel launch after another): at small batches on CPUs it dominates, which is why removing whole layers speeds
decoding up where removing the same bytes across the width does not (benchmarks/results/structure_table.md, the
demo on `cpu`: 20% of the linear weights as 6 whole layers 1.36x, as MLP channels and heads 1.00x). It is kept
last, so only where the stored checkpoints differ in depth other than in proportion to their bytes.
Per-format terms are required: a format's kernels have their own cost per byte and per FLOP (measured on the AVX2
and AVX-512 dev boxes: W8A8-int8 is 2x slower than bf16 to no faster at batch 1, emulated FP8 13-27x slower,
so bytes alone predict nothing there). The shared terms are kept only where the data can tell them apart: each is added in
that order only if it raises the rank of the (weighted) design matrix. With one checkpoint per format, a fixed
overhead `o` cannot be separated from the per-format byte terms (it is carried by them, which overestimates how
much a smaller model of that format gains); with two traffic profiles, the KV term and the decode-FLOPs term cannot
be separated either (the KV term is kept and carries both). More model sizes and traffics make more terms
identifiable, with no code change. A checkpoint whose formats have no measurement on that hardware is predicted
from the roofline alone (GPU targets) or not at all (`cpu`: `NoMeasurementsError`, run `hubc bench` first).

Every `Prediction` is labelled a prediction and says what it rests on: the number of measurements, their hardware,
and the fit's leave-one-out relative error on them (each record predicted by a fit without it; a record that is the
only measurement of its format cannot be, and is counted apart).

This module receives measurements as data (`advisor.measurement.MeasurementRecord`s: `.checkpoint.path`,
`.traffic`, `.metrics`, `.settings`, `.hardware`), already filtered to the target's hardware by the caller; it does
not import the serving code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from advisor.checkpoint_features import (
    DTYPE_BYTES,
    PEAK_KEY,
    CheckpointFeatures,
    LatencyModelError,
    checkpoint_features,
)
from advisor.measurement import Traffic
from advisor.targets import KNOWN_SCHEMES, Target, get_target

__all__ = [
    "HeldOut",
    "LatencyModel",
    "NoMeasurementsError",
    "Prediction",
    "SpeedupPlan",
    "layer_ms",
    "measured_on",
    "roofline",
    "speedup_plan",
]

DECODE_SHARED = ("kv", "compute", "overhead", "layers")
PREFILL_SHARED = ("overhead", "weights")


class NoMeasurementsError(LatencyModelError):
    """A target with no roofline in the catalog (`cpu`) has no stored measurements to predict from."""


# ------------------------------------------------------------------------------------------------ roofline


def _peak(target: Target, key: str, dtype: str) -> float:
    rate = target.peak_tflops.get(key) or target.peak_tflops.get(PEAK_KEY[dtype])
    if not rate:
        raise LatencyModelError(f"target '{target.name}' lists no {PEAK_KEY[dtype]} compute rate",
                                hint=f"serve in its own dtype, {target.serve_dtype}")  # fmt: skip
    return rate * 1e12


def roofline(features: CheckpointFeatures, target: Target, load: Traffic) -> tuple[float, float] | None:
    """(TTFT, TPOT) in ms from the catalog's bandwidth and peak rates: a lower bound; None where the catalog has no
    bandwidth or peak rates (`cpu`)."""
    if not target.memory_bandwidth_gbs or not target.peak_tflops:
        return None
    bandwidth = target.memory_bandwidth_gbs * 1e9
    weights = sum(features.weight_bytes.values())
    seconds = {
        phase: sum(
            flops / _peak(target, features.compute[f], features.dtype) for f, flops in per_format.items()
        )
        for phase, per_format in (
            ("decode", features.decode_flops(load)),
            ("prefill", features.prefill_flops(load)),
        )
    }
    tpot = max((weights + features.decode_kv_bytes(load)) / bandwidth, seconds["decode"])
    ttft = max(weights / bandwidth, seconds["prefill"])
    return ttft * 1e3, tpot * 1e3


def measured_on(target: Target, hardware: str) -> bool:
    """Whether a stored record's hardware string names this GPU target: every `-`-separated part of the target's
    name is a word of it (`a100-80gb` matches 'NVIDIA A100-SXM4-80GB'). `cpu` records are matched by the caller
    against this machine's own hardware string."""
    words = set(re.findall(r"[a-z0-9]+", hardware.lower()))
    return target.kind == "gpu" and all(part in words for part in target.name.split("-"))


# ---------------------------------------------------------------------------------------------------- fit


def _decode_columns(f: CheckpointFeatures, load: Traffic) -> dict[str, float]:
    cols = {f"weights {fmt}": b for fmt, b in f.weight_bytes.items() if b > 0}
    return cols | {
        "kv": f.decode_kv_bytes(load),
        "compute": sum(f.decode_flops(load).values()),
        "overhead": 1.0,
        "layers": float(f.layers),
    }


def _prefill_columns(f: CheckpointFeatures, load: Traffic) -> dict[str, float]:
    cols = {f"prefill {fmt}": flops for fmt, flops in f.prefill_flops(load).items() if flops > 0}
    return cols | {"overhead": 1.0, "weights": sum(f.weight_bytes.values())}


@dataclass
class _Fit:
    coef: dict[str, float]
    """ms per unit (byte, FLOP, 1) of each kept column."""
    dropped: list[str]
    """Columns the data could not tell apart from the kept ones."""

    def predict(self, cols: dict[str, float], shared: Sequence[str]) -> float | None:
        if any(k not in self.coef for k, v in cols.items() if v and k not in shared):
            return None  # a format with no measurement in this fit
        return sum(self.coef.get(k, 0.0) * v for k, v in cols.items())


def _fit(rows: Sequence[tuple[dict[str, float], float]], shared: Sequence[str]) -> _Fit | None:
    import numpy as np
    from sklearn.linear_model import LinearRegression

    if not rows:
        return None
    names = sorted({k for cols, _ in rows for k, v in cols.items() if v and k not in shared})
    names += [k for k in shared if any(cols.get(k) for cols, _ in rows)]
    x = np.array([[cols.get(k, 0.0) for k in names] for cols, _ in rows], dtype=float)
    y = np.array([target for _, target in rows], dtype=float)
    scale = np.abs(x).max(axis=0)
    weighted = x / y[:, None]  # relative residuals: the rank test sees what the fit sees
    weighted /= np.abs(weighted).max(axis=0)
    kept: list[int] = []
    for j in range(len(names)):
        if np.linalg.matrix_rank(weighted[:, kept + [j]], tol=1e-9 * max(x.shape)) == len(kept) + 1:
            kept.append(j)
    reg = LinearRegression(fit_intercept=False, positive=True)
    reg.fit(x[:, kept] / scale[kept], y, sample_weight=1.0 / y**2)
    coef = {names[j]: float(c / scale[j]) for j, c in zip(kept, reg.coef_, strict=True)}
    return _Fit(coef, [names[j] for j in range(len(names)) if j not in kept])


@dataclass
class HeldOut:
    """One stored measurement and what a fit without it predicts for it (None: the only one of its format)."""

    record_id: int | None
    label: str
    formats: str
    traffic: str
    ttft_ms: float
    tpot_ms: float
    predicted_ttft_ms: float | None
    predicted_tpot_ms: float | None


@dataclass
class _Row:
    record: Any
    features: CheckpointFeatures
    load: Traffic
    ttft_ms: float
    tpot_ms: float


@dataclass
class Prediction:
    """Predicted TTFT and TPOT p50 of one checkpoint on one target at one traffic profile. Always a prediction,
    never a measurement: it says what it rests on."""

    checkpoint: str
    label: str
    formats: str
    target: str
    traffic: str
    dtype: str
    ttft_ms_p50: float
    tpot_ms_p50: float
    basis: str
    """`measurements` (the roofline features fitted on stored runs) or `roofline` (catalog numbers only)."""
    measurements: int
    """Stored measurements the fit rests on (0 for the roofline)."""
    hardware: list[str]
    loo_ttft_error: float | None
    """Mean absolute relative error of the leave-one-out predictions of TTFT over those measurements."""
    loo_tpot_error: float | None
    loo_count: int
    """Measurements the leave-one-out error is over (the only measurement of a format cannot be held out)."""
    roofline_ttft_ms: float | None
    roofline_tpot_ms: float | None
    measured: HeldOut | None = None
    """The latest stored measurement of this checkpoint at this traffic, with its leave-one-out prediction."""
    kind: str = "prediction"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LatencyModel:
    """The fitted model of one target, served dtype and set of measurements (`fit`), and its predictions."""

    target: Target
    dtype: str
    rows: list[_Row]
    skipped: list[str] = field(default_factory=list)
    """Why records were left out (another dtype, unreadable checkpoint folder, missing metrics)."""
    ttft_fit: _Fit | None = None
    """The TTFT fit over `rows` (None: nothing to fit)."""
    tpot_fit: _Fit | None = None
    """The TPOT fit over `rows`."""
    _held_out: list[HeldOut] | None = field(default=None, init=False, repr=False)

    @classmethod
    def fit(cls, records: Sequence[Any], target: Target | str, dtype: str) -> LatencyModel:
        """Fit on `records` (latency measurements of the target's hardware) served in `dtype`."""
        target = get_target(target) if isinstance(target, str) else target
        rows, skipped, cache = [], [], {}
        for r in records:
            served = (r.settings.get("server") or {}).get("dtype")
            m = r.metrics
            ttft, tpot = m.get("ttft_ms_p50"), m.get("tpot_ms_p50")
            if served != dtype:
                skipped.append(f"record {r.id}: served in {served}, not {dtype}")
            elif not (
                isinstance(ttft, int | float) and isinstance(tpot, int | float) and ttft > 0 and tpot > 0
            ):
                skipped.append(f"record {r.id}: no TTFT/TPOT p50")
            elif not r.traffic:
                skipped.append(f"record {r.id}: no traffic profile")
            else:
                try:
                    if r.checkpoint.path not in cache:
                        cache[r.checkpoint.path] = checkpoint_features(r.checkpoint.path, dtype)
                    rows.append(
                        _Row(r, cache[r.checkpoint.path], _traffic(r.traffic), float(ttft), float(tpot))
                    )
                except LatencyModelError as exc:
                    skipped.append(f"record {r.id}: {exc.message}")
        ttft_fit, tpot_fit = _fit_rows(rows)
        return cls(target=target, dtype=dtype, rows=rows, skipped=skipped, ttft_fit=ttft_fit, tpot_fit=tpot_fit)

    @property
    def hardware(self) -> list[str]:
        return sorted({r.record.hardware for r in self.rows})

    def coefficients(self) -> dict[str, dict[str, float]]:
        """The fitted coefficients, ms per byte / FLOP / step, and the shared terms the data could not support."""
        out: dict[str, Any] = {}
        for name, fit in (("ttft", self.ttft_fit), ("tpot", self.tpot_fit)):
            if fit is not None:
                out[name] = dict(fit.coef)
                out[f"{name}_not_identifiable"] = list(fit.dropped)
        return out

    def held_out(self) -> list[HeldOut]:
        """Leave-one-out: every measurement predicted by a fit on all the others."""
        if self._held_out is None:
            self._held_out = []
            for i, row in enumerate(self.rows):
                ttft, tpot = _fit_rows(self.rows[:i] + self.rows[i + 1 :])
                self._held_out.append(HeldOut(
                    record_id=row.record.id, label=_label(row), formats=row.features.label, traffic=str(row.load),
                    ttft_ms=row.ttft_ms, tpot_ms=row.tpot_ms,
                    predicted_ttft_ms=_apply(ttft, _prefill_columns(row.features, row.load), PREFILL_SHARED),
                    predicted_tpot_ms=_apply(tpot, _decode_columns(row.features, row.load), DECODE_SHARED),
                ))  # fmt: skip
        return self._held_out

    def loo_error(self) -> tuple[float | None, float | None, int]:
        """Mean absolute relative leave-one-out error of TTFT and TPOT, and how many measurements it is over."""
        done = [
            h for h in self.held_out() if h.predicted_ttft_ms is not None and h.predicted_tpot_ms is not None
        ]
        if not done:
            return None, None, 0
        ttft = sum(abs(h.predicted_ttft_ms / h.ttft_ms - 1) for h in done) / len(done)  # type: ignore[operator]
        tpot = sum(abs(h.predicted_tpot_ms / h.tpot_ms - 1) for h in done) / len(done)  # type: ignore[operator]
        return ttft, tpot, len(done)

    def predict(self, features: CheckpointFeatures, load: Traffic, label: str | None = None) -> Prediction:
        """Predict one checkpoint: from the fit where the measurements cover its formats, else from the target's
        roofline; NoMeasurementsError where neither is possible (`cpu` without measurements of its formats)."""
        for fmt in features.formats:
            if fmt in KNOWN_SCHEMES:
                self.target.require_scheme(fmt)
        if features.dtype != self.dtype:
            raise LatencyModelError(
                f"features read for {features.dtype}, the model is fitted for {self.dtype}"
            )
        bound = roofline(features, self.target, load)
        ttft = _apply(self.ttft_fit, _prefill_columns(features, load), PREFILL_SHARED)
        tpot = _apply(self.tpot_fit, _decode_columns(features, load), DECODE_SHARED)
        common: dict[str, Any] = {
            "checkpoint": features.path, "label": label or Path(features.path).name, "formats": features.label,
            "target": self.target.name, "traffic": str(load), "dtype": self.dtype,
            "roofline_ttft_ms": bound[0] if bound else None, "roofline_tpot_ms": bound[1] if bound else None,
        }  # fmt: skip
        if ttft is not None and tpot is not None:
            loo_ttft, loo_tpot, loo_count = self.loo_error()
            return Prediction(**common, ttft_ms_p50=ttft, tpot_ms_p50=tpot, basis="measurements",
                              measurements=len(self.rows), hardware=self.hardware, loo_ttft_error=loo_ttft,
                              loo_tpot_error=loo_tpot, loo_count=loo_count, measured=self._measured(features, load))  # fmt: skip
        if bound is None:
            what = f" of {features.label} checkpoints" if self.rows else ""
            raise NoMeasurementsError(
                f"target '{self.target.name}' has no memory bandwidth or peak rate in the catalog, so its latency is "
                f"predicted from measurements only, and the results store has no measurements{what} served in "
                f"{self.dtype} on this hardware",
                hint=f"run `hubc bench {features.path} --dtype {self.dtype}` first",
            )
        return Prediction(**common, ttft_ms_p50=bound[0], tpot_ms_p50=bound[1], basis="roofline", measurements=0,
                          hardware=[], loo_ttft_error=None, loo_tpot_error=None, loo_count=0)  # fmt: skip

    def _measured(self, features: CheckpointFeatures, load: Traffic) -> HeldOut | None:
        matches = [i for i, r in enumerate(self.rows) if r.features.path == features.path and str(r.load) == str(load)]
        return self.held_out()[matches[-1]] if matches else None


def _fit_rows(rows: Sequence[_Row]) -> tuple[_Fit | None, _Fit | None]:
    ttft = _fit([(_prefill_columns(r.features, r.load), r.ttft_ms) for r in rows], PREFILL_SHARED)
    tpot = _fit([(_decode_columns(r.features, r.load), r.tpot_ms) for r in rows], DECODE_SHARED)
    return ttft, tpot


def _traffic(text: str) -> Traffic:
    try:
        return Traffic.parse(text)
    except ValueError as exc:
        raise LatencyModelError(f"bad traffic '{text}' ({exc})", hint="use in=N,out=N,concurrency=N") from None


def _apply(fit: _Fit | None, cols: dict[str, float], shared: Sequence[str]) -> float | None:
    return None if fit is None else fit.predict(cols, shared)


def _label(row: _Row) -> str:
    info = row.record.checkpoint
    return getattr(info, "name", None) or Path(info.path).name


# ------------------------------------------------------------------------------------------ latency budget



@dataclass
class SpeedupPlan:
    """A decode-step (TPOT) goal turned into what structure must save, from the fitted model's own terms: the
    milliseconds one removed decoder-linear weight saves (in the variant's format: its bytes read and its FLOPs)
    and one removed decoder layer (its cost per layer and its KV cache), at one traffic. A prediction: it says what
    it rests on."""

    speedup: float
    traffic: str
    base_ms: float
    """Predicted TPOT of the base."""
    start_ms: float
    """Predicted TPOT of the variant before structure: the base with its decoder linears in the variant's format."""
    goal_ms: float
    ms_per_param: float
    ms_per_layer: float
    """Beyond the layer's weights (0 where the measurements cannot tell a cost per layer apart)."""
    basis: str
    """`measurements` or `roofline` (advisor.latency.Prediction.basis)."""
    measurements: int
    loo_tpot_error: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def save_ms(self) -> float:
        return max(0.0, self.start_ms - self.goal_ms)

    def spec(self) -> dict[str, float]:
        """The structure request's `latency` block (advisor.structure_search.choose)."""
        return {"save_ms": self.save_ms, "ms_per_param": self.ms_per_param, "ms_per_layer": self.ms_per_layer}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"save_ms": self.save_ms}


def layer_ms(model: LatencyModel, base: CheckpointFeatures, load: Traffic) -> float:
    """What one more decoder layer of `base` costs a decode step at `load` by the fitted terms, beyond its weights:
    the per-layer term and the layer's KV cache (at one traffic profile the KV term carries both, as both scale
    with depth). 0 where the measurements separate neither."""
    coef = model.tpot_fit.coef if model.tpot_fit else {}
    return coef.get("layers", 0.0) + coef.get("kv", 0.0) * base.decode_kv_bytes(load) / base.layers


def speedup_plan(model: LatencyModel, base: CheckpointFeatures, load: Traffic, speedup: float, linear_params: int,
                 fmt: str, bytes_per_param: float) -> SpeedupPlan:
    """What structure must save for the variant to decode `speedup` times faster than the base (predicted TPOT
    ratio at `load`). `linear_params`: the base's decoder-linear weights; `fmt`: the variant's linear format
    (`dense` or a scheme id) and `bytes_per_param` what one of its weights takes with scales. Raises
    NoMeasurementsError where nothing predicts the format on this target, LatencyModelError where the goal needs
    more than MAX_PRUNE of the decoder (advisor.size_budget's bound, half its linear weights; half its
    layers here)."""
    if not speedup > 1:
        raise LatencyModelError(f"a speed-up must be above 1, not {speedup!r}", hint="e.g. --speedup 1.3")
    prediction = model.predict(base, load)
    served = DTYPE_BYTES[base.dtype]
    per_step = load.concurrency
    notes = []
    if prediction.basis == "measurements":
        coef = model.tpot_fit.coef  # type: ignore[union-attr]
        if f"weights {fmt}" not in coef:
            raise NoMeasurementsError(
                f"the results store has no {fmt} checkpoint measured on this hardware, so what its weights cost "
                "per decode step is unknown",
                hint=f"measure one first (`hubc bench` on a {fmt} checkpoint hubc wrote), or give --scheme dense")
        per_byte = {"dense": coef["weights dense"], fmt: coef[f"weights {fmt}"]}
        per_flop = coef.get("compute", 0.0)
        per_layer = layer_ms(model, base, load)
        if per_layer <= 0:
            notes.append("the stored measurements cannot tell a cost per decoder layer from the cost per byte (no "
                         "two measured checkpoints differ in depth other than in proportion to their bytes): the "
                         "plan counts bytes only; on CPUs, where a decode step pays per layer, a depth-pruned "
                         "checkpoint measured once (e.g. `hubc optimize --prune layers=N`) makes it count layers")
    else:
        bandwidth = model.target.memory_bandwidth_gbs * 1e9  # a roofline exists only with a bandwidth
        per_byte = {"dense": 1e3 / bandwidth, fmt: 1e3 / bandwidth}
        per_flop = 0.0
        per_layer = 1e3 / bandwidth * base.decode_kv_bytes(load) / base.layers
        notes.append("no measurements of this target: the plan is the catalog's roofline (bytes read per decode "
                     "step), a lower bound")
    ms_per_param = bytes_per_param * per_byte[fmt] + 2.0 * per_step * per_flop
    start = prediction.tpot_ms_p50 + linear_params * (bytes_per_param * per_byte[fmt] - served * per_byte["dense"])
    goal = prediction.tpot_ms_p50 / speedup
    plan = SpeedupPlan(speedup=speedup, traffic=str(load), base_ms=prediction.tpot_ms_p50, start_ms=start,
                       goal_ms=goal, ms_per_param=ms_per_param, ms_per_layer=per_layer, basis=prediction.basis,
                       measurements=prediction.measurements, loo_tpot_error=prediction.loo_tpot_error, notes=notes)
    from advisor.size_budget import MAX_PRUNE

    reachable = MAX_PRUNE * (linear_params * ms_per_param + base.layers * per_layer)
    if plan.save_ms > reachable:
        best = prediction.tpot_ms_p50 / max(start - reachable, 1e-9)
        raise LatencyModelError(
            f"a {speedup:g}x faster decode step ({goal:.2f} ms from the base's predicted {prediction.tpot_ms_p50:.2f}"
            f" ms) needs more than half the decoder removed ({fmt} weights start at {start:.2f} ms; half the decoder "
            f"saves at most {reachable:.2f} ms)",
            hint=f"ask for at most --speedup {math.floor(best * 100) / 100:g}" if best > 1 else
                 "choose a faster --scheme for this target (hubc bench compares them)")
    return plan
