"""Which rounding method (and precision budget) `hubc optimize` should use by default: runs the demo's main job once
per (CPU kind, setting) and records the time of every step and the Δppl on wikitext-2 test and licenses.txt,
evaluated by hubc and, with --serve, as vLLM serves it.

    .venv/bin/python benchmarks/default_method.py [--target cpu|a10g|...] [--kinds native,avx2] [--only REGEX]
        [--serve] [--windows 16]

`--target cpu` (default) compares W8A8-int8 settings (smoothing, 2% dense budget; the rounding varies); a GPU target
compares W4A16 settings (method, smoothing, share of the weights kept at 8 bits), evaluated here in transformers
(GPU targets are not served on this machine); their times are this CPU's.

CPU kinds: `native` is this machine as it is; `avx2` takes it for an AVX2-only CPU (no AVX-512, VNNI or native
bf16): `HUBC_CPU_ISA=avx2` (hubc resolves `cpu` to the AVX2 variant, with its int8 pair limit, and calibrates in
fp32), torch's kernels and MKL capped to AVX2 (`ATEN_CPU_CAPABILITY`, `MKL_ENABLE_INSTRUCTIONS`), and oneDNN capped
to AVX2 in the vLLM servers (`ONEDNN_MAX_CPU_ISA`) on CPUs without AMX. With AMX, vLLM picks its AMX int8 kernel
whatever oneDNN's cap (and a capped oneDNN cannot run the bf16 it needs), so it is served uncapped in bf16: served
numbers then come from exact int8 arithmetic, which is what the pair limit makes oneDNN's AVX2 GEMM compute
(tests/advisor/test_targets.py::test_int8_pair_sum_matches_onednn), but served latency is not an AVX2 CPU's. Rows
measured before this change also had oneDNN capped in hubc's own process.

Results accumulate in benchmarks/results/default_method_<target>.json (a row per CPU × kind × setting, replaced when
rerun on the same CPU) and the Markdown table benchmarks/results/default_method_<target>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HUBC = [sys.executable, "-m", "hubplugin.cli"]

KINDS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"HUBC_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}

# Setting name → recipe fields over the W8A8 defaults (smoothing search, 2% dense).
CPU_SETTINGS: dict[str, dict] = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq", "calibration": {"windows": 16}},
    "gptq-rows512": {"method": "gptq", "calibration": {"windows": 16, "sample_rows": 512}},
    "gptq-rows2048": {"method": "gptq", "calibration": {"windows": 16, "sample_rows": 2048}},
    "gptq-rows8192": {"method": "gptq", "calibration": {"windows": 16, "sample_rows": 8192}},
    "gptq-w32": {"method": "gptq", "calibration": {"windows": 32}},
    "gptq-dense3": {"method": "gptq", "dense_budget": 0.03, "calibration": {"windows": 16}},
    "gptq-selfgen8": {"method": "gptq", "calibration": {"windows": 16, "self_generated": 8}},
    "autoround-50-w32": {"method": "autoround", "iterations": 50, "calibration": {"windows": 32}},
    "autoround-20-w16": {"method": "autoround", "iterations": 20, "calibration": {"windows": 16}},
    "autoround-10-w16": {"method": "autoround", "iterations": 10, "calibration": {"windows": 16}},
    "autoround-5-w16": {"method": "autoround", "iterations": 5, "calibration": {"windows": 16}},
    "rtn-dense4": {"method": "rtn", "dense_budget": 0.04},
}

# Setting name → recipe fields over W4A16 without smoothing or budget.
GPU_SETTINGS: dict[str, dict] = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq"},
    "gptq+8bit10": {"method": "gptq", "dense_budget": 0.1, "budget_scheme": "w8a16"},
    "gptq+8bit20": {"method": "gptq", "dense_budget": 0.2, "budget_scheme": "w8a16"},
    "gptq+8bit30": {"method": "gptq", "dense_budget": 0.3, "budget_scheme": "w8a16"},
    "smoothed+gptq+8bit10": {"method": "gptq", "smoothing": "search", "dense_budget": 0.1, "budget_scheme": "w8a16"},
    "smoothed+gptq+8bit20": {"method": "gptq", "smoothing": "search", "dense_budget": 0.2, "budget_scheme": "w8a16"},
    "autoround+8bit10": {"method": "autoround", "dense_budget": 0.1, "budget_scheme": "w8a16"},
}


def settings(target: str) -> dict[str, dict]:
    return CPU_SETTINGS if target.startswith("cpu") else GPU_SETTINGS


def recipe_for(setting: dict, target: str) -> dict:
    calibration = {"text": "wikitext2-valid", "windows": 16, "seq_len": 512}
    calibration.update(setting.get("calibration", {}))
    if target.startswith("cpu"):
        recipe = {"scheme": "w8a8-int8", "target": target, "smoothing": "search", "dense_budget": 0.02,
                  "calibration": calibration}
    else:
        recipe = {"scheme": "w4a16", "target": target, "smoothing": "none", "dense_budget": 0.0,
                  "calibration": calibration}
    recipe.update({k: v for k, v in setting.items() if k != "calibration"})
    return recipe


def run_one(target: str, kind: str, name: str, windows: int, serve: bool, work: Path) -> dict:
    recipe = recipe_for(settings(target)[name], target)
    recipe_path = work / f"{kind}-{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / f"{kind}-{name}"
    cmd = [*HUBC, "optimize", "demo", "--target", target, "--max-ppl-increase", "1", "--recipe", str(recipe_path), "--out", str(out),
           "--overwrite", "--format", "json", "--eval-windows", str(windows)]
    if not serve:
        cmd.append("--no-serve")
    env = {**os.environ, **KINDS[kind], "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=ROOT)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"{kind}/{name}: hubc failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        sys.exit(f"{kind}/{name}: hubc printed no JSON report: {proc.stdout[:300]!r}")
    quality = {}
    for tr in report["quality"]:
        base, var = tr["base"]["perplexity"], tr["variant"]["perplexity"]
        row = {"base": base, "evaluated": var / base - 1, "kl": tr["variant"].get("kl")}
        if tr.get("served_variant"):
            row["served"] = tr["served_variant"]["perplexity"] / tr["served_base"]["perplexity"] - 1
        quality[tr["text"]] = row
    block = (report.get("transforms") or {}).get("block_error")
    return {"kind": kind, "setting": name, "recipe": recipe, "windows": windows,
            "served": bool(report.get("served")), "wall_s": round(wall, 1), "timings": report.get("timings", {}),
            "quality": quality, "block_error": block, "cpu": _cpu_name(), "target": report["target_description"],
            "served_latency_ms": _tpot(report)}


def _tpot(report: dict) -> dict | None:
    lat = report.get("latency")
    if not lat:
        return None
    return {role: lat[role]["tpot_ms_p50"] for role in ("base", "variant")}


def _cpu_name() -> str:
    from advisor.measurement import cpuinfo

    return cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def write_markdown(rows: list[dict], target: str) -> None:
    what = ("W8A8-int8, smoothing search, 2% dense budget" if target.startswith("cpu")
            else "W4A16 (group 64), no smoothing or budget unless the setting says so")
    lines = [
        f"# Default rounding for `hubc optimize --target {target}`, per kind of CPU",
        "",
        (f"`.venv/bin/python benchmarks/default_method.py --target {target}` (its docstring says how the `avx2` kind "
        "is emulated)."),
        f"Demo model, {what}; calibration on wikitext-2 valid; Δppl of the exported",
        "checkpoint against the base on the first N×512 tokens of each text (evaluated: hubc in transformers, fp32;",
        "served: vLLM prompt logprobs against the served base). Times in seconds on the machine named in the row.",
        "",
        ("| CPU kind | setting | calibration windows | quantization s | whole run s | wikitext-2 Δppl eval / served |"
        " licenses Δppl eval / served | KL wikitext-2 / licenses | N | CPU |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(settings(target))
    for r in sorted(rows, key=lambda r: (r["kind"], order.index(r["setting"]) if r["setting"] in order else 99,
                                         r["cpu"])):
        t = r["timings"]
        q = r["quality"]

        def cell(text: str, q: dict = q) -> str:
            x = q.get(text, {})
            served = f"{x['served']:+.2%}" if "served" in x else "—"
            return f"{x.get('evaluated', float('nan')):+.2%} / {served}"

        kl = " / ".join(f"{q[t_]['kl']:.4f}" if q.get(t_, {}).get("kl") is not None else "—"
                        for t_ in ("wikitext2-test", "licenses"))
        quant = t.get("quantization", 0) + t.get("export", 0)
        lines.append(f"| {r['kind']} | {r['setting']} | {r['recipe']['calibration']['windows']} | {quant:.0f} | "
                     f"{r['wall_s']:.0f} | {cell('wikitext2-test')} | {cell('licenses')} | {kl} | {r['windows']} | "
                     f"{r['cpu']} |")
    lines += ["", "Quantization s: rounding (and learning) plus export; whole run: everything `hubc optimize` does,",
              "serving base and variant included where served."]
    (RESULTS / f"default_method_{target}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--kinds", default="native,avx2")
    ap.add_argument("--only", default=".*", help="regex over setting names")
    ap.add_argument("--serve", action="store_true", help="also serve base and variant with vLLM")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows per text")
    args = ap.parse_args()
    path = RESULTS / f"default_method_{args.target}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    with tempfile.TemporaryDirectory(prefix="default-method-") as tmp:
        for kind in args.kinds.split(","):
            for name in settings(args.target):
                if not re.search(args.only, name):
                    continue
                row = run_one(args.target, kind, name, args.windows, args.serve, Path(tmp))
                rows = [r for r in rows if not (r["kind"] == kind and r["setting"] == name
                                                and r["served"] == row["served"] and r["cpu"] == row["cpu"])] + [row]
                path.write_text(json.dumps(rows, indent=2))
                write_markdown(rows, args.target)
                print(f"{kind}/{name}: {row['wall_s']:.0f} s, {json.dumps(row['quality'])}", file=sys.stderr,
                      flush=True)


if __name__ == "__main__":
    main()
