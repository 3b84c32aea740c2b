"""Which scheme each linear layer gets: the recipe's default scheme, per-module overrides, or `dense`.

Overrides name modules exactly or by `re:` regex (compressed-tensors' and vLLM's own target syntax). Exact names win
over regexes, as in vLLM's target matching. vLLM fuses some sibling linears into one kernel call (q/k/v into
`qkv_proj`, gate/up into `gate_up_proj`), so siblings that vLLM fuses must share one scheme.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from advisor.errors import ShapeError
from advisor.model import ModelStructure
from advisor.recipe import Recipe
from advisor.schemes import QuantArgs, Scheme, get_scheme

DENSE = "dense"

# Sibling linears vLLM loads into one fused layer (its packed_modules_mapping for Llama-like models).
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _matches(key: str, name: str) -> bool:
    return re.fullmatch(key[3:], name) is not None if key.startswith("re:") else key == name


def scheme_of(recipe: Recipe, name: str | None = None) -> Scheme:
    """The recipe's scheme (or the scheme `name` from its overrides) with the recipe's group size and activations."""
    scheme = get_scheme(name or recipe.scheme).with_group_size(recipe.group_size)
    return scheme.with_activations(recipe.activations == "symmetric")


def module_schemes(recipe: Recipe, structure: ModelStructure) -> dict[str, Scheme | None]:
    """Every quantizable linear → its scheme (group size applied), or None when it stays dense."""
    default = scheme_of(recipe)
    chosen: dict[str, Scheme | None] = {}
    used = set()
    exact = {k: v for k, v in recipe.overrides.items() if not k.startswith("re:")}
    regexes = [(k, v) for k, v in recipe.overrides.items() if k.startswith("re:")]
    for li in structure.linears:
        key, value = (li.name, exact[li.name]) if li.name in exact else next(
            ((k, v) for k, v in regexes if _matches(k, li.name)), (None, None))
        if key is None:
            chosen[li.name] = default
            continue
        used.add(key)
        chosen[li.name] = None if value == DENSE else scheme_of(recipe, value)
    unused = [k for k in recipe.overrides if k not in used]
    if unused:
        raise ShapeError(f"recipe override '{unused[0]}' matches no quantizable linear layer of {structure.architecture}",
                         hint="name modules as `model.named_modules()` does, or use a `re:` regex")
    return chosen


def fused_units(names: list[str]) -> list[list[str]]:
    """Linears that must share a scheme (vLLM fuses them) form one unit, in sibling order; every other linear is
    its own."""
    units, seen = [], set()
    present = set(names)
    for name in names:
        if name in seen:
            continue
        parent, _, leaf = name.rpartition(".")
        unit = [name]
        for siblings in FUSED_SIBLINGS:
            if leaf in siblings:
                full = [f"{parent}.{s}" if parent else s for s in siblings]
                unit = [n for n in full if n in present]
        seen.update(unit)
        units.append(unit)
    return units


def check_fused(chosen: dict[str, Scheme | None]) -> None:
    """Refuse assignments that give siblings vLLM fuses into one layer different schemes."""
    for unit in fused_units(list(chosen)):
        kinds = {chosen[n].name if chosen[n] else DENSE for n in unit}
        if len(kinds) > 1:
            parent = unit[0].rpartition(".")[0]
            leaves = [n.rpartition(".")[2] for n in unit]
            names = ", ".join(f"{n}={chosen[n].name if chosen[n] else DENSE}" for n in unit)
            raise ShapeError(
                f"vLLM fuses {'/'.join(leaves)} into one layer, so they need one scheme ({names})",
                hint=f"give {parent}.{{{','.join(leaves)}}} the same scheme in the recipe overrides",
            )


def pair_limit(scheme: Scheme, pair_sum: int | None) -> int | None:
    """A recipe's int8 pair limit applies to int8 GEMMs (W8A8) only, not to weight-only kernels."""
    if pair_sum is None or scheme.input_activations is None or scheme.weights.type != "int":
        return None
    return int(pair_sum)


class QuantTarget(NamedTuple):
    """What a calibrated method needs to know about one linear it quantizes."""

    weights: QuantArgs
    pair_sum: int | None
    """Largest |q[2j]| + |q[2j+1]| of its codes (advisor.quantize.rtn.limit_pairs); None: no limit."""
    activations: QuantArgs | None
    """How the kernel quantizes this linear's inputs (None: kept in 16 bits)."""


def quantized_weights(recipe: Recipe, structure: ModelStructure) -> dict[str, QuantTarget]:
    """Each linear that gets quantized → its QuantTarget."""
    return {name: QuantTarget(scheme.weights, pair_limit(scheme, recipe.int8_pair_sum), scheme.input_activations)
            for name, scheme in module_schemes(recipe, structure).items() if scheme is not None}


def used_schemes(chosen: dict[str, Scheme | None]) -> list[Scheme]:
    """Distinct schemes in first-use order."""
    seen: dict[str, Scheme] = {}
    for scheme in chosen.values():
        if scheme is not None:
            seen.setdefault(scheme.name, scheme)
    return list(seen.values())
