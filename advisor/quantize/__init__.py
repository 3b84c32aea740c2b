"""Quantizers: the rounding methods a recipe names (`method`), one module each.

Each method module defines `quantize_model(model, targets, windows, recipe, device=None) -> (quantized weights, info)`. The
registry maps a recipe's method name to its module, imported when used (torch stays out of `hubc --help`).
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

# name → module (order: cheapest first, as --method lists them)
_METHODS = {
    "rtn": "advisor.quantize.rtn",
    "gptq": "advisor.quantize.gptq",
    "autoround": "advisor.quantize.autoround",
}
METHODS = tuple(_METHODS)


class QuantTarget(NamedTuple):
    """What a method needs to know about one linear it quantizes."""

    weights: object
    """advisor.schemes.QuantArgs of its weights."""
    pair_sum: int | None
    """Largest |q[2j]| + |q[2j+1]| of its codes (advisor.quantize.rtn.limit_pairs); None: no limit."""
    activations: object | None
    """How the kernel quantizes this linear's inputs (QuantArgs; None: kept in 16 bits)."""


def quantize_with(method: str, model, targets: dict[str, QuantTarget], windows: list[list[int]] | None, recipe,
                  device=None):
    """Quantize the `targets` linears of `model` with the named method; returns ({name: QuantizedWeight}, info for
    the report). Calibrated methods write each quantized weight back into the model as they go; `device` (a GPU:
    advisor.device) computes them there one decoder layer at a time."""
    if method not in _METHODS:
        raise KeyError(method)
    return importlib.import_module(_METHODS[method]).quantize_model(model, targets, windows, recipe, device=device)
