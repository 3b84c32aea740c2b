"""Rounding optimization (AutoRound-style; Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent"):
for every weight, learn an offset in [-0.5, 0.5] added before rounding, and for every group a clipping factor of its
scale, by signed gradient descent on the decoder block's output error against the full-precision block.

Why it generalises where GPTQ overfits: GPTQ rewrites the unquantized columns to cancel the calibration text's error
exactly, while here each weight moves by at most half a code step, so the result stays close to round-to-nearest
and only the rounding *direction* is learned from the calibration text.

Block by block, like the reference method: block i learns on the outputs of the already-quantized blocks before it,
and its target is the full-precision block's output on full-precision inputs, so errors of earlier blocks are
corrected rather than copied (measured on the demo model with 64×512 calibration tokens: targets computed on the
quantized inputs instead gave +10.4% / +19.2% perplexity on wikitext-2 / licenses against +5.4% / +16.6%).
Memory: two activation streams (quantized and full precision) of one block's width.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from advisor.device import HOST, autocast, move, on_gpu, work_device
from advisor.model import decoder_layers
from advisor.quantize.rtn import QuantizedWeight, int_range, limit_pairs, pair_limited_scale
from advisor.quantize.sequential import (
    clone_tree,
    layer_arguments,
    layer_output,
    native_bf16,
    quantize_activations_of,
)
from advisor.schemes import QuantArgs


@dataclass(frozen=True)
class RoundConfig:
    iterations: int = 50
    """Signed-gradient steps per decoder block."""
    batch: int = 8
    """Calibration windows per step."""
    min_clip: float = 0.5
    """Smallest fraction of a group's absolute maximum its scale may be clipped to."""
    seed: int = 0
    """Minibatch order."""
    bf16: bool | None = None
    """Run the block in bfloat16 while learning and while comparing the candidates on every window (targets and the
    final weights stay fp32). None: where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where it is
    about 3× faster per step than fp32."""


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class _LearnedRounding:
    """One linear's weight with its learnable rounding offsets and per-group clipping factors.

    The grid uses every code of the signed range: each group's scale carries the sign of its largest-magnitude
    weight, so that weight lands exactly on the lowest code (-8 for 4 bits) and the other side keeps codes up to
    +7 (the llama.cpp / AutoRound convention, one more usable level than absmax / 7.5). A checkpoint stores codes
    and scales only, so a negative scale is just a number every dequantizing kernel multiplies by. The two sides of
    each group get their own clipping factor."""

    def __init__(self, weight: torch.Tensor, args: QuantArgs, pair_sum: int | None) -> None:
        if args.type != "int" or not args.symmetric:
            raise ValueError("rounding optimization here quantizes symmetric integer weights")
        self.args = args
        self.weight = weight.detach().float()
        out, k = self.weight.shape
        g = args.group_size if args.strategy == "group" else k
        self.shape = (out, k // g, g)
        self.lo, self.hi = int_range(args.num_bits)
        self.pair_sum = pair_sum
        # At 8 bits only the offsets learn. Clipping moves the scale by signed steps of 1/iterations, far coarser than
        # an 8-bit grid needs, and under a pair limit it also changes which pairs exceed it. Measured: on a tiny
        # Llama every W8A8 block learned with clipping ended worse than plain rounding, offsets alone halved its output
        # error. The demo (W8A8 on an AVX-512 VNNI CPU, 40×512 tokens per text, served, wikitext-2 / licenses): +0.42% /
        # +1.46% with clipping learned, +0.47% / +1.10% with offsets alone.
        self.offsets_only = args.num_bits >= 8
        view = self.weight.view(self.shape)
        self.wmax = view.amax(-1).clamp_min(0)
        self.wmin = view.amin(-1).clamp_max(0).neg()
        if pair_sum is not None:
            # Start from the scale that balances rounding and pair-limit error; the offsets learn on that grid.
            start = pair_limited_scale(self.weight, pair_sum) * -self.lo / torch.maximum(self.wmax, self.wmin).clamp_min(1e-12)
            self.wmax, self.wmin = self.wmax * start, self.wmin * start
        device = self.weight.device
        self.offset = torch.zeros(self.shape, device=device, requires_grad=True)
        self.clip_max = torch.ones(self.shape[:2], device=device, requires_grad=True)
        self.clip_min = torch.ones(self.shape[:2], device=device, requires_grad=True)

    def _scale(self) -> torch.Tensor:
        top, bottom = self.wmax * self.clip_max, self.wmin * self.clip_min
        extreme = torch.maximum(top, bottom).clamp_min(1e-12)
        # The larger side maps to the lowest code: a positive extreme gets a negative scale.
        sign = torch.where(top > bottom, -1.0, 1.0)
        return sign * extreme / -self.lo

    def _limited(self, codes: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """`codes` with the pair limit applied (straight through: gradients flow as if it were not)."""
        if self.pair_sum is None:
            return codes
        flat = limit_pairs(codes.detach().view_as(self.weight), self.pair_sum, real.detach().view_as(self.weight),
                           self.lo, self.hi)
        return codes + (flat.view_as(codes) - codes).detach()

    def fake_quantized(self) -> torch.Tensor:
        scale = self._scale().unsqueeze(-1)
        real = self.weight.view(self.shape) / scale + self.offset
        q = self._limited(torch.clamp(_round_ste(real), self.lo, self.hi), real)
        return (q * scale).view_as(self.weight)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        scale = self._scale()
        real = self.weight.view(self.shape) / scale.unsqueeze(-1) + self.offset
        codes = self._limited(torch.clamp(torch.round(real), self.lo, self.hi), real)
        return QuantizedWeight(codes.view_as(self.weight).to(torch.int8), scale, None, self.args)

    def params(self) -> list[torch.Tensor]:
        return [self.offset] if self.offsets_only else [self.offset, self.clip_max, self.clip_min]

    @torch.no_grad()
    def project(self, min_clip: float) -> None:
        self.offset.clamp_(-0.5, 0.5)
        self.clip_max.clamp_(min_clip, 1.0)
        self.clip_min.clamp_(min_clip, 1.0)

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in self.params())

    @torch.no_grad()
    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        for p, saved in zip(self.params(), state):
            p.copy_(saved)


@torch.no_grad()
def _stackable(layer, inputs: list) -> bool:
    """Whether windows can run through the layer as one batch: same shapes, and the layer's other arguments
    (rotary tables, masks) broadcast over the batch, checked by comparing a stacked call with separate ones."""
    if len(inputs) < 2 or len({a[0].shape for a, _ in inputs}) != 1:
        return False
    (a0, k0), (a1, k1) = inputs[:2]
    try:
        together = layer_output(layer(torch.cat([a0[0], a1[0]]), *a0[1:], **k0))
    except RuntimeError as exc:
        # Arguments that do not broadcast over a batch raise here; running out of memory is no such answer.
        if isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc):
            raise
        return False
    apart = torch.cat([layer_output(layer(*a0, **k0)), layer_output(layer(*a1, **k1))])
    return together.shape == apart.shape and torch.allclose(together, apart, rtol=1e-4, atol=1e-5 * apart.abs().max().item())


def optimize_block(layer: torch.nn.Module, linears: dict[str, _LearnedRounding], q_inputs: list, targets: list,
                   config: RoundConfig) -> tuple[float, float, list[torch.Tensor]]:
    """Learn the block's rounding by signed gradient descent; returns the output error (relative MSE) of plain
    rounding and of the learned rounding, both on all calibration windows, and the block's outputs (one per
    window) with the rounding kept, which are the next block's inputs."""
    from torch.func import functional_call

    stack = _stackable(layer, q_inputs)

    def run(idx: list[int], bf16=False) -> torch.Tensor:
        """The block's output on windows `idx` with the current rounding, as one batch when the layer allows."""
        weights = {f"{n}.weight": lr.fake_quantized() for n, lr in linears.items()}
        with autocast(device, bf16):
            if stack:
                args, kwargs = q_inputs[idx[0]]
                x = torch.cat([q_inputs[i][0][0] for i in idx])
                return layer_output(functional_call(layer, weights, (x,) + tuple(args[1:]), kwargs)).float()
            return torch.cat([layer_output(functional_call(layer, weights, *q_inputs[i])) for i in idx]).float()

    total = sum(t.pow(2).sum().item() for t in targets)

    def error() -> tuple[float, list[torch.Tensor]]:
        """Relative error on every window, and the outputs (kept: the winner's are the next block's inputs)."""
        outputs, num = [], 0.0
        with torch.no_grad():
            for i in range(0, len(targets), config.batch):
                chunk = list(range(i, min(i + config.batch, len(targets))))
                out = run(chunk, bf16)
                num += (out - torch.cat([targets[j] for j in chunk])).pow(2).sum().item()
                outputs += out.split([targets[j].shape[0] for j in chunk])
        return num / total, outputs

    device = q_inputs[0][0][0].device
    bf16 = True if on_gpu(device) else native_bf16() if config.bf16 is None else config.bf16
    params = [p for lr in linears.values() for p in lr.params()]
    gen = torch.Generator().manual_seed(config.seed)
    lr0 = 1.0 / config.iterations
    best_loss, best = float("inf"), None
    frozen = [p for p in layer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        start = {n: lr.snapshot() for n, lr in linears.items()}
        before, outputs = error()
        for step in range(config.iterations):
            picks = torch.randperm(len(targets), generator=gen)[: config.batch].tolist()
            loss = torch.nn.functional.mse_loss(run(picks, bf16), torch.cat([targets[i] for i in picks]))
            loss.backward()
            loss_sum = loss.item()
            if loss_sum < best_loss:
                # The parameters that produced this loss are the ones before this step's update.
                best_loss, best = loss_sum, {n: lr.snapshot() for n, lr in linears.items()}
            step_size = lr0 * (1.0 - step / config.iterations)  # linear decay to zero
            with torch.no_grad():
                for p in params:
                    p.sub_(step_size * torch.sign(p.grad))
                    p.grad = None
            for lr in linears.values():
                lr.project(config.min_clip)
        # Keep whichever is best on every calibration window: the last step, the best minibatch step, or plain
        # rounding (learning on minibatches can fail to beat it).
        final = {n: lr.snapshot() for n, lr in linears.items()}
        after, chosen = before, start
        for candidate in (final, best):
            if candidate is None:
                continue
            for n, lr in linears.items():
                lr.restore(candidate[n])
            err, out = error()
            if err < after:
                after, chosen, outputs = err, candidate, out
        for n, lr in linears.items():
            lr.restore(chosen[n])
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return before, after, outputs


def estimate_seconds(forward_s: float, blocks: int, windows: int, config: RoundConfig) -> float:
    """Time learned rounding takes, from the time of one block's fp32 forward pass over every calibration window:
    per block, the targets (one pass), each step's forward and backward on `batch` windows (about 3 forward passes'
    worth each, in bf16 where it runs in bf16) and three comparisons on every window. The progress bar's own
    estimate takes over once blocks are done."""
    bf16 = native_bf16() if config.bf16 is None else config.bf16
    speed = 2.4 if bf16 else 1.0  # bf16 forward passes on CPUs with native bf16 (native_bf16's measurement)
    per_window = forward_s / max(1, windows)
    steps = config.iterations * min(config.batch, windows) * 3 * per_window / speed
    return blocks * (forward_s + steps + 3 * forward_s / speed)


def autoround_sequential(model, wanted: dict, windows: list[list[int]], config: RoundConfig = RoundConfig(),
                         device: torch.device | None = None) -> tuple[dict[str, QuantizedWeight], list]:
    """Quantize the `wanted` decoder linears (name → advisor.quantize.QuantTarget) with learned rounding, block
    by block; where the scheme quantizes activations, they are quantized while learning too (straight-through), so
    the rounding also compensates the activation error. Returns the quantized weights and the per-block (error of
    plain rounding, error after learning)."""
    results: dict[str, QuantizedWeight] = {}
    errors = []
    for _, _, done, error in autoround_layers(model, wanted, windows, config, device=device):
        results.update(done)
        errors.append(error)
    return results, errors


def autoround_layers(model, wanted: dict, windows: list[list[int]], config: RoundConfig = RoundConfig(),
                     load: Callable[[int, torch.nn.Module], None] | None = None, device: torch.device | None = None,
                     ) -> Iterator[tuple[int, torch.nn.Module, dict[str, QuantizedWeight], tuple[float, float]]]:
    """autoround_sequential one block at a time: yields (index, block, its quantized linears, its (error of plain
    rounding, error after learning)) as each block is done, its outputs already computed; `load(index, block)` is
    called before a block is first used (advisor.stream reads its weights there). `device` (a GPU) learns each block
    there, as advisor.quantize.sequential.quantize_layers computes there: the block and its quantized weights are
    back on the host when yielded."""
    device = work_device(device)
    prefix, layers = decoder_layers(model)
    # Copies made outside inference mode: autograd cannot use tensors captured under it. Each layer gets its own
    # masks and positions (Gemma's sliding and global layers differ: advisor.quantize.sequential.layer_arguments).
    memo: dict = {}
    hidden, arguments = layer_arguments(model, layers, windows)
    hidden, arguments = clone_tree(hidden, memo), clone_tree(arguments, memo)
    del memo
    fp_hidden = q_hidden = hidden
    moved: dict = {}  # masks and rotary tables shared by the blocks, moved once
    bar = tqdm(layers, desc="learning rounding block by block", unit="block", leave=False)
    for i, layer in enumerate(bar):
        if load is not None:
            load(i, layer)
        if device is not None:
            layer.to(device)
            fp_hidden, q_hidden = move(fp_hidden, device), move(q_hidden, device)
        results: dict[str, QuantizedWeight] = {}
        names = {n: m for n, m in layer.named_modules()
                 if isinstance(m, torch.nn.Linear) and f"{prefix}.{i}.{n}" in wanted}
        args_i = move(arguments[i], device, moved)
        fp_inputs = [((h,) + args, kwargs) for h, (args, kwargs) in zip(fp_hidden, args_i, strict=True)]
        q_inputs = [((h,) + args, kwargs) for h, (args, kwargs) in zip(q_hidden, args_i, strict=True)]
        started = time.monotonic()
        with torch.no_grad():
            targets = [layer_output(layer(*a, **k)) for a, k in fp_inputs]
        if i == 0:
            minutes = estimate_seconds(time.monotonic() - started, len(layers), len(windows), config) / 60
            bar.write(f"learned rounding: {len(layers)} blocks × {config.iterations} steps on {len(windows)} "
                      f"windows; about {minutes:.0f} min on this CPU (estimated from one block's forward pass)", file=sys.stderr)
        spec = {n: wanted[f"{prefix}.{i}.{n}"] for n in names}
        learned = {n: _LearnedRounding(m.weight, spec[n].weights, spec[n].pair_sum) for n, m in names.items()}
        handles = quantize_activations_of(names, {n: spec[n].activations for n in names}, straight_through=True)
        try:
            before, after, outputs = optimize_block(layer, learned, q_inputs, targets, config)
            for n, m in names.items():
                qw = learned[n].quantized()
                m.weight.data.copy_(qw.dequantize().to(m.weight.dtype))
                results[f"{prefix}.{i}.{n}"] = qw
            q_hidden = outputs
        finally:
            for h in handles:
                h.remove()
        fp_hidden = targets
        del fp_inputs, q_inputs, targets, learned, args_i
        if device is not None:
            layer.to(HOST)
            results = {n: qw.to(HOST) for n, qw in results.items()}
        yield i, layer, results, (before, after)


def quantize_model(model, targets: dict, windows: list[list[int]], recipe,
                   device: torch.device | None = None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Learned rounding with the recipe's steps and seed; info: the steps run and the mean relative block error of
    plain and learned rounding."""
    from advisor.quantize.rtn import quantize_weight

    config = round_config(recipe)
    quantized, errors = autoround_sequential(model, targets, windows, config, device)
    modules = dict(model.named_modules())
    for name, t in targets.items():
        if name not in quantized:
            quantized[name] = quantize_weight(modules[name].weight, t.weights, t.pair_sum)
    return quantized, report_info(errors, config)


def round_config(recipe) -> RoundConfig:
    """The learning settings a recipe asks for (its steps and seed; defaults for the rest)."""
    given = {"iterations": recipe.iterations, "seed": recipe.seed}
    return RoundConfig(**{k: v for k, v in given.items() if v is not None})


def report_info(errors: list[tuple[float, float]], config: RoundConfig) -> dict:
    """For the compression report: the steps run and the mean relative block error of plain and learned
    rounding."""
    return {"block_error": {"rounding": sum(e[0] for e in errors) / len(errors),
                            "learned": sum(e[1] for e in errors) / len(errors)},
            "iterations": config.iterations, "seed": config.seed}
