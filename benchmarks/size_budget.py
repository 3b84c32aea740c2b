"""What `hubc optimize --max-size` chooses for the demo model at a range of budgets, per target: scheme, dense
budget, share pruned and the estimated size (advisor.size_budget); with --measure, one budget is also run through
`hubc optimize --no-serve --heal-minutes 0` to compare the estimate with the weights written.

    .venv/bin/python benchmarks/size_budget.py [--targets cpu,a10g] [--measure cpu:100MB]

Writes benchmarks/results/size_budget.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

BUDGETS = ("300MB", "250MB", "165MB", "150MB", "130MB", "120MB", "110MB", "100MB", "90MB", "80MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="cpu,a10g")
    parser.add_argument("--measure", help="TARGET:SIZE run end to end (no serving, no healing) to check the estimate")
    args = parser.parse_args()
    from advisor.errors import AdvisorError
    from advisor.model import inspect_structure
    from advisor.size_budget import fit, parse_size
    from advisor.targets import get_target
    from hubplugin.source import resolve

    started = time.time()
    structure = inspect_structure(resolve("demo").path)
    rows = []
    for name in args.targets.split(","):
        target = get_target(name)
        for budget in BUDGETS:
            try:
                c = fit(structure, target, parse_size(budget))
                rows.append({"target": name, "isa": target.isa, "budget": budget, "scheme": c.scheme,
                             "dense_budget": c.dense_budget, "budget_scheme": c.budget_scheme, "prune": c.prune,
                             "estimate": c.estimate, "choice": c.reason})
            except AdvisorError as exc:
                rows.append({"target": name, "isa": target.isa, "budget": budget, "refused": str(exc)})
    measured = None
    if args.measure:
        name, _, budget = args.measure.partition(":")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "variant"
            cmd = [sys.executable, "-m", "hubplugin.cli", "optimize", "demo", "--target", name, "--max-size", budget,
                   "--heal-minutes", "0", "--no-serve", "--out", str(out), "--eval-windows", "4", "--format", "json"]
            t0 = time.time()
            report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
            measured = {"target": name, "budget": budget, "estimate": report["size_budget"]["estimate"],
                        "written": report["size_after"], "choice": report["size_budget"]["choice"],
                        "linear_parameters": report["linear_parameters"], "seconds": round(time.time() - t0)}
    record = {"model": "SmolLM2-135M-Instruct (demo)", "cpu": platform.processor() or platform.machine(),
              "rows": rows, "measured": measured, "arguments": shlex.join(sys.argv[1:]),
              "seconds": round(time.time() - started)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "size_budget.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "size_budget.md").write_text(markdown(record))
    print((RESULTS / "size_budget.md").read_text())


def markdown(record: dict) -> str:
    lines = ["# What `--max-size` chooses for the demo model", "",
             ("SmolLM2-135M-Instruct (269.1 MB in bf16). Sizes are advisor.size_budget's estimates of the weights "
              "hubc writes. Written by `.venv/bin/python benchmarks/size_budget.py"
              + (f" {record['arguments']}" if record["arguments"] else "") + "`."), "",
             "| target | budget | scheme | dense budget | pruned | estimated size |", "|---|---|---|---|---:|---:|"]
    for r in record["rows"]:
        target = r["target"] + (f" ({r['isa']})" if r.get("isa") else "")
        if "refused" in r:
            lines.append(f"| {target} | {r['budget']} | refused: {r['refused']} | | | |")
            continue
        dense = f"{r['dense_budget']:.0%}" + (f" at {r['budget_scheme']}" if r["dense_budget"] else "")
        lines.append(f"| {target} | {r['budget']} | {r['scheme']} | {dense} | {r['prune']:.1%} | "
                     f"{r['estimate'] / 1e6:.1f} MB |")
    m = record.get("measured")
    if m:
        lines += ["", (f"Measured: `hubc optimize demo --target {m['target']} --max-size {m['budget']} --heal-minutes 0 "
                       f"--no-serve` chose {m['choice']}; estimated {m['estimate'] / 1e6:.2f} MB, written "
                       f"{m['written'] / 1e6:.2f} MB ({m['written'] / m['estimate'] - 1:+.2%}); decoder linear "
                       f"weights {m['linear_parameters']['base'] / 1e6:.1f} M → "
                       f"{m['linear_parameters']['variant'] / 1e6:.1f} M ({m['seconds']} s).")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
