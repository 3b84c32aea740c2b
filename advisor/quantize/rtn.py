"""Round-to-nearest quantization of weights, and the dynamic activation quantization vLLM's kernels apply.

The scale conventions follow compressed-tensors (symmetric: scale = absmax / (range / 2)), so a checkpoint made here
means what vLLM's loaders expect, and hubc's numbers compare like for like with llm-compressor's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advisor.schemes import QuantArgs

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_EPS = 1e-12


@dataclass
class QuantizedWeight:
    """A quantized weight as stored: integer (or FP8) codes plus scales (and zero points if asymmetric)."""

    codes: torch.Tensor
    """int8 tensor holding the integer codes, or float8_e4m3fn for FP8; shape [out, in]."""
    scale: torch.Tensor
    """[out, 1] per channel, or [out, in / group_size] per group."""
    zero_point: torch.Tensor | None
    args: QuantArgs

    def dequantize(self) -> torch.Tensor:
        codes = self.codes.to(torch.float32)
        scale = self.scale.to(torch.float32)
        zp = None if self.zero_point is None else self.zero_point.to(torch.float32)
        if self.args.strategy == "group":
            g = self.args.group_size
            out, k = codes.shape
            codes = codes.view(out, k // g, g)
            w = (codes - (0 if zp is None else zp.unsqueeze(-1))) * scale.unsqueeze(-1)
            return w.reshape(out, k)
        return (codes - (0 if zp is None else zp)) * scale


def int_range(num_bits: int, weight_range: tuple[int, int] | None = None) -> tuple[int, int]:
    """The code range of a signed integer type, optionally narrowed (e.g. [-64, 63] for CPUs whose int8 GEMM
    saturates on full-range weights)."""
    lo, hi = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    if weight_range is not None:
        lo, hi = max(lo, weight_range[0]), min(hi, weight_range[1])
    return lo, hi


def quantize_weight(w: torch.Tensor, args: QuantArgs, weight_range: tuple[int, int] | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight [out, in] under `args`."""
    w = w.detach().to(torch.float32)
    out, k = w.shape
    if args.strategy == "group":
        g = args.group_size
        if not g or k % g:
            raise ValueError(f"group size {g} does not divide input dimension {k}")
        view = w.view(out, k // g, g)
    elif args.strategy == "channel":
        view = w.view(out, 1, k)
    else:
        raise ValueError(f"weights cannot use strategy {args.strategy}")

    if args.type == "float":
        scale = (view.abs().amax(-1) / FP8_MAX).clamp_min(_EPS)
        codes = (view / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return QuantizedWeight(codes.view(out, k), scale, None, args)

    lo, hi = int_range(args.num_bits, weight_range)
    if args.symmetric:
        scale = (view.abs().amax(-1) / ((hi - lo) / 2)).clamp_min(_EPS)
        codes = torch.round(view / scale.unsqueeze(-1)).clamp(lo, hi)
        zp = None
    else:
        mn = view.amin(-1).clamp(max=0)
        mx = view.amax(-1).clamp(min=0)
        scale = ((mx - mn) / (hi - lo)).clamp_min(_EPS)
        zp = torch.round(lo - mn / scale).clamp(lo, hi)
        codes = torch.round(view / scale.unsqueeze(-1) + zp.unsqueeze(-1)).clamp(lo, hi)
        zp = zp.to(torch.int8)
    return QuantizedWeight(codes.view(out, k).to(torch.int8), scale, zp, args)


def fake_quantize_activations(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Quantize-dequantize activations per token, the way vLLM's dynamic int8 / FP8 input quantization does."""
    if args.strategy != "token" or not args.dynamic:
        raise ValueError("only dynamic per-token activation quantization is supported")
    absmax = x.abs().amax(-1, keepdim=True).to(torch.float32)
    if args.type == "float":
        scale = (absmax / FP8_MAX).clamp_min(_EPS)
        return ((x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale).to(x.dtype)
    lo, hi = int_range(args.num_bits)
    scale = (absmax / hi).clamp_min(_EPS)
    return (torch.round(x / scale).clamp(lo, hi) * scale).to(x.dtype)


class FakeQuantLinear(torch.nn.Module):
    """A linear layer that computes what the quantized kernel computes: dequantized weights, and activations
    quantized per token when the scheme quantizes them."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_args: QuantArgs | None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.act_args = act_args
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_args is not None:
            x = fake_quantize_activations(x, self.act_args)
        return torch.nn.functional.linear(x, self.weight, self.bias)
