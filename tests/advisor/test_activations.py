"""Activation quantization as the served kernels do it: hubc's emulation of vLLM's dynamic per-token int8 is
bit-exact, symmetric and asymmetric."""

from __future__ import annotations

import pytest
import torch

from advisor.quantize.rtn import fake_quantize_activations
from advisor.schemes import QuantArgs

SYMMETRIC = QuantArgs(8, "int", True, "token", dynamic=True)


def _tokens() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(64, 576) * torch.rand(64, 1) * 3
    x[:, 7] += 40.0  # an outlier channel on one side, as trained LLMs have
    return x


@pytest.mark.parametrize("symmetric", [True, False])
def test_emulation_equals_vllm_cpu_kernel(symmetric):
    from vllm import _custom_ops as ops

    x = _tokens()
    codes, scale, azp = ops.scaled_int8_quant(x.contiguous(), symmetric=symmetric)
    zero = 0.0 if azp is None else azp.float().view(-1, 1)
    served = (codes.float() - zero) * scale.view(-1, 1)
    args = QuantArgs(8, "int", symmetric, "token", dynamic=True)
    assert torch.equal(fake_quantize_activations(x, args), served)


def test_asymmetric_activations_spend_their_steps_on_the_tokens_range():
    """Checkpoints with asymmetric activations (compressed-tensors `symmetric: false`, which vLLM serves with a
    per-token zero point) are evaluated as such, not as symmetric."""
    asymmetric = QuantArgs(8, "int", False, "token", dynamic=True)
    x = _tokens()
    deq = fake_quantize_activations(x, asymmetric)
    assert (deq - x).pow(2).mean() < 0.5 * (fake_quantize_activations(x, SYMMETRIC) - x).pow(2).mean()
    step = (x.amax(-1) - x.amin(-1)) / 255
    assert ((deq.amax(-1) - x.amax(-1)).abs() <= step / 2 + 1e-6).all()
    assert ((deq.amin(-1) - x.amin(-1)).abs() <= step / 2 + 1e-6).all()
