"""Checks made before any long work: the scheme is served on the target, and every shape fits the scheme."""

from __future__ import annotations

from advisor.errors import ShapeError
from advisor.model import ModelStructure
from advisor.recipe import Recipe
from advisor.schemes import get_scheme

# Group sizes vLLM's GPU kernels (Marlin) take, largest first; 128 is the usual default when it divides.
GROUP_SIZES = (128, 64, 32)


def choose_group_size(structure: ModelStructure) -> int:
    """The largest kernel-supported group size dividing every quantized input dimension."""
    dims = {li.in_features for li in structure.linears}
    for g in GROUP_SIZES:
        if all(d % g == 0 for d in dims):
            return g
    worst = min(structure.linears, key=lambda li: max((g for g in GROUP_SIZES if li.in_features % g == 0), default=0))
    raise ShapeError(
        f"no group size in {GROUP_SIZES} divides {worst.name} (input dimension {worst.in_features})",
        hint="use a per-channel scheme such as w8a8-int8 or w8a16",
    )


def check_group_size(structure: ModelStructure, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ShapeError(f"group size {group_size} has no vLLM kernel", hint=f"use one of {', '.join(map(str, GROUP_SIZES))}")
    for li in structure.linears:
        if li.in_features % group_size:
            ok = [g for g in GROUP_SIZES if all(x.in_features % g == 0 for x in structure.linears)]
            fix = f"use --group-size {ok[0]}" if ok else "use a per-channel scheme such as w8a8-int8"
            raise ShapeError(
                f"group size {group_size} does not divide {li.name} (input dimension {li.in_features})", hint=fix
            )


def plan(structure: ModelStructure, target, scheme_name: str | None, group_size: int | None,
         smoothing: str | None = None, calibration: dict | None = None, method: str = "rtn",
         iterations: int | None = None) -> Recipe:
    """Turn the user's choices into a recipe the target serves, or fail in seconds with the fix."""
    scheme = get_scheme(scheme_name or target.default_scheme)
    target.require_scheme(scheme.name)
    if scheme.grouped:
        if group_size is None:
            group_size = choose_group_size(structure)
        else:
            check_group_size(structure, group_size)
    elif group_size is not None:
        raise ShapeError(f"scheme {scheme.name} quantizes per channel; --group-size does not apply",
                         hint="drop --group-size, or use w4a16")
    weight_range = None
    if scheme.weights.type == "int" and scheme.weights.num_bits == 8 and scheme.input_activations is not None:
        lo, hi = target.int8_weight_range
        if (lo, hi) != (-128, 127):
            weight_range = [int(lo), int(hi)]
    from advisor.recipe import METHODS

    if method not in METHODS:
        raise ShapeError(f"unknown method '{method}'", hint=f"use one of {', '.join(METHODS)}")
    if method != "rtn" and scheme.weights.type != "int":
        raise ShapeError(f"{method} rounds integer weights; {scheme.name} stores FP8", hint="use --method rtn for fp8")
    if iterations is not None and (method != "autoround" or iterations < 1):
        raise ShapeError("--iterations sets the learning steps of --method autoround (a positive number)",
                         hint="drop --iterations, or use --method autoround with --iterations ≥ 1")
    if smoothing is None:
        # Per-token activation quantization is where W8A8/FP8 lose quality (outlier channels): smooth by default.
        smoothing = "search" if scheme.input_activations is not None else "none"
    return Recipe(
        scheme=scheme.name,
        smoothing=smoothing,
        calibration=(calibration or {"text": "wikitext2-valid", "windows": 16 if method == "rtn" else 32,
                                     "seq_len": 512})
        if smoothing != "none" or method != "rtn" else None,
        target=target.name,
        method=method,
        iterations=iterations,
        group_size=group_size if scheme.grouped else None,
        weight_range=weight_range,
        ignore=list(structure.skipped),
    )
