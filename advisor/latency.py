"""The latency cost model: a roofline per target, calibrated by the measurements in the results store.

What a checkpoint costs is read from its files, never from constants of one model: config.json gives layers,
heads, KV heads, head_dim and vocab; compressed-tensors' `quantization_config` gives each quantized module's
scheme (bits per weight, whether activations are quantized); the safetensors headers give every tensor's shape.
From them, per format (`dense` = unquantized tensors at the served dtype, or a scheme id such as `w4a16`):
the bytes of weights one decode step reads (a separate input embedding is only gathered row by row, so it is left
out; a tied one is read whole as the output head) and the weights multiplied per token. MoE routing, sliding
windows and MLA are not modelled: every weight counts as read each step.

The traffic is what `hubc bench` sends (`vllm bench serve`, random prompts of `in` tokens, `out` tokens each, all
requests queued at once, at most `concurrency` in flight). Equal lengths make requests run in waves of
`concurrency`: a wave is prefilled together, then decodes as one batch (so a decode step carries no other
request's prefill, and none is modelled). So
- a decode step (TPOT) reads the weights once plus every sequence's KV cache at the mean context `in + out/2`,
  and multiplies `2 x params x concurrency` (+ attention) FLOPs: memory-bound at small batches;
- the median request's first token (TTFT) waits for about half of its wave's prefill, `in x (concurrency+1)/2`
  tokens of `2 x params` FLOPs each (+ causal attention): compute-bound at the peak rate of the format's compute
  dtype (int8 for W8A8-int8, FP8 for FP8 where the target has FP8 units, the served dtype otherwise). vLLM's
  chunked-prefill token budget (`max_num_batched_tokens`, 2048 on CPU servers) is not modelled: a wave larger
  than it is prefilled over several steps, which the half-wave count only approximates.

The roofline (`roofline`) turns these into a lower bound from the catalog's bandwidth and peak rates: max(bytes /
bandwidth, FLOPs / peak) for a decode step and for the wave's prefill. `cpu` has neither number in the catalog.

The fit (`LatencyModel.fit`): a non-negative linear model (scikit-learn `LinearRegression(positive=True)`,
weighted by 1/measured so that it minimises relative error and a slow emulated format does not dominate the shared
terms) on the same features, over every stored `hubc bench` record of the same hardware and served dtype:
    TPOT = sum over formats b_f * weight bytes_f  +  k * KV bytes  +  c * decode FLOPs  +  o
    TTFT = sum over formats p_f * prefill FLOPs_f  +  o'  +  w * weight bytes
Per-format terms are required: a format's kernels have their own cost per byte and per FLOP (measured on the AVX2
and AVX-512 dev boxes: W8A8-int8 is 2x slower than bf16 to no faster at batch 1, emulated FP8 13-27x slower,
so bytes alone predict nothing there). The shared terms are kept only where the data can tell them apart: each is added in
that order only if it raises the rank of the (weighted) design matrix. With one checkpoint per format, a fixed
overhead `o` cannot be separated from the per-format byte terms (it is carried by them, which overestimates how
much a smaller model of that format gains); with two traffic profiles, the KV term and the decode-FLOPs term cannot
be separated either (the KV term is kept and carries both). More model sizes and traffics make more terms
identifiable, with no code change. A checkpoint whose formats have no measurement on that hardware is predicted
from the roofline alone (GPU targets) or not at all (`cpu`: `NoMeasurementsError`, run `hubc bench` first).

Every `Prediction` is labelled a prediction and says what it rests on: the number of measurements, their hardware,
and the fit's leave-one-out relative error on them (each record predicted by a fit without it; a record that is the
only measurement of its format cannot be, and is counted apart).

This module receives measurements as data (duck-typed `serving.store.Measurement`s: `.checkpoint.path`,
`.traffic`, `.metrics`, `.settings`, `.hardware`), already filtered to the target's hardware by the caller; it does
not import the serving code.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from advisor.errors import AdvisorError
from advisor.targets import KNOWN_SCHEMES, Target, get_target

__all__ = [
    "CheckpointFeatures",
    "HeldOut",
    "LatencyModel",
    "LatencyModelError",
    "Load",
    "NoMeasurementsError",
    "Prediction",
    "checkpoint_features",
    "measured_on",
    "roofline",
]

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
PEAK_KEY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                  "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}  # fmt: skip
_FLOATS = {"F64", "F32", "F16", "BF16"}
_QUANT_WEIGHT = ("weight_packed", "weight")
_METADATA = {"weight_shape"}
DECODE_SHARED = ("kv", "compute", "overhead")
PREFILL_SHARED = ("overhead", "weights")


class LatencyModelError(AdvisorError):
    """A checkpoint's files cannot be read for the latency model, or the prediction cannot be made."""


class NoMeasurementsError(LatencyModelError):
    """A target with no roofline in the catalog (`cpu`) has no stored measurements to predict from."""


@dataclass(frozen=True)
class Load:
    """The traffic a prediction is for: `hubc bench`'s profile (serving.bench.Traffic) as plain numbers."""

    input_len: int = 512
    output_len: int = 128
    concurrency: int = 8

    @classmethod
    def parse(cls, text: str) -> Load:
        """The canonical traffic string the store keeps: `in=512,out=128,concurrency=8`."""
        keys = {"in": "input_len", "out": "output_len", "concurrency": "concurrency"}
        try:
            values = {
                keys[k.strip()]: int(v) for k, v in (p.split("=") for p in text.split(",") if p.strip())
            }
            return cls(**values)
        except (KeyError, ValueError, TypeError):
            raise LatencyModelError(f"bad traffic '{text}'", hint="use in=N,out=N,concurrency=N") from None

    def __str__(self) -> str:
        return f"in={self.input_len},out={self.output_len},concurrency={self.concurrency}"

    @property
    def wave_tokens(self) -> float:
        """Prompt tokens prefilled before the median request of a wave gets its first token."""
        return self.input_len * (self.concurrency + 1) / 2

    @property
    def decode_context(self) -> float:
        """Mean context length of a decode step."""
        return self.input_len + self.output_len / 2


@dataclass(frozen=True)
class CheckpointFeatures:
    """What serving one checkpoint costs per token, read from its files."""

    path: str
    dtype: str
    """The dtype unquantized tensors and activations are served in."""
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    weight_bytes: dict[str, float]
    """Bytes one decode step reads, per format (`dense` or a scheme id); scales and zero points included."""
    matmul_params: dict[str, int]
    """Weights multiplied per token, per format (the output head included, a separate input embedding not)."""
    compute: dict[str, str]
    """Peak-rate key (catalog `peak_tflops`) of each format's compute dtype."""
    kv_bytes_per_token: float

    @property
    def formats(self) -> tuple[str, ...]:
        """The quantized formats, sorted."""
        return tuple(sorted(f for f in self.weight_bytes if f != "dense"))

    @property
    def label(self) -> str:
        return "+".join(self.formats) or self.dtype

    def decode_kv_bytes(self, load: Load) -> float:
        return load.concurrency * load.decode_context * self.kv_bytes_per_token

    def attention_flops_per_token(self, context: float) -> float:
        """QK^T and AV for one token attending to `context` tokens."""
        return 4.0 * self.layers * self.heads * self.head_dim * context

    def decode_flops(self, load: Load) -> dict[str, float]:
        """FLOPs of one decode step per format (attention runs in the served dtype: `dense`)."""
        out = {f: 2.0 * p * load.concurrency for f, p in self.matmul_params.items()}
        attention = load.concurrency * self.attention_flops_per_token(load.decode_context)
        out["dense"] = out.get("dense", 0.0) + attention
        return out

    def prefill_flops(self, load: Load) -> dict[str, float]:
        """FLOPs prefilled before the median request's first token, per format (causal attention in `dense`)."""
        requests = (load.concurrency + 1) / 2
        out = {f: 2.0 * p * load.wave_tokens for f, p in self.matmul_params.items()}
        attention = requests * load.input_len * self.attention_flops_per_token(load.input_len / 2)
        out["dense"] = out.get("dense", 0.0) + attention
        return out


# ------------------------------------------------------------------------------------------ checkpoint files


def checkpoint_features(path: Path | str, dtype: str = "bfloat16") -> CheckpointFeatures:
    """Read a checkpoint folder's config.json and safetensors headers (no weights are loaded)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LatencyModelError(f"{path} is not a checkpoint folder (no config.json)",
                                hint="point at the folder that holds config.json and *.safetensors")  # fmt: skip
    if dtype not in DTYPE_BYTES:
        raise LatencyModelError(
            f"unknown served dtype '{dtype}'", hint=f"use one of: {', '.join(DTYPE_BYTES)}"
        )
    try:
        config = json.loads(config_file.read_text())
        assert isinstance(config, dict)
    except (OSError, ValueError, AssertionError):
        raise LatencyModelError(
            f"{config_file} is not a JSON object", hint="is this a transformers model folder?"
        ) from None
    # Multimodal configs nest the language model's numbers.
    arch = {**config, **(config.get("text_config") or {})}
    layers, hidden, heads, kv_heads, head_dim, vocab = _architecture(arch, config_file)
    groups, kv_bits = _ct_groups(config.get("quantization_config"), config_file)
    serve = DTYPE_BYTES[dtype]

    modules: dict[str, dict[str, _Tensor]] = {}
    for name, tensor in _tensors(path).items():
        module, _, leaf = name.rpartition(".")
        modules.setdefault(module, {})[leaf] = tensor
    weight_bytes: dict[str, float] = {}
    params: dict[str, int] = {}
    compute: dict[str, str] = {"dense": PEAK_KEY[dtype]}
    tables: list[tuple[float, int]] = []  # (bytes, params) of dense [vocab, hidden] matrices
    for module, leaves in modules.items():
        if "weight_packed" in leaves or "weight_scale" in leaves:  # a compressed-tensors quantized module
            fmt, bits, peak = _scheme_of(module, groups, path)
            shape = _logical_shape(leaves, bits)
            n = _numel(shape)
            aux = sum(t.served_bytes(serve) for leaf, t in leaves.items()
                      if leaf not in _QUANT_WEIGHT and leaf not in _METADATA)  # fmt: skip
            weight_bytes[fmt] = weight_bytes.get(fmt, 0.0) + n * bits / 8 + aux
            params[fmt] = params.get(fmt, 0) + n
            compute[fmt] = peak or PEAK_KEY[dtype]
            if len(shape) == 2 and shape[0] >= vocab and shape[1] == hidden:
                tables.append((float("inf"), n))  # a quantized head is never the gathered input table
            continue
        for tensor in leaves.values():
            if tensor.dtype not in _FLOATS:
                continue
            weight_bytes["dense"] = weight_bytes.get("dense", 0.0) + tensor.numel * serve
            if len(tensor.shape) >= 2:
                params["dense"] = params.get("dense", 0) + tensor.numel
            if len(tensor.shape) == 2 and tensor.shape[0] >= vocab and tensor.shape[1] == hidden:
                tables.append((tensor.numel * serve, tensor.numel))
    table_bytes, table_params = min(tables, default=(float("inf"), 0))
    if len(tables) >= 2 and table_bytes < float("inf"):  # separate input and output tables: the input one is
        weight_bytes["dense"] -= table_bytes  # only gathered row by row
        params["dense"] -= table_params
    kv_bytes = kv_bits / 8 if kv_bits else serve
    return CheckpointFeatures(
        path=str(path.resolve()), dtype=dtype, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        vocab=vocab, tied_embeddings=len(tables) == 1, weight_bytes=weight_bytes, matmul_params=params,
        compute=compute, kv_bytes_per_token=2.0 * layers * kv_heads * head_dim * kv_bytes,
    )  # fmt: skip


@dataclass(frozen=True)
class _Tensor:
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    def served_bytes(self, serve: int) -> float:
        """Float tensors are served in the served dtype; integer ones as stored."""
        return self.numel * (serve if self.dtype in _FLOATS else _ELEMENT_BYTES.get(self.dtype, 1))

    def values(self) -> tuple[int, ...]:
        """The integers of a small I64/I32 tensor (compressed-tensors' `weight_shape`)."""
        fmt = {"I64": "q", "I32": "i"}[self.dtype]
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            return struct.unpack(f"<{self.numel}{fmt}", f.read(self.numel * struct.calcsize(fmt)))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


_ARCH_NAMES = {  # optimum's normalized name -> config.json names tried where optimum does not know the model type
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab_size": ("vocab_size",),
}


def _architecture(arch: dict[str, Any], where: Path) -> tuple[int, int, int, int, int, int]:
    """Layers, hidden size, heads, KV heads, head_dim and vocab, read through optimum's NormalizedConfigManager (one
    set of names across llama, qwen, mistral, gemma, phi, falcon, gpt2, ...; it does not import transformers),
    else under the common config.json names."""
    from types import SimpleNamespace

    from optimum.utils.normalized_config import NormalizedConfigManager

    try:
        normalized = NormalizedConfigManager.get_normalized_config_class(str(arch.get("model_type")))(
            SimpleNamespace(**arch)
        )
    except KeyError:  # a model type optimum does not list
        normalized = None
    values: dict[str, int] = {}
    for name, keys in _ARCH_NAMES.items():
        value = getattr(normalized, name, None)
        if not (isinstance(value, int) and value > 0):
            value = next((arch[k] for k in keys if isinstance(arch.get(k), int) and arch[k] > 0), None)
        if value is None:
            raise LatencyModelError(
                f"{where} does not give the model's {name.replace('_', ' ')} ({' / '.join(keys)})",
                hint="the latency model reads decoder-only transformer configs",
            )
        values[name] = int(value)
    heads = values["num_attention_heads"]
    kv_heads = getattr(normalized, "num_key_value_heads", None) or next(
        (arch[k] for k in ("num_key_value_heads", "num_kv_heads") if arch.get(k)),
        1 if arch.get("multi_query") else heads,
    )
    head_dim = int(arch.get("head_dim") or values["hidden_size"] // heads)
    return values["num_layers"], values["hidden_size"], heads, int(kv_heads), head_dim, values["vocab_size"]


def _tensors(path: Path) -> dict[str, _Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LatencyModelError(f"{path} has no *.safetensors weights", hint="point at a checkpoint folder")
    out: dict[str, _Tensor] = {}
    for file in files:
        try:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100_000_000:
                    raise ValueError(f"a header of {size} bytes")
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    out[name] = _Tensor(
                        info["dtype"], tuple(info["shape"]), file, 8 + size + info["data_offsets"][0]
                    )
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise LatencyModelError(f"{file} is not a readable safetensors file ({exc})") from None
    return out


def _ct_groups(quant: Any, where: Path) -> tuple[list[tuple[list[str], str, int, str | None]], int | None]:
    """compressed-tensors config groups as (targets, format id, weight bits, compute peak key), and KV-cache bits."""
    if not quant:
        return [], None
    if quant.get("quant_method") != "compressed-tensors":
        raise LatencyModelError(
            f"{where}: quantization '{quant.get('quant_method')}' is not read by the latency model",
            hint="it reads compressed-tensors checkpoints (what `hubc optimize` writes)",
        )
    groups = []
    for group in (quant.get("config_groups") or {}).values():
        weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
        bits, kind = int(weights.get("num_bits") or 16), weights.get("type", "int")
        abits = int(acts.get("num_bits") or 16)
        peak = ("fp8" if acts.get("type") == "float" else "int8") if abits == 8 else None
        if kind == "float" and bits == 8:
            fmt = "fp8" if peak == "fp8" else "w8a16-fp8"
        elif kind == "int" and abits >= 16:
            fmt = f"w{bits}a16"
        else:
            fmt = f"w{bits}a{abits}-{acts.get('type', 'int')}{abits if acts.get('type') == 'int' else ''}"
        groups.append((list(group.get("targets") or []), fmt, bits, peak))
    kv = quant.get("kv_cache_scheme") or {}
    return groups, int(kv["num_bits"]) if kv.get("num_bits") else None


def _scheme_of(module: str, groups: list, path: Path) -> tuple[str, int, str | None]:
    """The config group that quantizes `module`: by exact name, then `re:` pattern, then class name (`Linear`)."""
    for match in (lambda t: t == module, lambda t: t.startswith("re:") and re.match(t[3:], module) is not None,
                  lambda t: "." not in t and not t.startswith("re:")):  # fmt: skip
        for targets, fmt, bits, peak in groups:
            if any(match(t) for t in targets):
                return fmt, bits, peak
    raise LatencyModelError(f"{path}: '{module}' has quantized weights but no quantization_config group names it",
                            hint="is config.json the one written with these weights?")  # fmt: skip


def _logical_shape(leaves: dict[str, _Tensor], bits: int) -> tuple[int, ...]:
    if "weight_shape" in leaves and leaves["weight_shape"].dtype in ("I64", "I32"):
        return leaves["weight_shape"].values()
    if "weight" in leaves:
        return leaves["weight"].shape
    packed = leaves["weight_packed"]  # int32 words, 32 // bits weights each, along the last dimension
    per_word = _ELEMENT_BYTES.get(packed.dtype, 4) * 8 // bits
    return (*packed.shape[:-1], packed.shape[-1] * per_word)


# ------------------------------------------------------------------------------------------------ roofline


def _peak(target: Target, key: str, dtype: str) -> float:
    rate = target.peak_tflops.get(key) or target.peak_tflops.get(PEAK_KEY[dtype])
    if not rate:
        raise LatencyModelError(f"target '{target.name}' lists no {PEAK_KEY[dtype]} compute rate",
                                hint=f"serve in its own dtype, {target.serve_dtype}")  # fmt: skip
    return rate * 1e12


def roofline(features: CheckpointFeatures, target: Target, load: Load) -> tuple[float, float] | None:
    """(TTFT, TPOT) in ms from the catalog's bandwidth and peak rates: a lower bound; None where the catalog has no
    bandwidth or peak rates (`cpu`)."""
    if not target.memory_bandwidth_gbs or not target.peak_tflops:
        return None
    bandwidth = target.memory_bandwidth_gbs * 1e9
    weights = sum(features.weight_bytes.values())
    seconds = {
        phase: sum(
            flops / _peak(target, features.compute[f], features.dtype) for f, flops in per_format.items()
        )
        for phase, per_format in (
            ("decode", features.decode_flops(load)),
            ("prefill", features.prefill_flops(load)),
        )
    }
    tpot = max((weights + features.decode_kv_bytes(load)) / bandwidth, seconds["decode"])
    ttft = max(weights / bandwidth, seconds["prefill"])
    return ttft * 1e3, tpot * 1e3


def measured_on(target: Target, hardware: str) -> bool:
    """Whether a stored record's hardware string names this GPU target: every `-`-separated part of the target's
    name is a word of it (`a100-80gb` matches 'NVIDIA A100-SXM4-80GB'). `cpu` records are matched by the caller
    against this machine's own hardware string."""
    words = set(re.findall(r"[a-z0-9]+", hardware.lower()))
    return target.kind == "gpu" and all(part in words for part in target.name.split("-"))


# ---------------------------------------------------------------------------------------------------- fit


def _decode_columns(f: CheckpointFeatures, load: Load) -> dict[str, float]:
    cols = {f"weights {fmt}": b for fmt, b in f.weight_bytes.items() if b > 0}
    return cols | {
        "kv": f.decode_kv_bytes(load),
        "compute": sum(f.decode_flops(load).values()),
        "overhead": 1.0,
    }


def _prefill_columns(f: CheckpointFeatures, load: Load) -> dict[str, float]:
    cols = {f"prefill {fmt}": flops for fmt, flops in f.prefill_flops(load).items() if flops > 0}
    return cols | {"overhead": 1.0, "weights": sum(f.weight_bytes.values())}


@dataclass
class _Fit:
    coef: dict[str, float]
    """ms per unit (byte, FLOP, 1) of each kept column."""
    dropped: list[str]
    """Columns the data could not tell apart from the kept ones."""

    def predict(self, cols: dict[str, float], shared: Sequence[str]) -> float | None:
        if any(k not in self.coef for k, v in cols.items() if v and k not in shared):
            return None  # a format with no measurement in this fit
        return sum(self.coef.get(k, 0.0) * v for k, v in cols.items())


def _fit(rows: Sequence[tuple[dict[str, float], float]], shared: Sequence[str]) -> _Fit | None:
    import numpy as np
    from sklearn.linear_model import LinearRegression

    if not rows:
        return None
    names = sorted({k for cols, _ in rows for k, v in cols.items() if v and k not in shared})
    names += [k for k in shared if any(cols.get(k) for cols, _ in rows)]
    x = np.array([[cols.get(k, 0.0) for k in names] for cols, _ in rows], dtype=float)
    y = np.array([target for _, target in rows], dtype=float)
    scale = np.abs(x).max(axis=0)
    weighted = x / y[:, None]  # relative residuals: the rank test sees what the fit sees
    weighted /= np.abs(weighted).max(axis=0)
    kept: list[int] = []
    for j in range(len(names)):
        if np.linalg.matrix_rank(weighted[:, kept + [j]], tol=1e-9 * max(x.shape)) == len(kept) + 1:
            kept.append(j)
    reg = LinearRegression(fit_intercept=False, positive=True)
    reg.fit(x[:, kept] / scale[kept], y, sample_weight=1.0 / y**2)
    coef = {names[j]: float(c / scale[j]) for j, c in zip(kept, reg.coef_, strict=True)}
    return _Fit(coef, [names[j] for j in range(len(names)) if j not in kept])


@dataclass
class HeldOut:
    """One stored measurement and what a fit without it predicts for it (None: the only one of its format)."""

    record_id: int | None
    label: str
    formats: str
    traffic: str
    ttft_ms: float
    tpot_ms: float
    predicted_ttft_ms: float | None
    predicted_tpot_ms: float | None


@dataclass
class _Row:
    record: Any
    features: CheckpointFeatures
    load: Load
    ttft_ms: float
    tpot_ms: float


@dataclass
class Prediction:
    """Predicted TTFT and TPOT p50 of one checkpoint on one target at one traffic profile. Always a prediction,
    never a measurement: it says what it rests on."""

    checkpoint: str
    label: str
    formats: str
    target: str
    traffic: str
    dtype: str
    ttft_ms_p50: float
    tpot_ms_p50: float
    basis: str
    """`measurements` (the roofline features fitted on stored runs) or `roofline` (catalog numbers only)."""
    measurements: int
    """Stored measurements the fit rests on (0 for the roofline)."""
    hardware: list[str]
    loo_ttft_error: float | None
    """Mean absolute relative error of the leave-one-out predictions of TTFT over those measurements."""
    loo_tpot_error: float | None
    loo_count: int
    """Measurements the leave-one-out error is over (the only measurement of a format cannot be held out)."""
    roofline_ttft_ms: float | None
    roofline_tpot_ms: float | None
    measured: HeldOut | None = None
    """The latest stored measurement of this checkpoint at this traffic, with its leave-one-out prediction."""
    kind: str = "prediction"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LatencyModel:
    """The fitted model of one target, served dtype and set of measurements (`fit`), and its predictions."""

    target: Target
    dtype: str
    rows: list[_Row]
    skipped: list[str] = field(default_factory=list)
    """Why records were left out (another dtype, unreadable checkpoint folder, missing metrics)."""
    _ttft: _Fit | None = None
    _tpot: _Fit | None = None
    _held_out: list[HeldOut] | None = None

    @classmethod
    def fit(cls, records: Sequence[Any], target: Target | str, dtype: str) -> LatencyModel:
        """Fit on `records` (latency measurements of the target's hardware) served in `dtype`."""
        target = get_target(target) if isinstance(target, str) else target
        rows, skipped, cache = [], [], {}
        for r in records:
            served = (r.settings.get("server") or {}).get("dtype")
            m = r.metrics
            ttft, tpot = m.get("ttft_ms_p50"), m.get("tpot_ms_p50")
            if served != dtype:
                skipped.append(f"record {r.id}: served in {served}, not {dtype}")
            elif not (
                isinstance(ttft, int | float) and isinstance(tpot, int | float) and ttft > 0 and tpot > 0
            ):
                skipped.append(f"record {r.id}: no TTFT/TPOT p50")
            elif not r.traffic:
                skipped.append(f"record {r.id}: no traffic profile")
            else:
                try:
                    if r.checkpoint.path not in cache:
                        cache[r.checkpoint.path] = checkpoint_features(r.checkpoint.path, dtype)
                    rows.append(
                        _Row(r, cache[r.checkpoint.path], Load.parse(r.traffic), float(ttft), float(tpot))
                    )
                except LatencyModelError as exc:
                    skipped.append(f"record {r.id}: {exc.message}")
        model = cls(target=target, dtype=dtype, rows=rows, skipped=skipped)
        model._ttft, model._tpot = model._fit_rows(rows)
        return model

    @staticmethod
    def _fit_rows(rows: Sequence[_Row]) -> tuple[_Fit | None, _Fit | None]:
        ttft = _fit([(_prefill_columns(r.features, r.load), r.ttft_ms) for r in rows], PREFILL_SHARED)
        tpot = _fit([(_decode_columns(r.features, r.load), r.tpot_ms) for r in rows], DECODE_SHARED)
        return ttft, tpot

    @property
    def hardware(self) -> list[str]:
        return sorted({r.record.hardware for r in self.rows})

    def coefficients(self) -> dict[str, dict[str, float]]:
        """The fitted coefficients, ms per byte / FLOP / step, and the shared terms the data could not support."""
        out: dict[str, Any] = {}
        for name, fit in (("ttft", self._ttft), ("tpot", self._tpot)):
            if fit is not None:
                out[name] = dict(fit.coef)
                out[f"{name}_not_identifiable"] = list(fit.dropped)
        return out

    def held_out(self) -> list[HeldOut]:
        """Leave-one-out: every measurement predicted by a fit on all the others."""
        if self._held_out is None:
            self._held_out = []
            for i, row in enumerate(self.rows):
                ttft, tpot = self._fit_rows(self.rows[:i] + self.rows[i + 1 :])
                self._held_out.append(HeldOut(
                    record_id=row.record.id, label=_label(row), formats=row.features.label, traffic=str(row.load),
                    ttft_ms=row.ttft_ms, tpot_ms=row.tpot_ms,
                    predicted_ttft_ms=_apply(ttft, _prefill_columns(row.features, row.load), PREFILL_SHARED),
                    predicted_tpot_ms=_apply(tpot, _decode_columns(row.features, row.load), DECODE_SHARED),
                ))  # fmt: skip
        return self._held_out

    def loo_error(self) -> tuple[float | None, float | None, int]:
        """Mean absolute relative leave-one-out error of TTFT and TPOT, and how many measurements it is over."""
        done = [
            h for h in self.held_out() if h.predicted_ttft_ms is not None and h.predicted_tpot_ms is not None
        ]
        if not done:
            return None, None, 0
        ttft = sum(abs(h.predicted_ttft_ms / h.ttft_ms - 1) for h in done) / len(done)  # type: ignore[operator]
        tpot = sum(abs(h.predicted_tpot_ms / h.tpot_ms - 1) for h in done) / len(done)  # type: ignore[operator]
        return ttft, tpot, len(done)

    def predict(self, features: CheckpointFeatures, load: Load, label: str | None = None) -> Prediction:
        """Predict one checkpoint: from the fit where the measurements cover its formats, else from the target's
        roofline; NoMeasurementsError where neither is possible (`cpu` without measurements of its formats)."""
        for fmt in features.formats:
            if fmt in KNOWN_SCHEMES:
                self.target.require_scheme(fmt)
        if features.dtype != self.dtype:
            raise LatencyModelError(
                f"features read for {features.dtype}, the model is fitted for {self.dtype}"
            )
        bound = roofline(features, self.target, load)
        ttft = _apply(self._ttft, _prefill_columns(features, load), PREFILL_SHARED)
        tpot = _apply(self._tpot, _decode_columns(features, load), DECODE_SHARED)
        common: dict[str, Any] = {
            "checkpoint": features.path, "label": label or Path(features.path).name, "formats": features.label,
            "target": self.target.name, "traffic": str(load), "dtype": self.dtype,
            "roofline_ttft_ms": bound[0] if bound else None, "roofline_tpot_ms": bound[1] if bound else None,
        }  # fmt: skip
        if ttft is not None and tpot is not None:
            loo_ttft, loo_tpot, loo_count = self.loo_error()
            return Prediction(**common, ttft_ms_p50=ttft, tpot_ms_p50=tpot, basis="measurements",
                              measurements=len(self.rows), hardware=self.hardware, loo_ttft_error=loo_ttft,
                              loo_tpot_error=loo_tpot, loo_count=loo_count, measured=self._measured(features, load))  # fmt: skip
        if bound is None:
            what = f" of {features.label} checkpoints" if self.rows else ""
            raise NoMeasurementsError(
                f"target '{self.target.name}' has no memory bandwidth or peak rate in the catalog, so its latency is "
                f"predicted from measurements only, and the results store has no measurements{what} served in "
                f"{self.dtype} on this hardware",
                hint=f"run `hubc bench {features.path} --dtype {self.dtype}` first",
            )
        return Prediction(**common, ttft_ms_p50=bound[0], tpot_ms_p50=bound[1], basis="roofline", measurements=0,
                          hardware=[], loo_ttft_error=None, loo_tpot_error=None, loo_count=0)  # fmt: skip

    def _measured(self, features: CheckpointFeatures, load: Load) -> HeldOut | None:
        matches = [i for i, r in enumerate(self.rows) if r.features.path == features.path and r.load == load]
        return self.held_out()[matches[-1]] if matches else None


def _apply(fit: _Fit | None, cols: dict[str, float], shared: Sequence[str]) -> float | None:
    return None if fit is None else fit.predict(cols, shared)


def _label(row: _Row) -> str:
    info = row.record.checkpoint
    return getattr(info, "name", None) or Path(info.path).name
