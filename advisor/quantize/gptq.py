"""GPTQ (Frantar et al., 2023): quantize a weight column by column and push each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = XᵀX over calibration tokens).

Groups keep the scales of the original weight order (computed before any update, with an MSE clipping search), so
activation ordering never needs a `g_idx` permutation in the checkpoint: every vLLM kernel reads it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from advisor.errors import AdvisorError
from advisor.quantize.rtn import QuantizedWeight, int_range, pair_limited_scale
from advisor.schemes import QuantArgs

# Shrink factors of the range tried by the clipping search (1.0 = plain absmax).
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(13))


def _group_view(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    out, k = w.shape
    g = args.group_size if args.strategy == "group" else k
    return w.view(out, k // g, g)


def search_scales(w: torch.Tensor, args: QuantArgs, hdiag: torch.Tensor | None = None, pair_sum: int | None = None):
    """Per-group symmetric scales minimising the (Hessian-diagonal weighted) rounding error over clipping ratios.

    Two grids are tried per group: compressed-tensors' absmax / (range / 2), and the full signed range, where the
    scale carries the sign of the group's largest-magnitude weight so that weight lands exactly on the lowest code
    (-8 for 4 bits; the llama.cpp / AutoRound convention, one more usable level). Codes and scales are stored
    either way, so both load in every kernel. Under an int8 pair limit the scales come from
    advisor.quantize.rtn.pair_limited_scale instead."""
    if pair_sum is not None:
        if args.num_bits != 8 or args.strategy != "channel":
            raise ValueError("a pair limit applies to per-channel int8 codes")
        return pair_limited_scale(w, pair_sum, hdiag)
    lo, hi = int_range(args.num_bits)
    view = _group_view(w, args)
    weight = None if hdiag is None else _group_view(hdiag.expand_as(w), args)
    absmax = view.abs().amax(-1).clamp_min(1e-12)
    signed = torch.where(view.amax(-1) >= absmax, -absmax, absmax)  # the extreme maps to `lo`
    best_scale = absmax / ((hi - lo) / 2)
    best_err = torch.full_like(absmax, float("inf"))
    for base in (absmax / ((hi - lo) / 2), signed / -lo):
        for ratio in CLIP_GRID:
            scale = base * ratio
            scale = torch.where(scale.abs() < 1e-12, torch.full_like(scale, 1e-12), scale)
            q = torch.round(view / scale.unsqueeze(-1)).clamp(lo, hi) * scale.unsqueeze(-1)
            err = (q - view).pow(2)
            err = (err * weight).sum(-1) if weight is not None else err.sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale  # [out, groups]


@contextmanager
def single_thread():
    """Run on one thread: GPTQ of one weight is a loop of thousands of small vector ops plus a Cholesky inverse of
    the Hessian, and there OpenMP's per-op synchronisation costs more than the work. Measured for one 576x1536
    weight on a busy 2-core machine: 0.6 s on one thread, 16 s on two (12.8 s of it in `cholesky_inverse`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, args: QuantArgs, pair_sum: int | None = None,
                  damp: float = 0.01, act_order: bool = True, block: int = 128) -> QuantizedWeight:
    """GPTQ with dampening, activation order and static groups; symmetric integer weights only. `pair_sum`
    limits same-sign |q[2j]| + |q[2j+1]| (advisor.quantize.rtn.limit_pairs): the second column of each pair to be
    quantized is clamped to what the first left on its side, and GPTQ pushes that clamping error onward like any rounding error."""
    with single_thread():
        return _gptq(w, hessian, args, pair_sum, damp, act_order, block)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H); where H (summed from low-precision
    products, or from too few tokens) is not positive definite at that dampening, λ grows tenfold until it is."""
    mean = torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], device=h.device)
    for attempt in range(4):
        try:
            lower = torch.linalg.cholesky(h + damp * 10**attempt * mean * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise AdvisorError(f"GPTQ: the calibration Hessian is not positive definite even with dampening {damp * 1000:g}",
                       hint="calibrate on more tokens, or use --method autoround")


def _gptq(w, hessian, args, pair_sum, damp, act_order, block) -> QuantizedWeight:
    if args.type != "int" or not args.symmetric:
        raise ValueError("GPTQ here quantizes symmetric integer weights")
    w = w.detach().float().clone()
    k = w.shape[1]
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale = search_scales(w, args, torch.diag(h)[None, :], pair_sum)
    g = args.group_size if args.strategy == "group" else k
    col_scale = scale.repeat_interleave(g, dim=1)  # [out, k]: each column's own group scale
    lo, hi = int_range(args.num_bits)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=h.device)
    # Processing position of each column's pair partner (2j <-> 2j+1), when that partner comes first.
    partner_at = [-1] * k
    if pair_sum is not None:
        position = torch.argsort(perm).tolist()
        for j, col in enumerate(perm.tolist()):
            mate = col ^ 1
            if mate < k and position[mate] < j:
                partner_at[j] = position[mate]
    w, h, col_scale = w[:, perm], h[perm][:, perm], col_scale[:, perm]
    hinv = _inverse_cholesky(h, damp)

    codes = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, d = w1[:, i], hinv1[i, i]
            s = col_scale[:, i1 + i]
            c = torch.round(col / s).clamp(lo, hi)
            if partner_at[i1 + i] >= 0:  # a code of the partner's sign may only take what the partner left
                mate = codes[:, partner_at[i1 + i]]
                c = torch.minimum(c, torch.where(mate > 0, pair_sum - mate, hi))
                c = torch.maximum(c, torch.where(mate < 0, -pair_sum - mate, lo))
            codes[:, i1 + i] = c
            e = (col - c * s) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes = codes[:, inv].to(torch.int8)
    return QuantizedWeight(codes, scale, None, args)


def layer_quantizer(targets: dict):
    """`quantize(name, weight, hessian)` for advisor.quantize.sequential: GPTQ under each target's scheme."""
    return lambda name, w, h: gptq_quantize(w, h, targets[name].weights, targets[name].pair_sum)


def quantize_model(model, targets: dict, windows: list[list[int]], recipe,
                   device=None) -> tuple[dict[str, QuantizedWeight], dict]:
    """GPTQ on every target linear of the decoder stack, layer by layer on the calibration windows; linears outside
    the stack (none in the supported architectures: the head is never quantized) are rounded to nearest."""
    from advisor.quantize.rtn import quantize_weight
    from advisor.quantize.sequential import quantize_sequential

    quantized = quantize_sequential(model, targets, windows, layer_quantizer(targets),
                                    act_args={n: t.activations for n, t in targets.items()}, device=device)
    modules = dict(model.named_modules())
    for name, t in targets.items():
        if name not in quantized:
            quantized[name] = quantize_weight(modules[name].weight, t.weights, t.pair_sum)
    return quantized, {}
