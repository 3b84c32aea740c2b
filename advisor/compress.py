"""Apply a recipe's transforms to a full-precision model in place, before its weights are quantized and exported.

Every transform here must leave the full-precision function unchanged (smoothing only moves scale between
operations); that is checked on calibration tokens, and a model whose outputs moved is refused rather than shipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from advisor.errors import AdvisorError
from advisor.model import ModelStructure
from advisor.recipe import Recipe

# Largest allowed change of full-precision logits, relative to their scale, after folding the smoothing factors.
EQUIVALENCE_TOL = 1e-3


@dataclass
class CompressReport:
    """What the transforms did, for report.json and the card."""

    smoothing_groups: int = 0
    smoothed: int = 0
    alphas: dict = field(default_factory=dict)
    """Chosen migration strength → number of groups (`none`: left as is)."""
    error_reduction: float | None = None
    """Mean relative output error of the smoothed groups after / before smoothing (lower is better)."""
    calibration_tokens: int = 0
    block_error: dict | None = None
    """Learned rounding: mean relative output error of a decoder block with plain rounding and learned rounding."""
    kept_dense: dict | None = None
    """Linears kept dense by the recipe's dense budget → their estimated quantization cost (nats per token)."""
    quantization_cost: float | None = None
    """Estimated loss increase of quantizing every linear the recipe quantizes, before any was kept dense."""


def calibrated_quantization(model, structure: ModelStructure, recipe: Recipe, tokenizer,
                            report: CompressReport | None = None):
    """Weights quantized by a calibrated method (GPTQ, learned rounding), or None when the recipe rounds to nearest
    at export."""
    if recipe.method == "rtn":
        return None
    from advisor.assignment import quantized_weights
    from advisor.calibrate import CalibConfig, calibration_windows

    cal = CalibConfig(**recipe.calibration) if recipe.calibration else CalibConfig()
    windows = calibration_windows(tokenizer, cal)
    report = report if report is not None else CompressReport()
    report.calibration_tokens = max(report.calibration_tokens, sum(len(w) for w in windows))
    wanted = quantized_weights(recipe, structure)
    if recipe.method == "autoround":
        from advisor.quantize.autoround import RoundConfig, autoround_sequential

        given = {"iterations": recipe.iterations, "seed": recipe.seed}
        config = RoundConfig(**{k: v for k, v in given.items() if v is not None})
        quantized, errors = autoround_sequential(model, wanted, windows, config)
        report.block_error = {
            "rounding": sum(e[0] for e in errors) / len(errors),
            "learned": sum(e[1] for e in errors) / len(errors),
        }
        return quantized
    from advisor.quantize.gptq import gptq_quantize
    from advisor.quantize.sequential import quantize_sequential

    return quantize_sequential(
        model, wanted, windows, lambda name, w, h: gptq_quantize(w, h, wanted[name].weights, wanted[name].pair_sum),
        act_args={n: t.activations for n, t in wanted.items()},
    )


def apply_transforms(model, structure: ModelStructure, recipe: Recipe, tokenizer) -> CompressReport:
    report = CompressReport()
    if recipe.smoothing == "none":
        return report
    from advisor.assignment import module_schemes
    from advisor.calibrate import CalibConfig, calibration_windows, collect
    from advisor.quantize import smooth

    cal = CalibConfig(**recipe.calibration) if recipe.calibration else CalibConfig()
    windows = calibration_windows(tokenizer, cal)
    report.calibration_tokens = sum(len(w) for w in windows)
    chosen = module_schemes(recipe, structure)
    names = list(chosen)  # dense linears too: those reading a scaled activation must absorb the factors
    probe = torch.tensor([windows[0][: min(128, len(windows[0]))]])
    with torch.inference_mode():
        before = model(probe).logits.float()
    stats = collect(model, names, windows, cal.sample_rows)
    groups = smooth.find_groups(model, names, windows[0][:64])
    choices = smooth.search_and_apply(model, groups, stats, chosen, recipe.int8_pair_sum)
    with torch.inference_mode():
        after = model(probe).logits.float()
    drift = ((after - before).abs().max() / before.abs().max().clamp_min(1e-6)).item()
    if drift > EQUIVALENCE_TOL:
        raise AdvisorError(
            f"smoothing changed the full-precision model's outputs (relative drift {drift:.2e}); this architecture "
            "feeds a norm's output to more than linear layers",
            hint="run with --smoothing none",
        )
    report.smoothing_groups = len(choices)
    report.smoothed = sum(c.alpha is not None for c in choices)
    report.alphas = dict(sorted(Counter("none" if c.alpha is None else f"{c.alpha:.2f}" for c in choices).items()))
    done = [c for c in choices if c.alpha is not None and c.error_before > 0]
    if done:
        report.error_reduction = sum(c.error_after / c.error_before for c in done) / len(done)
    return report


def keep_sensitive_dense(model, structure: ModelStructure, recipe: Recipe, tokenizer,
                         report: CompressReport | None = None) -> Recipe:
    """The recipe with its most costly linears added to `overrides` as `recipe.budget_scheme` (dense, or a scheme
    with more bits), within `recipe.dense_budget` (measured on the model as transformed, so after smoothing); the
    layers already dense or at the budget's scheme count against the budget."""
    if recipe.dense_budget <= 0:
        return recipe
    from dataclasses import replace

    from advisor.assignment import DENSE, module_schemes
    from advisor.calibrate import CalibConfig, calibration_windows
    from advisor.sensitivity import choose_dense, quantization_costs

    chosen = module_schemes(recipe, structure)
    cal = CalibConfig(**recipe.calibration) if recipe.calibration else CalibConfig()
    # The cost ranking settles within a few windows (the top layers agree with leave-one-out evaluation at 8).
    windows = calibration_windows(tokenizer, cal)[:8]
    # GPTQ and learned rounding recover most of what an int8 pair limit costs round-to-nearest (weights), never
    # what activation quantization costs: for them a layer is ranked by its cost with unconstrained codes. Ranked
    # with the limit, the AVX2 demo kept a down_proj whose pair-limited rounding learned rounding then fixed anyway.
    pair_sum = recipe.int8_pair_sum if recipe.method == "rtn" else None
    costs = quantization_costs(model, chosen, windows, pair_sum)
    sizes = {li.name: li.in_features * li.out_features for li in structure.linears}
    protected = None if recipe.budget_scheme == DENSE else recipe.budget_scheme
    already = sum(sizes[n] for n, s in chosen.items() if (s.name if s else None) == protected)
    costs = {n: c for n, c in costs.items() if (chosen[n].name if chosen[n] else None) != protected}
    keep = choose_dense(costs, recipe.dense_budget, already)
    if report is not None:
        report.quantization_cost = sum(c.cost for c in costs.values())
        report.kept_dense = {n: costs[n].cost for n in keep}
    if not keep:
        return recipe
    return replace(recipe, overrides={**recipe.overrides, **dict.fromkeys(keep, recipe.budget_scheme)})
