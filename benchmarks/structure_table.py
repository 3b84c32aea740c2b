"""Structure on the demo model as a user runs it: `hubc optimize demo --target cpu` with each way of removing
parameters (hubc's default choice of MLP channels and heads, uniform MLP pruning, whole layers, whitened low-rank
factorization), at 20% and 40% of the decoder-linear parameters, healed by distillation for a few minutes, and
composed with quantization. Per run: parameters and size, Δppl on wikitext-2 test and licenses.txt before healing
and after (held-out text, transformers), evaluated and served, and vLLM's time per output token against the base's,
measured in the same interleaved run.

    .venv/bin/python benchmarks/structure_table.py [--only NAME,...] [--heal-minutes 5]

Runs serve with vLLM: run this under `flock /tmp/vllm.lock`. Rows accumulate in
benchmarks/results/structure_table.json (one per run name and healing budget, replaced when rerun); the Markdown table is
benchmarks/results/structure_table.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HUBC = [sys.executable, "-m", "hubplugin.cli"]
TEXTS = ("wikitext2-test", "licenses")

# Run name → (method label, optimize arguments). The demo's decoder linears are 75% MLP (3 × 576 × 1536 per layer
# against 2 × 576 × 576 + 2 × 576 × 192 for attention): mlp=0.267 / 0.533 removes 20% / 40% of them, and 6 / 12
# of its 30 layers do the same.
RUNS: dict[str, tuple[str, list[str]]] = {
    "params-20": ("hubc default: MLP channels + heads, ranked globally", ["--scheme", "dense", "--prune", "0.2"]),
    "params-40": ("hubc default: MLP channels + heads, ranked globally", ["--scheme", "dense", "--prune", "0.4"]),
    "mlp-uniform-20": ("uniform MLP channels (activation importance)",
                       ["--scheme", "dense", "--prune", "mlp=0.267,allocation=uniform"]),
    "mlp-uniform-40": ("uniform MLP channels (activation importance)",
                       ["--scheme", "dense", "--prune", "mlp=0.533,allocation=uniform"]),
    "mlp-20": ("MLP channels ranked across layers (per-layer widths, no heads)",
               ["--scheme", "dense", "--prune", "mlp=0.267"]),
    "layers-20": ("whole layers (block influence)", ["--scheme", "dense", "--prune", "layers=6"]),
    "layers-40": ("whole layers (block influence)", ["--scheme", "dense", "--prune", "layers=12"]),
    "factorize-20": ("whitened SVD, ranks per linear", ["--scheme", "dense", "--factorize", "0.2"]),
    "factorize-40": ("whitened SVD, ranks per linear", ["--scheme", "dense", "--factorize", "0.4"]),
    "params-20-w8a8": ("hubc default 20% + W8A8-int8", ["--scheme", "w8a8-int8", "--prune", "0.2"]),
    "params-20-w4a16": ("hubc default 20% + W4A16", ["--scheme", "w4a16", "--prune", "0.2"]),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_one(name: str, work: Path, heal_minutes: float, eval_windows: int, extra: list[str] | None = None) -> dict:
    """Run `name` (RUNS) with `extra` optimize arguments (e.g. --eval-text, --calibration-text) appended."""
    label, args = RUNS[name]
    cmd = [*HUBC, "optimize", "demo", "--target", "cpu", *args, "--heal-minutes", str(heal_minutes),
           "--eval-windows", str(eval_windows), "--out", str(work / name), "--overwrite", "--format", "json",
           *(extra or [])]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{name}: hubc failed: {tail}", file=sys.stderr)
        return {"name": name, "method": label, "command": " ".join(["hubc", *cmd[3:]]), "failed": tail}
    report = json.loads(proc.stdout)
    heal = (report["transforms"] or {}).get("heal") or {}
    quality = {}
    for tr in report["quality"]:
        base, var = tr["base"]["perplexity"], tr["variant"]["perplexity"]
        served = (tr.get("served_variant") or {}).get("perplexity")
        served_base = (tr.get("served_base") or {}).get("perplexity")
        held = (heal.get("held_out") or {}).get(tr["text"])
        quality[tr["text"]] = {
            "base": base, "evaluated": var, "delta_evaluated": var / base - 1,
            "served_base": served_base, "served": served,
            "delta_served": served / served_base - 1 if served and served_base else None,
            # Before/after healing on the held-out windows the healing report scores (8 per text).
            "held_out": held,
            "delta_before_heal": held["before"] / held["base"] - 1 if held else None,
            "delta_after_heal": held["after"] / held["base"] - 1 if held else None,
        }
    latency = report.get("latency") or {}
    tpot = {k: (latency.get(k) or {}).get("tpot_ms_p50") for k in ("base", "variant")}
    return {
        "name": name, "method": label, "command": " ".join(["hubc", *cmd[3:]]),
        "scheme": report["recipe"]["scheme"], "wall_s": round(wall, 1),
        "linear_parameters": report["linear_parameters"],
        "linear_removed": 1 - report["linear_parameters"]["variant"] / report["linear_parameters"]["base"],
        "size_before": report["size_before"], "size_after": report["size_after"],
        "checkpoint_dtype": report["checkpoint_dtype"], "architecture": report["architecture"],
        "heal": {k: heal.get(k) for k in ("steps", "seconds", "tokens", "dtype", "kl_start", "kl_end", "flags", "lr")},
        "quality": quality, "tpot_ms_p50": tpot,
        "speedup": tpot["base"] / tpot["variant"] if tpot["base"] and tpot["variant"] else None,
        "served": report["served"], "not_served_reason": report["not_served_reason"],
        "latency_settings": latency.get("settings"), "hardware": latency.get("hardware"),
        "vllm": latency.get("vllm_version"), "flags": report["flags"],
    }


def pct(x) -> str:
    return "—" if x is None else f"{x:+.1%}"


def render(rows: list[dict], meta: dict) -> str:
    out = ["# Structure on the demo model: pruning, layer removal and factorization, healed", "",
           (f"SmolLM2-135M-Instruct, `hubc optimize demo --target cpu` per row (command in the JSON), on {meta['cpu']}. "
           "Δppl against the base on the evaluation windows (16 × 512 tokens per text, transformers float32 for "
           "'evaluated'; vLLM teacher-forced for 'served'); 'before heal' / 'after heal' are the healing report's "
           "held-out windows (8 × 512 per text, never trained on). Healing trains on wikitext-2 valid plus text the "
           "base model sampled itself. TPOT: vLLM p50 time per output token, base and variant interleaved in one "
           "run on the same server settings."), "",
           "Written by `.venv/bin/python benchmarks/structure_table.py`.", "",
           ("| run | method | scheme | linear params removed | size (bf16 base → variant) | heal (steps, min, learning rate) | "
           "Δppl wikitext before → after heal | Δppl licenses before → after heal | Δppl served wikitext / "
           "licenses | TPOT base → variant (ms) | speed-up |"),
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("failed"):
            out.append(f"| {r['name']} | {r['method']} | — | — | — | — | failed: {r['failed']} | | | | |")
            continue
        q = r["quality"]
        w, lic = q.get("wikitext2-test", {}), q.get("licenses", {})
        h = r["heal"]
        # Rows healed before healing reported its learning rate ran at 1e-4, the default then.
        heal = f"{h['steps']}, {h['seconds'] / 60:.1f}, {h.get('lr') or 1e-4:.0e}" if h.get("steps") else "none"
        tpot = r["tpot_ms_p50"]
        out.append(
            f"| {r['name']} | {r['method']} | {r['scheme']} | {r['linear_removed']:.1%} | "
            f"{r['size_before'] / 1e6:.1f} → {r['size_after'] / 1e6:.1f} MB | {heal} | "
            f"{pct(w.get('delta_before_heal'))} → {pct(w.get('delta_after_heal'))} | "
            f"{pct(lic.get('delta_before_heal'))} → {pct(lic.get('delta_after_heal'))} | "
            f"{pct(w.get('delta_served'))} / {pct(lic.get('delta_served'))} | "
            + (f"{tpot['base']:.2f} → {tpot['variant']:.2f} | {r['speedup']:.2f}× |" if r.get("speedup")
               else f"— | {r.get('not_served_reason') or '—'} |"))
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated run names ({', '.join(RUNS)})")
    parser.add_argument("--heal-minutes", type=float, default=5.0)
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"unknown run {unknown[0]!r}: choose from {', '.join(RUNS)}")
    path = RESULTS / "structure_table.json"
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    data["cpu"] = cpu_name()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"» {name}", flush=True)
            row = run_one(name, Path(tmp), args.heal_minutes, args.eval_windows)
            row["heal_minutes"] = args.heal_minutes
            # One row per run name and healing budget: a longer budget is a row of its own.
            data["rows"] = [r for r in data["rows"]
                            if (r["name"], r.get("heal_minutes")) != (name, args.heal_minutes)] + [row]
            data["rows"].sort(key=lambda r: (list(RUNS).index(r["name"]), r.get("heal_minutes") or 0))
            path.write_text(json.dumps(data, indent=2) + "\n")
            (RESULTS / "structure_table.md").write_text(render(data["rows"], data))
            print(json.dumps({k: row.get(k) for k in ("linear_removed", "speedup", "failed")}), flush=True)


if __name__ == "__main__":
    main()
