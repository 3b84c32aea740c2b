"""Leave-one-out check of the latency cost model (advisor.latency) on every stored `hubc bench` measurement.

    python benchmarks/latency_model.py [--store PATH] [--name latency_model]

Groups the results store's latency records by hardware and served dtype (a GPU's records go to the catalog target
whose name their hardware string carries, anything else to `cpu`), fits the model on each group and prints, for
every record, the measured TTFT/TPOT p50 next to what a fit on all the *other* records of its group predicts, then
the terms the full fit found (as effective bandwidths and compute rates) and the ones the data could not support.
Numbers are printed, not asserted, and written to benchmarks/results/NAME.txt (as printed) and NAME.json (every row
and fitted term). Records whose checkpoint folder was removed or rewritten since are left out and listed (their files
no longer say what was measured). The store is only read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from advisor.latency import LatencyModel, measured_on
from advisor.targets import load_catalog
from serving.store import LATENCY, ResultsStore, default_path, fingerprint


def _target_for(hardware: str, catalog: dict) -> str:
    return next((name for name, t in catalog.items() if t.kind == "gpu" and measured_on(t, hardware)), "cpu")


def _term(name: str, coef: float) -> str:
    """A fitted coefficient (ms per byte / FLOP / step) as the rate it stands for."""
    if name == "overhead":
        return f"{name} {coef:.2f} ms"
    if name == "layers":
        return f"{coef:.3f} ms per decoder layer"
    if coef == 0:
        return f"{name} 0"
    if name.startswith(("weights", "kv")):
        return f"{name} at {1e-6 / coef:.2f} GB/s"
    return f"{name} at {1e-9 / coef:.3f} TFLOPS"


def _pct(predicted: float | None, measured: float) -> str:
    return "n/a" if predicted is None else f"{predicted / measured - 1:+.0%}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=default_path(), help="results store (default: hubc's)")
    parser.add_argument("--name", default="latency_model", help="results file name (benchmarks/results/NAME.*)")
    args = parser.parse_args()
    if not args.store.is_file():
        raise SystemExit(f"no results store at {args.store}: run `hubc bench` first")
    printed: list[str] = []

    def say(line: str) -> None:
        printed.append(line)
        print(line, flush=True)

    records = ResultsStore(args.store).records(kind=LATENCY)
    catalog = load_catalog()
    stale = [
        r
        for r in records
        if not Path(r.checkpoint.path).is_dir()
        or fingerprint(Path(r.checkpoint.path)) != r.checkpoint.fingerprint
    ]
    groups: dict[tuple[str, str], list] = {}
    for r in records:
        if r not in stale:
            dtype = (r.settings.get("server") or {}).get("dtype") or "?"
            groups.setdefault((r.hardware, dtype), []).append(r)
    say(f"results store {args.store}: {len(records)} latency records, {len(stale)} left out (folder gone or "
          f"rewritten){': ids ' + ', '.join(str(r.id) for r in stale) if stale else ''}")  # fmt: skip
    out = []
    for (hardware, dtype), group in groups.items():
        target = _target_for(hardware, catalog)
        model = LatencyModel.fit(group, target, dtype)
        say(f"\n{hardware} (target {target}), served in {dtype}: {len(model.rows)} records")
        header = (f"{'id':>3}  {'checkpoint':<14} {'format':<10} {'traffic':<29} {'TTFT meas':>9} {'TTFT pred':>9} "
                  f"{'err':>5}  {'TPOT meas':>9} {'TPOT pred':>9} {'err':>5}")  # fmt: skip
        say(header)
        for h in model.held_out():
            say(f"{h.record_id:>3}  {h.label:<14} {h.formats:<10} {h.traffic:<29} {h.ttft_ms:>9.1f} "
                  f"{_ms(h.predicted_ttft_ms):>9} {_pct(h.predicted_ttft_ms, h.ttft_ms):>5}  {h.tpot_ms:>9.1f} "
                  f"{_ms(h.predicted_tpot_ms):>9} {_pct(h.predicted_tpot_ms, h.tpot_ms):>5}")  # fmt: skip
        ttft, tpot, count = model.loo_error()
        if count:
            say(f"leave-one-out mean |error| over the {count} records whose format has another measurement: "
                  f"TTFT {ttft:.1%}, TPOT {tpot:.1%}")  # fmt: skip
        coefficients = model.coefficients()
        for phase in ("tpot", "ttft"):
            terms = ", ".join(_term(k, v) for k, v in coefficients.get(phase, {}).items())
            dropped = ", ".join(coefficients.get(f"{phase}_not_identifiable", [])) or "none"
            say(
                f"{phase.upper()} fit (all records): {terms}; not identifiable from these records: {dropped}"
            )
        for note in model.skipped:
            say(f"skipped: {note}")
        out.append({"hardware": hardware, "target": target, "dtype": dtype, "coefficients": coefficients,
                    "loo_error": {"ttft": ttft, "tpot": tpot, "records": count},
                    "held_out": [vars(h) for h in model.held_out()], "skipped": model.skipped})  # fmt: skip
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    command = "python benchmarks/latency_model.py" + ("" if args.name == "latency_model" else f" --name {args.name}")
    (results / f"{args.name}.txt").write_text(f"$ {command}\n" + "\n".join(printed) + "\n")
    (results / f"{args.name}.json").write_text(json.dumps({"command": command, "groups": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
