"""How much each linear layer's quantization costs the model, measured on calibration text, and which layers to keep
dense when a small share of the weights may stay in full precision.

The cost of quantizing one layer is estimated to second order from one backward pass per window: with g_t the
gradient of the next-token loss with respect to the layer's output at token t, and Δy_t the change of that output
when the layer alone is quantized (weights, and activations where the kernel quantizes them), the expected loss
increase is ½ E[(g_t · Δy_t)²] (the first-order term vanishes in expectation at a trained model; the Fisher form of
Hassibi & Stork's optimal brain surgeon, used per layer by HAWQ-V2 and SqueezeLLM). Every layer is scored from the
same pass, so the whole model costs a few forward/backward passes rather than one evaluation per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from advisor.quantize.rtn import fake_quantize_activations, quantize_weight
from advisor.schemes import Scheme, pair_limit


@dataclass
class LayerCost:
    name: str
    cost: float
    """Estimated loss increase (nats per token) when this layer alone is quantized under its scheme."""
    params: int


class CostHooks:
    """Forward hooks on linears that record, for a pass whose loss is then backpropagated, each linear's
    ½ Σ_t (g_t · Δy_t)² (see the module docstring) into `totals`. Attached to a whole model (quantization_costs) or
    to one decoder layer at a time (advisor.stream)."""

    def __init__(self, modules: dict[str, torch.nn.Module], schemes: dict[str, Scheme], pair_sum: int | None,
                 totals: dict[str, float]) -> None:
        self.totals = totals
        self.handles = []
        for name, module in modules.items():
            scheme = schemes[name]
            dequantized = quantize_weight(module.weight.detach().float(), scheme.weights,
                                          pair_limit(scheme, pair_sum)).dequantize()
            self.handles.append(module.register_forward_hook(self._hook(name, scheme, dequantized)))

    def _hook(self, name: str, scheme: Scheme, dequantized: torch.Tensor):
        def fn(module, args, out):
            if not out.requires_grad:
                return
            x = args[0].detach().float()
            xq = x if scheme.input_activations is None else fake_quantize_activations(x, scheme.input_activations)
            exact = out.detach().float() - (0 if module.bias is None else module.bias.detach().float())
            delta = xq @ dequantized.T - exact

            def grad_hook(g):
                self.totals[name] += 0.5 * (g.float() * delta).sum(-1).pow(2).sum().item()

            out.register_hook(grad_hook)
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def quantization_costs(model, schemes: dict[str, Scheme | None], windows: list[list[int]],
                       pair_sum: int | None = None) -> dict[str, LayerCost]:
    """Score every linear that `schemes` quantizes on the calibration `windows` (full-precision model, in place
    and unchanged)."""
    modules = dict(model.named_modules())
    wanted = {n: s for n, s in schemes.items() if s is not None}
    totals = dict.fromkeys(wanted, 0.0)
    tokens = 0

    def needs_grad(module, args, out):
        # Frozen weights: gradients flow to activations only, from the embedding output onwards.
        return out.detach().requires_grad_(True)

    handle = model.get_input_embeddings().register_forward_hook(needs_grad)
    hooks = CostHooks({n: modules[n] for n in wanted}, wanted, pair_sum, totals)
    grad_state = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for w in tqdm(windows, desc="measuring each layer's quantization cost", unit="window", leave=False):
            ids = torch.tensor([w])
            with torch.enable_grad():
                logits = model(ids).logits[0, :-1].float()
                # Summed, not averaged: each token's gradient is that token's own loss gradient.
                torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
            tokens += len(w) - 1
    finally:
        handle.remove()
        hooks.remove()
        for p, req in zip(model.parameters(), grad_state):
            p.requires_grad_(req)
    return costs_of(totals, tokens, {n: modules[n].weight.numel() for n in wanted})


def costs_of(totals: dict[str, float], tokens: int, params: dict[str, int]) -> dict[str, LayerCost]:
    """LayerCosts from summed ½(g·Δy)² per linear over `tokens` scored tokens."""
    return {n: LayerCost(n, totals[n] / max(tokens, 1), params[n]) for n in totals}


def choose_dense(costs: dict[str, LayerCost], budget: float, fused: tuple[tuple[str, ...], ...] = (),
                 already_dense_params: int = 0) -> list[str]:
    """The linears to keep dense: the highest cost per parameter first (fused siblings together), while the dense
    weights stay within `budget` (a share of all linear weights, counting those already dense)."""
    total = sum(c.params for c in costs.values()) + already_dense_params
    allowed = budget * total - already_dense_params
    from advisor.plan import fused_units

    units = fused_units(fused, list(costs))
    units.sort(key=lambda u: sum(costs[n].cost for n in u) / sum(costs[n].params for n in u), reverse=True)
    chosen = []
    for unit in units:
        size = sum(costs[n].params for n in unit)
        if size <= allowed:
            chosen.extend(unit)
            allowed -= size
    return chosen
