"""Acceptance 1 of `hubc bench`: the demo model (SmolLM2-135M-Instruct) and three variants measured by vLLM's own
`vllm bench serve` in one interleaved run, the table printed, the numbers stored.

    python benchmarks/bench_demo.py [--variants /tmp/bench] [--schemes w8a8-int8,fp8,w4a16]
        [--traffic in=128,out=32,concurrency=1] [--num-prompts 8] [--name bench_demo] [--no-pick]

Makes the variants first when they are missing (`hubc optimize demo --target cpu --no-serve --scheme S`), then runs
`hubc bench VARIANTS... --base demo ...` as a user would, and writes what it printed plus the stored records to
benchmarks/results/NAME.{txt,json,md}; then (unless --no-pick) `hubc pick` on the same checkpoints (latency from the
store, served perplexity measured if missing) writes benchmarks/results/pick_demo.{txt,png}.

The results files of `hubc bench`'s default traffic:

    python benchmarks/bench_demo.py --schemes w8a8-int8,w4a16 --traffic in=512,out=128,concurrency=8 \
        --num-prompts 32 --name bench_demo_concurrency8 --no-pick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hubc_runs import hubc, last_bench_run

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCHEMES = ("w8a8-int8", "fp8", "w4a16")  # w4a16 needs AVX-512 on CPU (cpu_gemm_wna16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", type=Path, default=Path("/tmp/bench"), help="folder of the variant folders"
    )
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="the variants, comma-separated")
    parser.add_argument("--name", default="bench_demo", help="results file name (benchmarks/results/NAME.*)")
    parser.add_argument("--no-pick", action="store_true", help="skip the `hubc pick` step")
    parser.add_argument("--traffic", default="in=128,out=32,concurrency=1")
    parser.add_argument(
        "--num-prompts", default="8", help="requests per benchmark run (FP8 is emulated: slow)"
    )
    parser.add_argument("--max-rounds", default="3")
    parser.add_argument("--max-tpot-ms", default="35", help="SLO for the pick step")
    parser.add_argument("--max-ppl-increase", default="5", help="SLO for the pick step, percent")
    args = parser.parse_args()

    schemes = args.schemes.split(",")
    for scheme in schemes:
        if not (args.variants / scheme / "config.json").is_file():
            hubc("optimize", "demo", "--target", "cpu", "--no-serve", "--scheme", scheme, "--eval-windows", "1",
                 "--out", str(args.variants / scheme))  # fmt: skip
    variants = [str(args.variants / s) for s in schemes]
    bench_args = ["bench", *variants, "--base", "demo", "--traffic", args.traffic, "--num-prompts", args.num_prompts,
                  "--max-rounds", args.max_rounds]  # fmt: skip
    printed = hubc(*bench_args, capture=True).stdout
    print(printed)

    run = last_bench_run(args.traffic)
    RESULTS.mkdir(exist_ok=True)
    command = "hubc " + " ".join(bench_args)
    (RESULTS / f"{args.name}.txt").write_text(f"$ {command}\n{printed}")
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"command": command, "records": [r.to_dict() for r in run]}, indent=2, default=str)
    )
    (RESULTS / f"{args.name}.md").write_text(markdown(command, run))
    print(f"wrote {RESULTS}/{args.name}.{{txt,json,md}}", file=sys.stderr)
    if args.no_pick:
        return

    # The choice for an SLO, from those latencies (already stored) and served perplexity (measured if missing).
    pick_args = ["pick", *variants, "--max-tpot-ms", args.max_tpot_ms, "--max-ppl-increase", args.max_ppl_increase,
                 "--traffic", args.traffic, "--plot", str(RESULTS / "pick_demo.png")]  # fmt: skip
    printed = hubc(*pick_args, capture=True).stdout
    print(printed)
    (RESULTS / "pick_demo.txt").write_text(f"$ hubc {' '.join(pick_args)}\n{printed}")


def markdown(command: str, run: list) -> str:
    first = run[0]
    server, bench = first.settings["server"], first.settings["benchmark"]
    lines = [
        f"`{command}`",
        "",
        (
            f"vLLM {first.engine_version} on {first.hardware}; {server['dtype']}, eager, prefix caching off; "
            f"{bench['num_prompts']} prompts per run, {bench['rounds']} interleaved rounds ({bench['layout']}), "
            f"medians over rounds; {first.created_at}."
        ),
        "",
        (
            "| checkpoint | TTFT p50 / p95 (ms) | TPOT p50 / p95 (ms) | ITL p50 / p95 (ms) | output tok/s | peak memory "
            "| TPOT p50 per round (ms) | TPOT p50 vs base | TPOT p50 spread over rounds |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = next((r.metrics["tpot_ms_p50"] for r in run if r.settings.get("role") == "base"), None)
    for r in run:
        m = r.metrics
        label = r.checkpoint.label + (" (base)" if r.settings.get("role") == "base" else "")
        per_round = ", ".join(f"{x['tpot_ms_p50']:.1f}" for x in m["rounds"])
        is_base = r.settings.get("role") == "base"
        vs_base = "—" if base is None or is_base else f"{m['tpot_ms_p50'] / base - 1:+.0%}"
        spread = "—" if m.get("tpot_ms_p50_spread") is None else f"{m['tpot_ms_p50_spread']:.1%}"
        lines.append(
            f"| {label} | {m['ttft_ms_p50']:.1f} / {m['ttft_ms_p95']:.1f} | {m['tpot_ms_p50']:.1f} / "
            f"{m['tpot_ms_p95']:.1f} | {m['itl_ms_p50']:.1f} / {m['itl_ms_p95']:.1f} | "
            f"{m['output_throughput_tok_s']:.1f} | {m['peak_memory_mib'] / 1024:.2f} GiB | {per_round} | "
            f"{vs_base} | {spread} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
