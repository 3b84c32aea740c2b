"""Which kind of structure makes the demo model faster per token in vLLM on this CPU, every kind timed against the
base in one interleaved `hubc bench` run (the structure table times each row against the base in its own run, at
whatever load the machine had then; this puts them side by side).

Each variant removes about 20% of the decoder-linear weights, without healing (speed does not depend on it), made by
`hubc optimize demo --target cpu --scheme dense --no-serve` with the row's --prune flags:

    flock /tmp/vllm.lock .venv/bin/python benchmarks/structure_speed.py [--only NAME,...] [--num-prompts 16]

Shapes that differ between layers (MLP widths, query or KV head counts) are served through hubc's vLLM plugin.
Writes benchmarks/results/structure_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from hubc_runs import hubc, last_bench_run

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

# Name → (what it removes, --prune). The demo's decoder linears are 75% MLP; its attention has 9 query heads in
# 3 KV groups per layer, so a third of the heads is 8% of the decoder linears.
VARIANTS: dict[str, tuple[str, str]] = {
    "params-20": ("hubc default: MLP channels + heads ranked together, per-layer shapes", "0.2"),
    "mlp-20": ("MLP channels ranked across layers (per-layer widths)", "mlp=0.267"),
    "mlp-uniform-20": ("the same MLP width in every layer (standard config)", "mlp=0.267,allocation=uniform"),
    "heads-33": ("a third of the query heads ranked across layers (per-layer head counts)", "heads=0.334"),
    "heads-uniform-33": ("a third of the query heads in every layer (KV heads chosen per layer)",
                         "heads=0.334,allocation=uniform"),
    "layers-6": ("6 of 30 decoder layers (block influence)", "layers=6"),
}
TRAFFIC = "in=128,out=32,concurrency=1"


def shape_of(folder: Path) -> dict:
    """What the checkpoint's config says about its shape: architecture, layers, and the per-layer widths and head
    counts (hubc's own config key where they differ between layers)."""
    config = json.loads((folder / "config.json").read_text())
    layers = config.get("hubc_layers") or []
    widths = sorted({la.get("intermediate_size", config.get("intermediate_size")) for la in layers}) \
        or [config.get("intermediate_size")]
    heads = sorted({la.get("num_attention_heads", config.get("num_attention_heads")) for la in layers}) \
        or [config.get("num_attention_heads")]
    kv = sorted({la.get("num_key_value_heads", config.get("num_key_value_heads")) for la in layers}) \
        or [config.get("num_key_value_heads")]
    return {"architecture": config["architectures"][0], "layers": config["num_hidden_layers"],
            "mlp_widths": widths, "heads": heads, "kv_heads": kv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated variant names ({', '.join(VARIANTS)})")
    parser.add_argument("--work", type=Path, default=Path("/tmp/structure_speed"), help="folder of the variants")
    parser.add_argument("--num-prompts", default="16")
    parser.add_argument("--max-rounds", default="5")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    for name in names:
        if not (args.work / name / "config.json").is_file():
            hubc("optimize", "demo", "--target", "cpu", "--scheme", "dense", "--prune", VARIANTS[name][1],
                 "--heal-minutes", "0", "--no-serve", "--eval-windows", "1", "--out", str(args.work / name),
                 "--overwrite")
    folders = [str(args.work / n) for n in names]
    bench_args = ["bench", *folders, "--base", "demo", "--dtype", "float32", "--traffic", TRAFFIC,
                  "--num-prompts", args.num_prompts, "--max-rounds", args.max_rounds]
    printed = hubc(*bench_args, capture=True).stdout
    print(printed)

    from hubplugin.source import resolve

    run = last_bench_run(TRAFFIC)
    by_folder = {str(args.work / n): n for n in names}
    rows = []
    for r in run:
        base = r.settings.get("role") == "base"
        name = "base" if base else by_folder.get(r.checkpoint.path, r.checkpoint.label)
        folder = Path(resolve("demo").path) if base else args.work / name
        params = None
        if not base and (folder / "report.json").is_file():
            params = json.loads((folder / "report.json").read_text()).get("linear_parameters")
        rows.append({"name": name, "what": "SmolLM2-135M-Instruct" if base else VARIANTS[name][0],
                     "prune": None if base else VARIANTS[name][1], "shape": shape_of(folder),
                     "linear_parameters": params, "metrics": r.metrics, "hardware": r.hardware,
                     "created_at": str(r.created_at)})
    record = {"command": "hubc " + " ".join(bench_args), "traffic": TRAFFIC, "rows": rows,
              "arguments": " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structure_speed.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (RESULTS / "structure_speed.md").write_text(markdown(record))
    print(f"wrote {RESULTS}/structure_speed.{{json,md}}", file=sys.stderr)


def span(values: list[int]) -> str:
    """Sorted per-layer values as `a` (one value) or `a–b`."""
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}–{values[-1]}"


def markdown(record: dict) -> str:
    rows = record["rows"]
    base = next(r for r in rows if r["name"] == "base")
    b = base["metrics"]
    lines = ["# Which structure is faster per token in vLLM on this CPU", "",
             (f"The demo model and variants removing about 20% of its decoder-linear weights (no healing), served by "
              f"vLLM on {base['hardware']} in float32, eager, timed in one interleaved `hubc bench` run "
              f"({record['traffic']}; medians over rounds)."),
             "", (f"Written by `flock /tmp/vllm.lock .venv/bin/python benchmarks/structure_speed.py"
                 f"{' ' + record['arguments'] if record['arguments'] else ''}`; the bench command: "
                 f"`{record['command']}`."),
             "", ("| variant | what is removed | --prune | linear params removed | layers | MLP widths "
                 "| heads / KV heads | TPOT p50 (ms) | ITL p50 (ms) | TPOT p50 per round (ms) | speed-up (TPOT) "
                 "| speed-up, median of rounds |"),
             "|---|---|---|---:|---:|---|---|---:|---:|---|---:|---:|"]
    base_rounds = [x["tpot_ms_p50"] for x in b.get("rounds", [])]
    for r in rows:
        m, s, p = r["metrics"], r["shape"], r["linear_parameters"]
        removed = f"{1 - p['variant'] / p['base']:.1%}" if p else "—"
        widths = span(s["mlp_widths"])
        heads = f"{span(s['heads'])}/{span(s['kv_heads'])}"
        per_round = ", ".join(f"{x['tpot_ms_p50']:.1f}" for x in m.get("rounds", []))
        speed = "—" if r["name"] == "base" else f"{b['tpot_ms_p50'] / m['tpot_ms_p50']:.2f}×"
        # The rounds are interleaved (base, then each variant): a round's ratio compares them at the same load.
        ratios = [bt / x["tpot_ms_p50"] for bt, x in zip(base_rounds, m.get("rounds", []))]
        per_round_speed = "—" if r["name"] == "base" or not ratios else f"{statistics.median(ratios):.2f}×"
        lines.append(f"| {r['name']} | {r['what']} | {r['prune'] or '—'} | {removed} | "
                     f"{s['layers']} | {widths} | {heads} | {m['tpot_ms_p50']:.1f} | "
                     f"{m['itl_ms_p50']:.1f} | {per_round} | {speed} | {per_round_speed} |")
    spread = b.get("tpot_ms_p50_spread")
    if spread is not None:
        note = f"The base's TPOT p50 varied by {spread:.0%} across rounds: differences of a few percent are noise."
        lines += ["", note]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
