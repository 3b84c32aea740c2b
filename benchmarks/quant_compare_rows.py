"""The rows of benchmarks/quant_compare.py (what is measured, with which settings) and its shared helpers."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

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
