"""The measurement vocabulary every part of hubc shares: a measured number with its provenance, the checkpoint it
was measured on, the traffic a latency was measured at, and the hardware it ran on.

A number never travels without what produced it (DESIGN.md, lesson 15): the engine (vLLM or transformers) and its
version, the dtype, the hardware, the text and its token count or the traffic, the settings, and a fingerprint of
the checkpoint's files. Two kinds share that provenance (`Measurement`):
- `QualityMeasurement`: a model's quality on one text (perplexity, KL, top-1 agreement, ECE), as `advisor.evaluate`
  computes it in transformers and `serving.quality` reads it from a vLLM server;
- `MeasurementRecord`: one row of the results store (`serving.store`): a latency (`vllm bench serve`) or served
  quality of one checkpoint, its numbers as a JSON object (`metrics`).

This is a leaf module: it imports nothing from hubc, so the advisor, serving and the Hub plugin can all use it.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "CPUINFO",
    "LATENCY",
    "QUALITY",
    "CheckpointInfo",
    "Measurement",
    "MeasurementRecord",
    "QualityMeasurement",
    "Traffic",
    "cpuinfo",
    "fingerprint",
    "hardware",
]

CPUINFO = Path("/proc/cpuinfo")
"""Where Linux lists the CPU's model name and feature flags."""
LATENCY = "latency"
"""Record kind: a `vllm bench serve` run (`traffic` set)."""
QUALITY = "quality"
"""Record kind: served perplexity on a text (`settings` name the text and windows)."""


def cpuinfo(path: str | Path | None = None) -> dict[str, str]:
    """The fields of /proc/cpuinfo (or `path`), the first value of each key (`model name`, `flags`, Arm's
    `Features`, ...); {} when it cannot be read (not Linux)."""
    try:
        text = Path(CPUINFO if path is None else path).read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def hardware(threads: int | None = None, env: Mapping[str, str] | None = None) -> str:
    """The hardware a measurement ran on: CPU model, the threads used (default: the CPUs this process may run
    on), the vector ISA that decides which kernels run (AMX, AVX-512, VNNI, BF16, else AVX2), and any environment
    that changes the kernels (`env`, e.g. oneDNN capped to an older ISA), as `, KEY=value` items."""
    fields = cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    isa = [
        label
        for label, flag in (
            ("AMX", "amx_tile"),
            ("AVX-512", "avx512f"),
            ("VNNI", "avx512_vnni"),
            ("BF16", "avx512_bf16"),
        )
        if flag in flags
    ] or (["AVX2"] if "avx2" in flags else [])
    text = f"{name}, {threads} threads" + (f", {' '.join(isa)}" if isa else "")
    return text + "".join(f", {k}={v}" for k, v in (env or {}).items())


@dataclass(frozen=True)
class Traffic:
    """The traffic a latency is measured or predicted at: random prompts of `input_len` tokens, `output_len`
    generated tokens each (EOS ignored), at most `concurrency` requests in flight, all requests queued at once."""

    input_len: int = 512
    """Prompt tokens per request."""
    output_len: int = 128
    """Generated tokens per request."""
    concurrency: int = 8
    """Requests in flight at once (`--max-concurrency`)."""

    _KEYS: ClassVar[dict[str, str]] = {
        "in": "input_len", "input": "input_len", "out": "output_len", "output": "output_len",
        "concurrency": "concurrency", "c": "concurrency",
    }  # fmt: skip

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 2 or self.concurrency < 1:
            raise ValueError("traffic needs in >= 1, out >= 2 (TPOT needs two tokens) and concurrency >= 1")

    @classmethod
    def parse(cls, text: str) -> Traffic:
        """`in=512,out=128,concurrency=8` (any subset; the rest keep their defaults); ValueError when malformed."""
        values: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            name = cls._KEYS.get(key.strip().lower())
            if not sep or name is None:
                raise ValueError(f"bad traffic item '{part}': use in=N,out=N,concurrency=N")
            try:
                values[name] = int(value)
            except ValueError:
                raise ValueError(f"bad traffic item '{part}': {value!r} is not an integer") from None
        return cls(**values)

    def __str__(self) -> str:
        """The canonical form the results store keeps: `in=512,out=128,concurrency=8`."""
        return f"in={self.input_len},out={self.output_len},concurrency={self.concurrency}"

    @property
    def wave_tokens(self) -> float:
        """Prompt tokens prefilled before the median request of a wave gets its first token."""
        return self.input_len * (self.concurrency + 1) / 2

    @property
    def decode_context(self) -> float:
        """Mean context length of a decode step."""
        return self.input_len + self.output_len / 2


def fingerprint(path: Path | str) -> str:
    """Content fingerprint of a checkpoint folder: sha256 (16 hex digits) over config.json, the safetensors index,
    and each safetensors file's name, size and mtime. It changes whenever the checkpoint is rewritten, and survives
    a rename of the folder."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        file = path / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    for file in sorted(path.glob("*.safetensors")):
        stat = file.stat()  # follows HF-cache symlinks to the blob
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint is: where it lies, a fingerprint of its files, and where it came from when known."""

    path: str
    """Absolute path of the checkpoint folder."""
    fingerprint: str
    """`fingerprint(path)`: stale measurements are never reused for a rewritten checkpoint."""
    size_bytes: int
    """Bytes of safetensors weights on disk."""
    model_id: str | None = None
    """Hub repo id of this checkpoint when it was pulled from the Hub; for a `hubc optimize` output, the Hub id of
    the model it was made from (report.json `source.hub_id`)."""
    revision: str | None = None
    """Commit sha that `model_id` was read at, when known."""
    base_model_id: str | None = None
    """Hub id of the model this checkpoint was compressed from (hubc's report.json), when known."""
    base_path: str | None = None
    """Local folder of that base model as recorded in report.json (may no longer exist)."""
    recipe: dict[str, Any] | None = None
    """hubc's recipe (report.json `recipe`), for checkpoints made by `hubc optimize`."""
    target: str | None = None
    """hubc's target name (report.json `target`)."""
    name: str | None = None
    """What the user called it (a Hub repo id, `demo`), when the folder name says less (a Hub snapshot folder is
    named after its commit sha)."""

    @property
    def label(self) -> str:
        """Short name for tables and plots: `name`, else the folder name."""
        return self.name or Path(self.path).name


@dataclass(kw_only=True)
class Measurement:
    """What every measured number carries: what produced it, on what, of which checkpoint."""

    engine: str = "vllm"
    """`vllm` (a served checkpoint) or `transformers` (hubc's own evaluation)."""
    engine_version: str = ""
    """That engine's version."""
    dtype: str = ""
    """The dtype the engine ran the model in."""
    hardware: str = ""
    """`hardware()` of the machine that measured it."""
    text: str | None = None
    """The evaluation text, for a quality number."""
    tokens: int | None = None
    """Tokens scored on that text."""
    settings: dict[str, Any] = field(default_factory=dict)
    """How it was measured (server settings, requests, rounds, windows, ...)."""
    fingerprint: str | None = None
    """`fingerprint()` of the checkpoint measured, when it is a folder on disk."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON output."""
        return asdict(self)


@dataclass(kw_only=True)
class QualityMeasurement(Measurement):
    """A model's quality on one text, from transformers (hubc's evaluation) or vLLM (prompt logprobs)."""

    text: str
    tokens: int
    perplexity: float
    kl: float | None = None
    """Mean KL divergence from the reference model's next-token distribution (exact in transformers)."""
    top1_agreement: float | None = None
    """Share of positions where the most likely next token is the reference model's."""
    ece: float | None = None
    """Expected calibration error of the next-token predictions."""
    note: str | None = None
    """How it was computed, when that needs saying."""


def _setting(settings: dict[str, Any], key: str) -> Any:
    server = settings.get("server")
    return settings.get(key) or (server.get(key) if isinstance(server, dict) else None)


@dataclass(kw_only=True)
class MeasurementRecord(Measurement):
    """One stored measurement of one checkpoint (`serving.store.ResultsStore`)."""

    kind: str
    """`latency` (a `vllm bench serve` run; `traffic` set) or `quality` (served perplexity; `settings` name the
    text and windows)."""
    checkpoint: CheckpointInfo
    """The checkpoint measured."""
    metrics: dict[str, Any]
    """The numbers: for latency ttft/tpot/itl p50/p95 (ms, median over rounds), output and request throughput
    (tok/s, req/s: the median, and p50/p95 across rounds; older records lack the p50/p95 keys, and
    `serving.results.stored_throughput` computes them from their rounds), peak memory (MiB), per-round values and
    their spread; for quality perplexity and scored tokens. Keys are only ever added to this JSON object, so older
    stores stay readable."""
    traffic: str | None = None
    """Traffic profile of a latency measurement, canonical `in=512,out=128,concurrency=8` (`Traffic`)."""
    created_at: str = ""
    """UTC time the record was stored (ISO 8601)."""
    id: int | None = None
    """Row id once stored."""

    def __post_init__(self) -> None:
        # The store keeps dtype, text and tokens inside `settings` and `metrics`; the typed fields mirror them.
        self.fingerprint = self.fingerprint or self.checkpoint.fingerprint
        self.dtype = self.dtype or _setting(self.settings, "dtype") or ""
        self.text = self.text or self.settings.get("text")
        if self.tokens is None and isinstance(self.metrics.get("tokens"), int):
            self.tokens = self.metrics["tokens"]
