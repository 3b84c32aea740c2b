"""The markdown table and verdicts of benchmarks/quant_compare.py, rebuilt from every finished row."""

from __future__ import annotations

import dataclasses
import statistics
from importlib.metadata import version

import torch
from quant_compare_rows import *

# --- the table ---------------------------------------------------------------------------------------------------

def delta(record: dict, base: dict, text: str) -> float:
    return record["quality"][text]["perplexity"] / base[text]["perplexity"] - 1.0


def variants(records: dict[str, dict]) -> dict[str, list[dict]]:
    """The measured records by variant: the seeds of one variant together, in table order."""
    out: dict[str, list[dict]] = {}
    for row in ROWS:
        if row.key in records:
            out.setdefault(row.variant, []).append(records[row.key])
    return out


def mean_delta(group: list[dict], base: dict, text: str) -> float:
    return statistics.fmean(delta(r, base, text) for r in group)


def verdicts(records: dict[str, dict], base: dict) -> list[dict]:
    """The acceptance lines, computed from the measured rows (None where a row they need is missing). A variant
    measured with several seeds counts by its mean."""
    groups = variants(records)

    def d(variant, text):
        return mean_delta(groups[variant], base, text)

    def name(variant):
        n = len(groups[variant])
        return variant if n == 1 else f"{variant} (mean of {n} seeds)"

    out = []
    ar = "llmc/w4a16/autoround"
    hubc4 = [v for v in groups if v.startswith("hubc/w4a16/")]
    if ar in groups and hubc4:
        best = min(hubc4, key=lambda v: max(d(v, t) - d(ar, t) for t in TEXTS))
        detail = "; ".join(f"{t}: {d(best, t):+.2%} vs {d(ar, t):+.2%}" for t in TEXTS)
        out.append({"line": "1a", "claim": "hubc's best 4-bit method has Δppl no worse than llm-compressor's AutoRound "
                    "on both texts", "passed": all(d(best, t) <= d(ar, t) for t in TEXTS),
                    "detail": f"best: {name(best)} against {name(ar)} ({detail})", "uses": [*hubc4, ar]})
    else:
        out.append({"line": "1a", "claim": "hubc's best 4-bit method vs llm-compressor's AutoRound", "passed": None,
                    "detail": "needs llmc/w4a16/autoround and at least one hubc/w4a16 row"})
    need = ("hubc/w4a16/gptq", "llmc/w4a16/gptq", "llmc/w4a16/rtn")
    if all(k in groups for k in need):
        limits = {t: 2 / 3 * min(d("llmc/w4a16/gptq", t), d("llmc/w4a16/rtn", t)) for t in TEXTS}
        out.append({"line": "1b", "claim": "hubc GPTQ Δppl ≤ 2/3 of the better of llm-compressor's GPTQ and RTN, "
                    "on both texts", "passed": all(d("hubc/w4a16/gptq", t) <= limits[t] for t in TEXTS),
                    "detail": "; ".join(f"{t}: {d('hubc/w4a16/gptq', t):+.2%} vs limit {limits[t]:+.2%}"
                                        for t in TEXTS), "uses": list(need)})
    else:
        out.append({"line": "1b", "claim": "hubc GPTQ vs 2/3 of llm-compressor's GPTQ/RTN", "passed": None,
                    "detail": "needs " + ", ".join(need)})
    for line, hubc, llmc, factor, share in (("3a", "hubc/w4a16/gptq", "llmc/w4a16/gptq", 0.5, "at most half of"),
                                            ("3b", "hubc/w4a16/autoround", ar, 1.0, "no more than")):
        claim = f"{hubc} takes {share} {llmc}'s time"
        if hubc in groups and llmc in groups:
            h, l_ = (statistics.fmean(r["seconds"] for r in groups[v]) for v in (hubc, llmc))
            out.append({"line": line, "claim": claim, "passed": h <= factor * l_,
                        "detail": f"{h:.0f} s vs limit {factor * l_:.0f} s ({llmc}: {l_:.0f} s)"
                        + (" (means over seeds)" if len(groups[hubc]) > 1 or len(groups[llmc]) > 1 else ""),
                        "uses": [hubc, llmc]})
        else:
            out.append({"line": line, "claim": claim, "passed": None, "detail": f"needs {hubc} and {llmc}"})
    for v in out:
        v["runs"] = sorted({r["run"] for variant in v.pop("uses", []) for r in groups.get(variant, [])})
    return out


def seed_lines(records: dict, base: dict) -> list[str]:
    """Mean and range over seeds of every variant measured with more than one."""
    groups = {v: g for v, g in variants(records).items() if len(g) > 1}
    if not groups:
        return []
    w, lic = TEXTS
    lines = ["", "### Over seeds", "",
             f"| variant | seeds | {w} Δppl, mean (min – max) | {lic} Δppl, mean (min – max) | time (s), mean |",
             "|---|---|---|---|---|"]
    for variant, group in groups.items():
        cells = []
        for t in TEXTS:
            ds = [delta(r, base, t) for r in group]
            cells.append(f"{statistics.fmean(ds):+.2%} ({min(ds):+.2%} – {max(ds):+.2%})")
        lines.append(f"| {variant} | {len(group)} | {cells[0]} | {cells[1]} | "
                     f"{statistics.fmean(r['seconds'] for r in group):.1f} |")
    return lines


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render(rows: list[Row], records: dict, status: dict, base: dict, settings: Settings, command: str,
           runs: dict) -> str:
    from advisor.evaluate import hardware_name

    w, lic = TEXTS
    lines = [
        "# hubc vs llm-compressor quantizers on SmolLM2-135M-Instruct (demo)",
        "",
        (f"Evaluation: fp32 transformers, first {settings.eval_windows}×{settings.seq_len} tokens of wikitext-2 test "
        f"and licenses.txt, every row by hubc's evaluation code (FakeQuantLinear + advisor.evaluate). Calibration: "
        f"first {settings.calib_windows}×{settings.seq_len} tokens of wikitext-2 valid, identical token ids for both "
        f"tools. Learned rounding (both tools): {settings.autoround_iters} steps per decoder layer. Time: compression "
        "step only (calibration, transforms, quantization, writing the checkpoint)."),
        "",
    ]
    if settings != ACCEPTANCE:
        lines += [f"**Not the acceptance settings** ({dataclasses.asdict(ACCEPTANCE)}): verdicts are indicative only.",
                  ""]
    lines += [
        f"| variant | tool | {w} ppl | Δppl | KL vs base | top-1 | {lic} Δppl | KL | top-1 | time (s) | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| base | — | {base[w]['perplexity']:.3f} | — | — | — | ({base[lic]['perplexity']:.3f}) | — | — | — | — |",
    ]
    for row in rows:
        r = records.get(row.key)
        if r is None:
            cells = [row.label, row.tool, status.get(row.key, "not measured")] + [""] * 8
            lines.append("| " + " | ".join(cells) + " |")
            continue
        q = r["quality"]
        lines.append(
            f"| {row.label} | {row.tool} | {q[w]['perplexity']:.3f} | {delta(r, base, w):+.2%} | "
            f"{_fmt(q[w].get('kl'), '.4f')} | {_fmt(q[w].get('top1'), '.3f')} | {delta(r, base, lic):+.2%} | "
            f"{_fmt(q[lic].get('kl'), '.4f')} | {_fmt(q[lic].get('top1'), '.3f')} | {r['seconds']:.1f} | "
            f"{runs[r['run'], r['command']]} |")
    lines += seed_lines(records, base)
    lines += ["", "## Acceptance", ""]
    for v in verdicts(records, base):
        mark = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[v["passed"]]
        letters = sorted({letter for (start, _), letter in runs.items() if start in v["runs"]})
        one_run = f" Rows from run {letters[0]}." if len(letters) == 1 else (
            f" **Rows from {len(letters)} runs ({', '.join(letters)})**: the acceptance compares rows of one run."
            if letters else "")
        lines.append(f"- **{v['line']} {mark}**: {v['claim']} — {v['detail']}.{one_run}")
    if len(runs) > 1:
        lines.append(f"- The table's rows come from {len(runs)} runs (the run column), on a machine whose load "
                     "changed between them; `--rerun` without `--only` measures every row together.")
    repro = "; ".join(f"{t} {base[t]['perplexity']:.3f} (DESIGN.md {DESIGN_BASE_PPL[t]})" for t in TEXTS)
    llmc_versions = next((", ".join(f"{k} {v}" for k, v in r["details"]["versions"].items())
                          for r in records.values() if "versions" in r["details"]), LLMC_REQUIREMENT)
    hubc_codes = sorted({r["hubc_code"] for r in records.values() if r.get("hubc_code")})
    lines += [
        "", "## Notes", "",
        (f"- Base perplexity: {repro}. DESIGN.md's numbers are for 40 windows of 512 text tokens without BOS "
        "(re-measured so: 25.615 / 19.729); advisor.evaluate's windows are BOS + 511 text tokens, as every row here."),
        ("- llm-compressor rows are evaluated from llm-compressor's own quantize-dequantize of each weight "
        "(compressed-tensors `fake_quantize` with its scales), saved beside its checkpoint; W8A8/FP8 activations are "
        "quantized per token by hubc's `fake_quantize_activations` for both tools. hubc rows are exported and read "
        "back with `load_for_eval`."),
        ("- 8- and 3-bit weight-only rows use benchmark-only schemes (w4a16 with 8 or 3 bits per code); 3-bit is "
        "exported as pack-quantized with num_bits 3, which vLLM does not serve, and read back the same way."),
        "- hubc int8 rows use unconstrained codes like llm-compressor's (no int8 pair limit: they are built for this AVX-512 VNNI CPU).",
        ("- Rows with the costliest 1% or 2% of weights dense keep the linears with the highest estimated quantization "
        "cost per parameter unquantized (advisor.sensitivity, measured on 8 of the calibration windows after "
        "smoothing; at 1% on this model layer 0's down_proj); that time is in the row's time. Asymmetric activations "
        "quantize each token's [min, max] with a zero point, as vLLM's int8 kernels do for "
        "`symmetric: false`. Δppl differences below about half a "
        "point move with the calibration amount while KL does not (the smoothed W8A8 row with 16 calibration windows, "
        "`hubc optimize`'s default, is evaluated at +0.30% / +0.72% with KL 0.0090 / 0.0159): compare KL first."),
        ("- The demo model was distributed as GGUF Q4_1 (asymmetric 4-bit, blocks of 32): its weights already sit on a "
        "4-bit grid, so 4-bit numbers on it flatter every method; compare rows with each other, not with other models."),
        "",
        "## Provenance",
        "",
        f"- Table written by: `{command}`",
        f"- Hardware: {hardware_name()}; shared with other work, so times carry noise.",
        (f"- hubc side: torch {torch.__version__}, transformers {version('transformers')}, compressed-tensors "
        f"{version('compressed-tensors')}; hubc code {', '.join(hubc_codes) or '—'}."),
        f"- llm-compressor side: {llmc_versions} (benchmarks/.venv-llmc).",
        "- Runs (rows measured in the same run share a letter): "
        + "; ".join(f"{letter} = `{cmd}` started {start}" for (start, cmd), letter in runs.items()),
    ]
    return "\n".join(lines) + "\n"
