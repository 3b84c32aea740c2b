"""How much of the model to keep dense, and how to quantize activations, for W8A8 on the demo model: runs
`hubc optimize demo --target cpu --no-serve` once per (dense budget, activations) and prints Δppl and KL to the base on
every evaluation text, one row per run, so the default budget can be judged on text of several kinds (pass files of
your own with --text; calibration is always wikitext-2 valid).

    .venv/bin/python benchmarks/dense_budget.py [--budgets 0,0.01,0.02,0.04] [--activations symmetric,asymmetric]
        [--windows 16] [--text wikitext2-test --text licenses --text FILE ...] [--name dense_budget]

Each run takes about 7 minutes on 2 cores with six texts of 16 windows. Results print as a Markdown table on stdout
and are written to benchmarks/results/NAME.md (with the command) and NAME.json (every run's report).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HUBC = [sys.executable, "-m", "hubplugin.cli"]
RESULTS = Path(__file__).resolve().parent / "results"


def run(budget: float, activations: str, texts: list[str], windows: int, work: Path) -> dict:
    out = work / f"{activations}-{budget}"
    cmd = [*HUBC, "optimize", "demo", "--target", "cpu", "--no-serve", "--format", "json", "--out", str(out),
           "--dense-budget", str(budget), "--activations", activations, "--eval-windows", str(windows)]
    for t in texts:
        cmd += ["--eval-text", t]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"hubc failed for budget {budget}, {activations}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="0,0.01,0.02,0.04")
    ap.add_argument("--activations", default="symmetric")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--text", action="append", dest="texts")
    ap.add_argument("--name", default="dense_budget", help="results file name (benchmarks/results/NAME.*)")
    args = ap.parse_args()
    texts = args.texts or ["wikitext2-test", "licenses"]

    rows = []
    with tempfile.TemporaryDirectory(prefix="dense-budget-") as tmp:
        for activations in args.activations.split(","):
            for budget in (float(b) for b in args.budgets.split(",")):
                report = run(budget, activations, texts, args.windows, Path(tmp))
                rows.append((budget, activations, report))
                print(f"done: budget {budget:g}, {activations}", file=sys.stderr, flush=True)

    names = [q["text"] for q in rows[0][2]["quality"]]
    command = "python benchmarks/dense_budget.py " + " ".join(sys.argv[1:])
    lines = [f"`{command.strip()}`", "",
             (f"W8A8-int8, smoothing search + RTN, demo model; first {args.windows}×512 tokens per text, transformers "
             "evaluation of the exported checkpoint. Cells: Δppl, KL to the base."), "",
             "| dense budget | activations | size | kept dense | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for budget, activations, r in rows:
        kept = [m for m, s in (r["recipe"].get("overrides") or {}).items() if s == "dense"]
        cells = []
        for q in r["quality"]:
            d = q["variant"]["perplexity"] / q["base"]["perplexity"] - 1
            cells.append(f"{d:+.2%}, {q['variant']['kl']:.4f}")
        lines.append(f"| {budget:.0%} | {activations} | {r['size_after'] / 1e6:.1f} MB | {len(kept)} | "
                     + " | ".join(cells) + " |")
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    runs = [{"dense_budget": b, "activations": a, "report": r} for b, a, r in rows]
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command.strip(), "runs": runs}, indent=2,
                                                          default=str) + "\n")


if __name__ == "__main__":
    main()
