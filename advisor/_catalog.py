"""Reading and validating ``targets.yaml`` into the catalog's typed records (``advisor.targets``).

Every key is checked against an allow-list, every number must name its source, and a CPU ISA variant that an
earlier one would always shadow is refused, so a bad catalog fails with the path of the offending key.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

# advisor.targets imports this module when it first loads the catalog, after its own types exist.
from advisor.targets import (
    CATALOG_VERSION,
    KINDS,
    KNOWN_SCHEMES,
    PEAK_DTYPES,
    SERVE_DTYPES,
    CatalogError,
    IsaVariant,
    SchemeSupport,
    Target,
)

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
_GPU_KEYS = _COMMON_KEYS | {"schemes", "int8_pair_sum"}
_CPU_KEYS = _COMMON_KEYS | {"isa_variants"}
_VARIANT_KEYS = {"isa", "description", "requires", "int8_pair_sum", "schemes", "sources"}
_SCHEME_KEYS = {"kernel", "note", "source"}
_SOURCE_FIELDS = (_COMMON_KEYS | {"int8_pair_sum", "schemes", "requires", "isa"}) - {
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
        "int8_pair_sum",
    ),
    "cpu": ("memory_gib", "memory_bandwidth_gbs", "peak_tflops", "serve_dtype"),
    "variant": ("requires", "schemes", "int8_pair_sum"),
}


@dataclass(frozen=True)
class CpuSpec:
    """The ``cpu`` entry before it is resolved for a machine: its common facts and its ISA variants, in order."""

    name: str
    base: dict[str, Any]
    variants: tuple[IsaVariant, ...]


@dataclass(frozen=True)
class Catalog:
    """The parsed catalog: target names in catalog order, the GPU targets, and the unresolved ``cpu`` entry."""

    order: tuple[str, ...]
    gpus: dict[str, Target]
    cpu: CpuSpec | None


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


def load(path: str | Path | None) -> Catalog:
    """Read and validate the catalog at ``path`` (None: the packaged ``advisor/targets.yaml``).

    Parsed afresh on each call (a few ms): callers get their own dicts, nothing shared to mutate. Raises
    CatalogError on an unreadable or malformed catalog.
    """
    return _parse(_read(path), _label(path))


def _parse(raw: Any, where: str) -> Catalog:
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
    cpu: CpuSpec | None = None
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
    return Catalog(order=tuple(entries), gpus=gpus, cpu=cpu)


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
        int8_pair_sum=_parse_pair_sum(e["int8_pair_sum"], f"{at}.int8_pair_sum"),
        isa=None,
        sources=common["sources"],
    )


def _parse_cpu(name: str, entry: Mapping[str, Any], at: str) -> CpuSpec:
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
        shadow = next((v for v in variants if set(v.requires) <= set(variant.requires)), None)
        if shadow is not None:
            raise CatalogError(
                f"{at}.isa_variants[{i}] ({variant.isa}) can never be chosen: "
                f"the earlier variant '{shadow.isa}' needs a subset of its flags",
                hint="order variants from the most to the least demanding",
            )
        _check_default(common["default_scheme"], variant.schemes, f"{at}.isa_variants[{i}]")
        variants.append(variant)
    return CpuSpec(name=name, base=common, variants=tuple(variants))


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
        int8_pair_sum=_parse_pair_sum(e["int8_pair_sum"], f"{at}.int8_pair_sum"),
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
        if scheme == "dense":
            raise CatalogError(f"{at}: `dense` is served by every target and is not listed")
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
    # Unquantized checkpoints are what vLLM serves everywhere, with the target's own dense GEMM.
    out["dense"] = SchemeSupport(name="dense", kernel="unquantized linear (the serving dtype's GEMM)",
                                 note="no quantization: size and speed come from structure only",
                                 source="vllm/model_executor/layers/linear.py UnquantizedLinearMethod")
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


def _parse_pair_sum(raw: Any, at: str) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= 255:
        raise CatalogError(
            f"{at}: must be null or the largest |q[2j]| + |q[2j+1]| of int8 codes (1 to 255), got {raw!r}"
        )
    return raw


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
