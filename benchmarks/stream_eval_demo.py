"""Streamed evaluation against in-memory evaluation on the demo model: `hubc optimize demo` run twice with the same
recipe, `--stream` and `--no-stream`, and the perplexities, KL and top-1 agreement of base and variant compared
(issue 21: within 0.1%). The tests compare the two paths on tiny models; this is the real model and text.

    .venv/bin/python benchmarks/stream_eval_demo.py [--scheme w4a16] [--method rtn] [--eval-windows 8]

Writes benchmarks/results/stream_eval_demo.{json,md}.
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
METRICS = ("perplexity", "kl", "top1_agreement", "ece")


def run(path_flag: str, args, out: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "hubplugin.cli", "optimize", "demo", "--target", "cpu", "--scheme", args.scheme,
           "--method", args.method, "--eval-windows", str(args.eval_windows), "--no-serve", path_flag,
           "--out", str(out), "--overwrite", "--format", "json"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{path_flag}: hubc failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout), time.monotonic() - started


def values(report: dict) -> dict:
    """(text, model, metric) → value, for every number both paths report."""
    out = {}
    for tr in report["quality"]:
        for model in ("base", "variant"):
            for metric in METRICS:
                value = (tr.get(model) or {}).get(metric)
                if isinstance(value, (int, float)):
                    out[f"{tr['text']} {model} {metric}"] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="w4a16")
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--eval-windows", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hubc-stream-eval-") as tmp:
        streamed, t_stream = run("--stream", args, Path(tmp) / "streamed")
        memory, t_memory = run("--no-stream", args, Path(tmp) / "memory")
    a, b = values(streamed), values(memory)
    rows = [{"quantity": k, "streamed": a[k], "in_memory": b[k],
             "relative_difference": abs(a[k] - b[k]) / max(abs(b[k]), 1e-12)} for k in sorted(a.keys() & b.keys())]
    record = {"model": "SmolLM2-135M-Instruct (demo)", "scheme": args.scheme, "method": args.method,
              "eval_windows": args.eval_windows, "paths": {"streamed": streamed.get("path"),
                                                          "in_memory": memory.get("path")},
              "seconds": {"streamed": round(t_stream, 1), "in_memory": round(t_memory, 1)},
              "cpu": platform.processor() or platform.machine(), "rows": rows,
              "max_relative_difference": max((r["relative_difference"] for r in rows), default=None),
              "arguments": " ".join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stream_eval_demo.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# Streamed against in-memory evaluation on the demo model", "",
             (f"`hubc optimize demo --target cpu --scheme {args.scheme} --method {args.method} --eval-windows "
              f"{args.eval_windows} --no-serve`, once with `--stream` and once with `--no-stream`. Largest relative "
              f"difference: {record['max_relative_difference']:.2e}."),
             f"Written by `.venv/bin/python benchmarks/stream_eval_demo.py {record['arguments']}`.", "",
             "| quantity | streamed | in memory | relative difference |", "|---|---:|---:|---:|"]
    lines += [f"| {r['quantity']} | {r['streamed']:.6g} | {r['in_memory']:.6g} | {r['relative_difference']:.2e} |"
              for r in rows]
    (RESULTS / "stream_eval_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
