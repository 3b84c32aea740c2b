"""What serving a checkpoint costs per token, read from its own files (no weights are loaded).

Never from constants of one model: config.json gives layers, heads, KV heads, head_dim and vocab; compressed-tensors'
`quantization_config` gives each quantized module's scheme (bits per weight, whether activations are quantized);
the safetensors headers give every tensor's shape. From them, per format (`dense` = unquantized tensors at the
served dtype, or a scheme id such as `w4a16`): the bytes of weights one decode step reads (a separate input
embedding is only gathered row by row, so it is left out; a tied one is read whole as the output head) and the
weights multiplied per token. MoE routing, sliding windows and MLA are not modelled: every weight counts as read
each step.

`CheckpointFeatures` turns these into the bytes and FLOPs of one decode step and of a wave's prefill at a `Traffic` (advisor.measurement)
(the traffic `hubc bench` sends); `advisor.latency` turns those into milliseconds. This module does not import it:
`LatencyModelError` lives here because both modules need it.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advisor.errors import AdvisorError
from advisor.measurement import Traffic

__all__ = [
    "DTYPE_BYTES",
    "PEAK_KEY",
    "CheckpointFeatures",
    "LatencyModelError",
    "Traffic",
    "checkpoint_features",
    "read_safetensors_header",
]

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
PEAK_KEY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                  "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}  # fmt: skip
_FLOATS = {"F64", "F32", "F16", "BF16"}
_QUANT_WEIGHT = ("weight_packed", "weight")
_METADATA = {"weight_shape"}


class LatencyModelError(AdvisorError):
    """A checkpoint's files cannot be read for the latency model, or the prediction cannot be made."""


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

    def decode_kv_bytes(self, load: Traffic) -> float:
        return load.concurrency * load.decode_context * self.kv_bytes_per_token

    def attention_flops_per_token(self, context: float) -> float:
        """QK^T and AV for one token attending to `context` tokens."""
        return 4.0 * self.layers * self.heads * self.head_dim * context

    def decode_flops(self, load: Traffic) -> dict[str, float]:
        """FLOPs of one decode step per format (attention runs in the served dtype: `dense`)."""
        out = {f: 2.0 * p * load.concurrency for f, p in self.matmul_params.items()}
        attention = load.concurrency * self.attention_flops_per_token(load.decode_context)
        out["dense"] = out.get("dense", 0.0) + attention
        return out

    def prefill_flops(self, load: Traffic) -> dict[str, float]:
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


def stored_bytes(path: Path | str, float_bytes: int) -> int:
    """Bytes of the safetensors weights in `path` with every float tensor stored at `float_bytes` per element
    (integer ones as stored), headers included: a checkpoint's size in another dtype, read from its headers."""
    tensors = _tensors(Path(path))
    headers: dict[Path, int] = {}
    for t in tensors.values():  # a file's first tensor starts right after its header
        headers[t.file] = min(headers.get(t.file, t.offset), t.offset)
    return int(sum(t.served_bytes(float_bytes) for t in tensors.values())) + sum(headers.values())


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
            start, header = read_safetensors_header(file)
        except (OSError, ValueError) as exc:
            raise LatencyModelError(f"{file} is not a readable safetensors file ({exc})") from None
        for name, info in header.items():
            out[name] = _Tensor(info["dtype"], tuple(info["shape"]), file, start + info["data_offsets"][0])
    return out


def read_safetensors_header(file: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """A safetensors file's header, checked against the file as safetensors checks it on load: where the tensor data
    starts, and each tensor's entry (`dtype`, `shape`, `data_offsets`); `__metadata__` left out. Raises ValueError
    saying what is wrong (garbage, bad JSON, a truncated file, offsets that do not match the shapes)."""
    file_size = file.stat().st_size
    with open(file, "rb") as f:
        if file_size < 8:
            raise ValueError(f"it is {file_size} bytes long, shorter than a safetensors header")
        (size,) = struct.unpack("<Q", f.read(8))
        if size > min(100_000_000, file_size - 8):
            raise ValueError(f"it does not start with a safetensors header (its first 8 bytes give a header of "
                             f"{size:,} bytes, the file has {file_size:,})")  # fmt: skip
        try:
            header = json.loads(f.read(size))
            assert isinstance(header, dict)
        except ValueError:
            raise ValueError("its header is not valid JSON") from None
        except AssertionError:
            raise ValueError("its header is not a JSON object") from None
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            width = _ELEMENT_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"its header entry for '{name}' is not a dtype, shape and data_offsets") from None
        if width is not None and end - begin != _numel(shape) * width:
            raise ValueError(f"tensor '{name}' ({info['dtype']} {shape}) needs {_numel(shape) * width:,} bytes but "
                             f"its data_offsets span {end - begin:,}")  # fmt: skip
        entries.append((begin, end, name))
    data_end = 0
    for begin, end, name in sorted(entries):  # safetensors requires the tensors to tile the data exactly
        if begin != data_end or end < begin:
            raise ValueError(f"its data_offsets overlap or leave a gap at tensor '{name}'")
        data_end = end
    held = file_size - 8 - size
    if held < data_end:
        raise ValueError(f"it is truncated (its header describes {data_end:,} bytes of tensor data, the file "
                         f"holds {held:,})")  # fmt: skip
    if held > data_end:
        raise ValueError(f"it has {held - data_end:,} bytes after its last tensor")
    return 8 + size, header


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
