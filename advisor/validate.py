"""Checks made before any long work: every scheme is served on the target, and every shape fits its scheme."""

from __future__ import annotations

from advisor.errors import ShapeError
from advisor.model import LinearInfo, ModelStructure
from advisor.recipe import ACTIVATIONS, METHODS, Recipe
from advisor.schemes import Scheme, get_scheme

# Group sizes vLLM's GPU kernels (Marlin) take, largest first; 128 is the usual default when it divides.
GROUP_SIZES = (128, 64, 32)


def choose_group_size(structure: ModelStructure, linears: list[LinearInfo] | None = None) -> int:
    """The largest kernel-supported group size dividing every quantized input dimension."""
    linears = list(structure.linears) if linears is None else linears
    dims = {li.in_features for li in linears}
    for g in GROUP_SIZES:
        if all(d % g == 0 for d in dims):
            return g
    worst = min(linears, key=lambda li: max((g for g in GROUP_SIZES if li.in_features % g == 0), default=0))
    raise ShapeError(
        f"no group size in {GROUP_SIZES} divides {worst.name} (input dimension {worst.in_features})",
        hint="use a per-channel scheme such as w8a8-int8 or w8a16",
    )


def check_group_size(structure: ModelStructure, group_size: int, linears: list[LinearInfo] | None = None) -> None:
    linears = list(structure.linears) if linears is None else linears
    if group_size not in GROUP_SIZES:
        raise ShapeError(f"group size {group_size} has no vLLM kernel", hint=f"use one of {', '.join(map(str, GROUP_SIZES))}")
    for li in linears:
        if li.in_features % group_size:
            ok = [g for g in GROUP_SIZES if all(x.in_features % g == 0 for x in linears)]
            fix = f"use --group-size {ok[0]}" if ok else "use a per-channel scheme such as w8a8-int8"
            raise ShapeError(
                f"group size {group_size} does not divide {li.name} (input dimension {li.in_features})", hint=fix
            )


# Share of the linear weights a 4-bit recipe keeps at 8 bits by default, where the target serves w8a16. Demo model,
# W4A16 GPTQ, 16×512 tokens per text (benchmarks/results/default_method_a10g.md): +10.96% / +24.36% perplexity
# (wikitext-2 / licenses) with none, +8.97% / +19.00% at 10%, +4.26% / +12.17% at 20%, +2.76% / +8.14% at 30%.
LOW_BIT_BUDGET = 0.3


def default_method(scheme: Scheme, target) -> str:
    """GPTQ where round-to-nearest loses too much and GPTQ is fast everywhere; round to nearest elsewhere.

    - Weights of 4 bits or fewer: round-to-nearest cost the demo model +42.5% / +46.8% perplexity (wikitext-2 /
      licenses) at W4A16, GPTQ a quarter of that in about a minute (benchmarks/results/default_method_a10g.md).
    - int8 GEMMs under a pair limit (CPUs without VNNI): round-to-nearest needs coarser scales there and lost
      +1.61% on licenses; GPTQ +0.48%, learned rounding as much at 4-10× the time when it learns in fp32 (no native
      bf16 on those CPUs; benchmarks/results/default_method_cpu.md)."""
    if scheme.weights.type != "int":
        return "rtn"
    if scheme.weights.num_bits <= 4:
        return "gptq"
    int8_gemm = scheme.input_activations is not None
    return "gptq" if int8_gemm and target.int8_pair_sum is not None else "rtn"


def default_dense_budget(scheme: Scheme, target=None) -> tuple[float, str]:
    """2% of the weights stay dense where activations are quantized (W8A8, FP8): there the loss concentrates in a
    few layers and keeping them costs little memory; weight-only schemes quantize every linear. Measured on the
    demo model (W8A8 smoothed, 16×512 tokens of six texts: wikitext-2, licenses, Node.js docs, Python source, Rust
    release notes, Vim manual): KL to the base 0.0089-0.0169 with no layer dense, 0.0081-0.0134 at 1% (layer 0's
    down_proj), 0.0074-0.0133 at 2% (+6.3 MB, three layers), 0.0068-0.0119 at 4% (+12 MB); Δppl at 2% at most
    +0.72% on every text, against +1.23% at 1%.

    Returns (share, what the share gets: `dense` or a scheme id)."""
    if scheme.input_activations is not None:
        return 0.02, "dense"
    if scheme.weights.num_bits <= 4 and target is not None and target.supports("w8a16"):
        return LOW_BIT_BUDGET, "w8a16"
    return 0.0, "dense"


def plan(structure: ModelStructure, target, scheme_name: str | None, group_size: int | None,
         smoothing: str | None = None, calibration: dict | None = None, method: str | None = "rtn",
         iterations: int | None = None, overrides: dict[str, str] | None = None,
         dense_budget: float | None = None, activations: str = "symmetric",
         budget_scheme: str | None = None) -> Recipe:
    """Turn the user's choices into a recipe the target serves, or fail in seconds with the fix; `method` None
    takes default_method, `dense_budget` / `budget_scheme` None default_dense_budget."""
    scheme = get_scheme(scheme_name or target.default_scheme)
    method = method or default_method(scheme, target)
    default_share, default_raised = default_dense_budget(scheme, target)
    dense_budget = default_share if dense_budget is None else dense_budget
    budget_scheme = budget_scheme or (default_raised if dense_budget > 0 else "dense")
    if method not in METHODS:
        raise ShapeError(f"unknown method '{method}'", hint=f"use one of {', '.join(METHODS)}")
    if smoothing is None:
        # Per-token activation quantization is where W8A8/FP8 lose quality (outlier channels): smooth by default.
        smoothing = "search" if scheme.input_activations is not None else "none"
    recipe = Recipe(
        scheme=scheme.name,
        smoothing=smoothing,
        calibration=(calibration or {"text": "wikitext2-valid", "windows": 32 if method == "autoround" else 16,
                                     "seq_len": 512})
        if smoothing != "none" or method != "rtn" or dense_budget > 0 else None,
        dense_budget=dense_budget,
        budget_scheme=budget_scheme,
        activations=activations,
        target=target.name,
        method=method,
        iterations=iterations,
        group_size=group_size,
        overrides=dict(overrides or {}),
        ignore=list(structure.skipped),
    )
    return check_recipe(recipe, structure, target)


def check_recipe(recipe: Recipe, structure: ModelStructure, target) -> Recipe:
    """Validate a recipe (planned here or read from a file) against the model and the target, filling in what is
    chosen per model (group size, this target's int8 code range). Raises with the module and the fix."""
    from dataclasses import replace

    from advisor.assignment import check_fused, module_schemes, used_schemes

    if recipe.method not in METHODS:
        raise ShapeError(f"unknown method '{recipe.method}'", hint=f"use one of {', '.join(METHODS)}")
    if recipe.activations not in ACTIVATIONS:
        raise ShapeError(f"unknown activations '{recipe.activations}'", hint=f"use one of {', '.join(ACTIVATIONS)}")
    chosen = module_schemes(replace(recipe, group_size=None), structure)
    check_fused(chosen)
    schemes = used_schemes(chosen)
    if recipe.activations == "asymmetric" and not any(
            s.input_activations is not None and s.input_activations.type == "int" for s in schemes):
        raise ShapeError(f"asymmetric activations apply to int8 activations; {recipe.scheme} has none",
                         hint="drop --activations, or use --scheme w8a8-int8")
    for scheme in schemes:
        target.require_scheme(scheme.name)
        if recipe.method != "rtn" and scheme.weights.type != "int":
            raise ShapeError(f"{recipe.method} rounds integer weights; {scheme.name} stores FP8",
                             hint="use --method rtn for fp8")
    grouped = [li for li in structure.linears if chosen[li.name] is not None and chosen[li.name].grouped]
    group_size = recipe.group_size
    if grouped:
        if group_size is None:
            group_size = choose_group_size(structure, grouped)
        else:
            check_group_size(structure, group_size, grouped)
    elif group_size is not None:
        raise ShapeError(f"scheme {recipe.scheme} quantizes per channel; --group-size does not apply",
                         hint="drop --group-size, or use w4a16")
    if recipe.budget_scheme != "dense" and recipe.dense_budget > 0:
        from advisor.schemes import SCHEMES

        if recipe.budget_scheme not in SCHEMES:
            raise ShapeError(f"unknown budget scheme '{recipe.budget_scheme}'",
                             hint=f"use dense or one of {', '.join(SCHEMES)}")
        raised = get_scheme(recipe.budget_scheme)
        if raised.weights.num_bits <= get_scheme(recipe.scheme).weights.num_bits:
            raise ShapeError(f"budget scheme {recipe.budget_scheme} has no more bits than {recipe.scheme}",
                             hint="use --budget-scheme dense, or one with more bits (e.g. w8a16 for w4a16)")
        target.require_scheme(raised.name)
    if not 0 <= recipe.dense_budget < 1:
        raise ShapeError(f"dense budget {recipe.dense_budget} is not a share of the weights",
                         hint="use a value from 0 (quantize every linear) to below 1, e.g. --dense-budget 0.02")
    if recipe.iterations is not None and (recipe.method != "autoround" or recipe.iterations < 1):
        raise ShapeError("--iterations sets the learning steps of --method autoround (a positive number)",
                         hint="drop --iterations, or use --method autoround with --iterations ≥ 1")
    pair_sum = None
    if any(s.weights.type == "int" and s.weights.num_bits == 8 and s.input_activations is not None for s in schemes):
        pair_sum = target.int8_pair_sum
    ignore = list(structure.skipped) + [m for m in recipe.ignore if m not in structure.skipped]
    return replace(recipe, target=target.name, group_size=group_size, int8_pair_sum=pair_sum, ignore=ignore)
