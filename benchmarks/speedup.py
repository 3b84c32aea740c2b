"""A decode-time goal on the demo model, as a user runs it: `hubc optimize demo --target cpu --scheme dense
--speedup X`. hubc plans it from the latency model of this CPU (the `hubc bench` / `hubc optimize` measurements in
the results store), chooses what to remove by estimated loss per millisecond saved, heals, serves base and variant
in one interleaved run and reports the measured speed-up next to the predicted one.

The latency model can only price a decoder layer apart from its bytes once the store holds checkpoints of this
hardware that differ in depth other than in proportion to their bytes. Where it does not yet, this script first
measures two probes, served and timed by `hubc optimize` like any variant (no healing; their quality is not the
point): the demo without 6 of its 30 layers, and the demo with a quarter of its MLP channels removed in every
layer. Their folders are kept under the work folder so their measurements stay current in the store.

    flock /tmp/vllm.lock .venv/bin/python benchmarks/speedup.py [--speedup 1.3 ...] [--heal-minutes 5]

Writes benchmarks/results/speedup.{json,md} (rows accumulate, one per speed-up, healing budget and CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HUBC = [sys.executable, "-m", "hubplugin.cli"]
sys.path.insert(0, str(ROOT))

PROBES = {
    "probe-depth": [x for i in range(20, 26) for x in ("--remove-layer", str(i))],
    "probe-width": ["--prune", "mlp=0.25,allocation=uniform,importance=magnitude"],
}


def work_folder() -> Path:
    from hubplugin.source import cache_dir

    return cache_dir() / "benchmarks" / "speedup"


def optimize(args: list[str], out: Path) -> dict:
    cmd = [*HUBC, "optimize", "demo", "--target", "cpu", "--scheme", "dense", *args, "--out", str(out), "--overwrite",
           "--format", "json"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        sys.exit(f"{' '.join(cmd[3:])}: {tail}")
    report = json.loads(proc.stdout)
    report["_wall_s"] = time.monotonic() - started
    report["_command"] = " ".join(["hubc", *cmd[3:]])
    return report


def layer_term_known() -> bool:
    """Whether this CPU's stored measurements already price a decoder layer apart from its bytes, as the plan
    reads them (advisor.latency.layer_ms)."""
    from advisor.checkpoint_features import checkpoint_features
    from advisor.latency import LatencyModel, layer_ms
    from advisor.measurement import Traffic
    from advisor.targets import get_target
    from hubplugin.source import resolve
    from serving.store import ResultsStore, target_latency_records

    target = get_target("cpu")
    dtype = target.serve_dtype_of("dense")
    records, _ = target_latency_records(ResultsStore(), target)
    model = LatencyModel.fit(records, target, dtype)
    return layer_ms(model, checkpoint_features(resolve("demo").path, dtype), Traffic(128, 32, 1)) > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speedup", type=float, nargs="+", default=[1.3])
    parser.add_argument("--heal-minutes", type=float, default=5.0)
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args()
    from advisor.measurement import cpuinfo

    work = work_folder()
    work.mkdir(parents=True, exist_ok=True)
    probes = []
    if not layer_term_known():
        for name, extra in PROBES.items():
            print(f"» {name}", flush=True)
            report = optimize([*extra, "--heal-minutes", "0", "--eval-windows", "2"], work / name)
            lat = report["latency"]
            probes.append({"name": name, "command": report["_command"], "tpot_ms_p50": {
                k: lat[k]["tpot_ms_p50"] for k in ("base", "variant")}, "layers": report["recipe"].get("actions")
                and sum(1 for a in report["recipe"]["actions"].values() if a == "remove-layer")})
    path = RESULTS / "speedup.json"
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    cpu = cpuinfo().get("model name", "unknown CPU")
    for goal in args.speedup:
        name = f"speedup-{goal:g}-heal-{args.heal_minutes:g}"
        print(f"» {name}", flush=True)
        report = optimize(["--speedup", str(goal), "--heal-minutes", str(args.heal_minutes), "--eval-windows",
                           str(args.eval_windows)], work / name)
        speed, lat = report["speedup"], report["latency"]
        quality = {tr["text"]: {
            "evaluated": tr["variant"]["perplexity"] / tr["base"]["perplexity"] - 1,
            "served": (tr["served_variant"]["perplexity"] / tr["served_base"]["perplexity"] - 1)
            if tr.get("served_variant") and tr.get("served_base") else None} for tr in report["quality"]}
        actions = report["recipe"]["actions"]
        row = {"name": name, "speedup": goal, "heal_minutes": args.heal_minutes, "cpu": cpu,
               "command": report["_command"], "wall_s": round(report["_wall_s"], 1), "plan": speed,
               "layers_removed": sum(1 for a in actions.values() if a == "remove-layer"),
               "layers_pruned": sum(1 for a in actions.values() if isinstance(a, dict) and "prune" in a),
               "linear_removed": 1 - report["linear_parameters"]["variant"] / report["linear_parameters"]["base"],
               "size_before": report["size_before"], "size_after": report["size_after"],
               "tpot_ms_p50": {k: lat[k]["tpot_ms_p50"] for k in ("base", "variant")},
               "quality": quality, "heal": {k: (report["transforms"].get("heal") or {}).get(k)
                                            for k in ("steps", "seconds", "held_out")},
               "probes": probes, "flags": report["flags"]}
        data["rows"] = [r for r in data["rows"] if (r["name"], r["cpu"]) != (name, cpu)] + [row]
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        (RESULTS / "speedup.md").write_text(render(data["rows"]))
        print(json.dumps({k: row[k] for k in ("layers_removed", "linear_removed")}
                         | {"predicted": speed.get("predicted_speedup"), "measured": speed.get("measured_speedup")}),
              flush=True)


def pct(x) -> str:
    return "—" if x is None else f"{x:+.1%}"


def render(rows: list[dict]) -> str:
    out = ["# A decode-time goal on the demo model: `hubc optimize demo --target cpu --scheme dense --speedup X`", "",
           ("SmolLM2-135M-Instruct. hubc plans the goal from this CPU's latency model (time per output token, one "
            "request of 128 prompt and 32 output tokens, as `hubc optimize` measures), removes MLP channels, heads "
            "and whole layers by estimated loss per millisecond saved, heals, and serves base and variant in one "
            "interleaved vLLM run. Δppl against the base on 16 × 512 tokens per text (transformers float32 "
            "'evaluated', vLLM 'served')."), "",
           ("Written by `flock /tmp/vllm.lock .venv/bin/python benchmarks/speedup.py [--speedup X ...] "
            "[--heal-minutes M]`; the probes (depth and width variants measured first, so the model can price a "
            "layer) are in the JSON."), "",
           ("| goal | CPU | latency model (measurements, ms per layer) | removed (layers, layers narrowed, linear "
            "weights) | TPOT base → variant (ms) | predicted | measured | heal (steps, min) | Δppl evaluated "
            "wikitext / licenses | Δppl served wikitext / licenses |"),
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p, q, t = r["plan"], r["quality"], r["tpot_ms_p50"]
        w, lic = q.get("wikitext2-test", {}), q.get("licenses", {})
        heal = f"{r['heal']['steps']}, {r['heal']['seconds'] / 60:.1f}" if r["heal"].get("steps") else "none"
        out.append(
            f"| {r['speedup']:g}× | {r['cpu']} | {p['basis']}, {p['measurements']}, {p['ms_per_layer']:.2f} | "
            f"{r['layers_removed']}, {r['layers_pruned']}, {r['linear_removed']:.1%} | {t['base']:.2f} → "
            f"{t['variant']:.2f} | {p.get('predicted_speedup', float('nan')):.2f}× | "
            f"{p.get('measured_speedup', float('nan')):.2f}× | {heal} | {pct(w.get('evaluated'))} / "
            f"{pct(lic.get('evaluated'))} | {pct(w.get('served'))} / {pct(lic.get('served'))} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
