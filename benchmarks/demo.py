"""The demo's main job as a user runs it (`make demo`: `hubc optimize demo --target cpu`, every option at its
default), once per kind of CPU, and `hubc optimize demo --target a10g` (a GPU target: evaluated here, not served):
wall time, sizes, the layers the dense budget kept, quality evaluated and served, and served time per token.

    .venv/bin/python benchmarks/demo.py [--only cpu,cpu-as-avx2,a10g]

`cpu-as-avx2` is `make demo CPU_ISA=avx2`: this CPU taken for an AVX2-only one (HUBC_CPU_ISA=avx2, torch and MKL
capped to AVX2; see the Makefile). Runs that serve start vLLM: run this under `flock /tmp/vllm.lock`.
Rows accumulate in benchmarks/results/demo.json (a row per run name and CPU, replaced when rerun on that CPU) and the
Markdown table benchmarks/results/demo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HUBC = [sys.executable, "-m", "hubplugin.cli"]

# Run name → (target, environment over this one's), as the Makefile sets it.
RUNS: dict[str, tuple[str, dict[str, str]]] = {
    "cpu": ("cpu", {}),
    "cpu-as-avx2": (
        "cpu",
        {"HUBC_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    ),
    "a10g": ("a10g", {}),
}
TEXTS = ("wikitext2-test", "licenses")


def run_one(name: str, work: Path) -> dict:
    target, env = RUNS[name]
    cmd = [
        *HUBC,
        "optimize",
        "demo",
        "--target",
        target,
        "--out",
        str(work / name),
        "--overwrite",
        "--format",
        "json",
    ]
    started = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env={**os.environ, **env}, cwd=ROOT
    )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"{name}: hubc failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    report = json.loads(proc.stdout)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, cwd=ROOT
    )
    t = report.get("transforms") or {}
    kept, total = t.get("kept_dense") or {}, t.get("quantization_cost") or 0.0
    quality = {}
    for tr in report["quality"]:
        row = {
            "base": tr["base"]["perplexity"],
            "variant": tr["variant"]["perplexity"],
            "kl": tr["variant"]["kl"],
        }
        if tr.get("served_variant"):
            row.update(
                served_base=tr["served_base"]["perplexity"],
                served_variant=tr["served_variant"]["perplexity"],
                served_dtype=tr["served_variant"]["dtype"],
                engine_version=tr["served_variant"]["engine_version"],
            )
        quality[tr["text"]] = row
    lat = report.get("latency")
    return {
        "name": name,
        "command": " ".join(f"{k}={v}" for k, v in env.items())
        + (" " if env else "")
        + f"hubc optimize demo --target {target}",
        "target": report["target_description"],
        "cpu": _cpu_name(),
        "hubc_commit": commit.stdout.strip(),
        "wall_s": round(wall, 1),
        # Other work on the machine slows every step and the served latency: the 1-minute load average at the end.
        "load_average": round(os.getloadavg()[0], 2),
        "timings": report.get("timings", {}),
        "method": report["recipe"]["method"],
        "scheme": report["recipe"]["scheme"],
        "checkpoint_dtype": report["checkpoint_dtype"],
        "size_before": report["size_before"],
        "size_after": report["size_after"],
        "size_original": report.get("size_original"),
        "kept": list(kept),
        "kept_share_of_estimated_loss": sum(kept.values()) / total if total > 0 else None,
        "budget_scheme": report["recipe"].get("budget_scheme"),
        "quality": quality,
        "tpot_ms_p50": {role: lat[role]["tpot_ms_p50"] for role in ("base", "variant")} if lat else None,
        "vllm": lat["vllm_version"] if lat else None,
        "gate": report.get("gate"),
    }


def _cpu_name() -> str:
    from advisor.measurement import cpuinfo

    return cpuinfo().get("model name") or "unknown CPU"


def _mb(n: int | None) -> str:
    return "—" if not n else f"{n / 1e6:.1f} MB"


def _delta(x: float, base: float) -> str:
    return f"{x:.3f} ({x / base - 1:+.2%})"


def write_markdown(rows: list[dict]) -> None:
    lines = [
        "# The demo's main job, as `make demo` runs it",
        "",
        "`.venv/bin/python benchmarks/demo.py` (one row per run and CPU; `cpu-as-avx2` is `make demo CPU_ISA=avx2`). Every",
        "option at its default; 16×512 tokens of each text; evaluated: hubc in transformers (fp32) on the exported",
        "checkpoint; served: vLLM prompt logprobs, base and variant on the same server settings.",
        "",
    ]
    for r in rows:
        lines += [
            f"## {r['name']}: `{r['command']}`",
            "",
            f"Target: {r['target']}. {r['cpu']}, hubc {r['hubc_commit']}"
            + (f", vLLM {r['vllm']}" if r["vllm"] else "")
            + (f"; load average {r['load_average']:.1f} at the end of the run" if "load_average" in r else "")
            + ".",
            "",
        ]
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in r["timings"].items())
        size = f"{_mb(r['size_after'])} ({r['size_after'] / r['size_before'] - 1:+.0%}"
        if r["size_original"]:
            size += f"; {r['size_after'] / r['size_original'] - 1:+.0%} against the {_mb(r['size_original'])} as given"
        lines += [
            "| measure | engine | base | variant |",
            "|---|---|---|---|",
            f"| wall time | | | {r['wall_s']:.0f} s ({steps}) |",
            f"| scheme, method | | | {r['scheme']}, {r['method']} |",
            f"| weights on disk ({r['checkpoint_dtype']}) | — | {_mb(r['size_before'])} | {size}) |",
        ]
        share = r["kept_share_of_estimated_loss"]
        kept = ", ".join(f"`{k}`" for k in r["kept"]) or "none"
        if len(r["kept"]) > 6:
            kept = f"{len(r['kept'])} linears (named in demo.json)"
        how = "dense" if r["budget_scheme"] in (None, "dense") else f"at {r['budget_scheme']}"
        lines.append(
            f"| kept {how} by the budget | | | {kept}"
            + (f" ({share:.0%} of the estimated quantization loss)" if share is not None else "")
            + " |"
        )
        for text in TEXTS:
            q = r["quality"].get(text)
            if not q:
                continue
            lines.append(
                f"| perplexity, {text} | transformers (float32) | {q['base']:.3f} | "
                f"{_delta(q['variant'], q['base'])} |"
            )
            if "served_variant" in q:
                lines.append(
                    f"| perplexity, {text} | vLLM {q['engine_version']} ({q['served_dtype']}) | "
                    f"{q['served_base']:.3f} | {_delta(q['served_variant'], q['served_base'])} |"
                )
        kl = " / ".join(f"{r['quality'][t]['kl']:.4f}" for t in TEXTS if t in r["quality"])
        lines.append(
            f"| KL vs base ({' / '.join(t for t in TEXTS if t in r['quality'])}) | transformers | | {kl} |"
        )
        if r["tpot_ms_p50"]:
            b, v = r["tpot_ms_p50"]["base"], r["tpot_ms_p50"]["variant"]
            lines.append(
                f"| time per output token, p50 | vLLM | {b:.1f} ms | {v:.1f} ms ({v / b - 1:+.0%}) |"
            )
        gate = r.get("gate") or {}
        if gate.get("worst"):
            w = gate["worst"]
            lines.append(
                f"| quality gate ({gate['threshold']:+.0%}) | | | {'passed' if gate['passed'] else 'failed'}: "
                f"largest {w['increase']:+.2%} on {w['text']} ({w['engine']}) |"
            )
        lines.append("")
    (RESULTS / "demo.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(RUNS), help=f"comma-separated run names ({', '.join(RUNS)})")
    args = ap.parse_args()
    path = RESULTS / "demo.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    with tempfile.TemporaryDirectory(prefix="hubc-demo-") as tmp:
        for name in args.only.split(","):
            if name not in RUNS:
                sys.exit(f"unknown run {name!r}: one of {', '.join(RUNS)}")
            row = run_one(name, Path(tmp))
            rows = [r for r in rows if (r["name"], r["cpu"]) != (name, row["cpu"])] + [row]
            rows.sort(key=lambda r: (list(RUNS).index(r["name"]), r["cpu"]))
            path.write_text(json.dumps(rows, indent=2) + "\n")
            write_markdown(rows)
            print(f"{name}: {row['wall_s']:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
