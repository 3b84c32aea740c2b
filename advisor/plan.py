"""A plan: the recipe resolved against one model and one target, once, into one action per compressible unit.

Every linear gets a scheme or stays dense; decoder layers may get structural actions (advisor.actions). Recipe keys
name modules exactly or by `re:` regex (compressed-tensors' and vLLM's own target syntax); exact names win over
regexes, as in vLLM's target matching. Linears vLLM fuses into one kernel call (advisor.model.ModelStructure.fused)
must share one scheme. Everything that can be checked without weights is checked here, before any long step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from advisor.actions import Action, KeepDense, Quantize, parse_action
from advisor.errors import ShapeError
from advisor.model import ModelStructure
from advisor.quantize import QuantTarget
from advisor.recipe import ACTIVATIONS, Recipe
from advisor.schemes import SCHEMES, Scheme, get_scheme, pair_limit

DENSE = KeepDense.kind


@dataclass(frozen=True)
class Plan:
    """What compress does to one model: the validated recipe and, per unit, its action."""

    recipe: Recipe
    """The recipe with what is chosen per model filled in (group size, int8 pair limit, ignored modules)."""
    structure: ModelStructure
    linears: dict[str, Scheme | None]
    """Every quantizable linear → its scheme (group size and activations applied), or None when it stays dense."""
    structural: dict[str, Action] = field(default_factory=dict)
    """Decoder layer or linear → structural action (remove-layer, prune, factorize), applied before quantization."""
    renamed: dict[str, str] = field(default_factory=dict)
    """After structural actions: a module prefix as the model now names it → as the recipe named it."""

    @property
    def quant_targets(self) -> dict[str, QuantTarget]:
        """Each linear that gets quantized → what its method needs to know."""
        return {name: QuantTarget(s.weights, pair_limit(s, self.recipe.int8_pair_sum), s.input_activations)
                for name, s in self.linears.items() if s is not None}

    @property
    def schemes(self) -> list[Scheme]:
        """Distinct schemes in first-use order."""
        seen: dict[str, Scheme] = {}
        for scheme in self.linears.values():
            if scheme is not None:
                seen.setdefault(scheme.name, scheme)
        return list(seen.values())

    def recipe_name(self, name: str) -> str:
        """A module's name as the recipe names it (before structural actions renumbered layers)."""
        for new, old in self.renamed.items():
            if name == new or name.startswith(new + "."):
                return old + name[len(new):]
        return name

    def with_actions(self, actions: dict[str, object]) -> Plan:
        """The plan with more actions on its linears (named as the model now names them), re-resolved; their
        schemes were checked against the target by resolve (the dense budget's scheme)."""
        added = {self.recipe_name(n): a for n, a in actions.items()}
        recipe = replace(self.recipe, actions={**self.recipe.actions, **added})
        linears = assign_linears(recipe, self.structure, self.recipe_name)
        check_fused(self.structure, linears)
        return replace(self, recipe=recipe, linears=linears)


def with_structure(plan: Plan, chosen: dict[str, object]) -> Plan:
    """The plan with the structural actions chosen for the recipe's `structure` request (unit → action spec) made
    explicit in its recipe, each checked against the model; the request itself is dropped from the recipe (the
    written recipe reproduces the choice, not the search)."""
    recipe = replace(plan.recipe, actions={**plan.recipe.actions, **chosen}, structure=None)
    parsed = {name: parse_action(spec) for name, spec in chosen.items()}
    for name, action in parsed.items():
        action.check(name, plan.structure, None)
    layers, _ = _actions_on(recipe, [li.name for li in plan.structure.layers], "layer")
    linears, _ = _actions_on(recipe, [li.name for li in plan.structure.linears], "linear")
    structural = {**layers, **{n: a for n, a in linears.items() if a.structural}}
    return replace(plan, recipe=recipe, structural=structural)


def scheme_of(recipe: Recipe, name: str | None = None) -> Scheme:
    """The recipe's scheme (or the scheme `name`) with the recipe's group size and activations."""
    scheme = get_scheme(name or recipe.scheme).with_group_size(recipe.group_size)
    return scheme.with_activations(recipe.activations == "symmetric")


def _matches(key: str, name: str) -> bool:
    return re.fullmatch(key[3:], name) is not None if key.startswith("re:") else key == name


def _actions_on(recipe: Recipe, names: list[str], unit: str, name_of=lambda n: n) -> tuple[dict[str, Action], set]:
    """Each of `names` that a recipe key of this unit kind matches → its action; and the keys used."""
    parsed = {k: parse_action(v) for k, v in recipe.actions.items()}
    exact = {k: a for k, a in parsed.items() if not k.startswith("re:") and a.unit == unit}
    regexes = [(k, a) for k, a in parsed.items() if k.startswith("re:") and a.unit == unit]
    chosen, used = {}, set()
    for name in names:
        key = name_of(name)
        hit = (key, exact[key]) if key in exact else next(((k, a) for k, a in regexes if _matches(k, key)), None)
        if hit is not None:
            used.add(hit[0])
            chosen[name] = hit[1]
    return chosen, used


def assign_linears(recipe: Recipe, structure: ModelStructure, name_of=lambda n: n) -> dict[str, Scheme | None]:
    """Every linear of `structure` → the scheme the recipe gives it, or None (dense); `name_of` maps the model's
    module names to the recipe's (after structural actions renumbered layers)."""
    actions, _ = _actions_on(recipe, [li.name for li in structure.linears], "linear", name_of)
    default = None if recipe.scheme == DENSE else scheme_of(recipe)
    ignored = set(recipe.ignore)
    linears = {}
    for li in structure.linears:
        action = actions.get(li.name)
        if li.name in ignored or isinstance(action, KeepDense):
            linears[li.name] = None
        elif isinstance(action, Quantize):
            linears[li.name] = None if action.scheme == DENSE else scheme_of(recipe, action.scheme)
        else:
            linears[li.name] = default
    return linears


def check_structure_request(spec: dict, structure: ModelStructure) -> None:
    """Refuse, before any model is loaded, a structure request the architecture cannot take: pruning channels or heads
    needs an architecture hubc can rebuild with narrower layers (per layer, unless `allocation: uniform`), and
    factorized linears need hubc's own architecture for the base. Removing layers works everywhere."""
    from advisor.architecture import check_reshape
    from advisor.structure_search import DEFAULT_MIX, LATENCY_MIX

    latency = spec.get("speedup") or spec.get("latency")
    mix = spec.get("mix", LATENCY_MIX if latency else DEFAULT_MIX) if spec.get("params") or latency else ()
    narrows = bool(spec.get("mlp") or spec.get("heads") or any(k != "layers" for k in mix))
    if narrows:
        check_reshape(structure.model_type, uniform=spec.get("allocation") == "uniform")
    if spec.get("factorize"):
        check_reshape(structure.model_type)


def resolve(recipe: Recipe, structure: ModelStructure, target) -> Plan:
    """Validate `recipe` (planned by hubc or read from a file) against the model and the target and resolve it into a
    plan, filling in what is chosen per model (group size, this target's int8 code range). Raises ShapeError or
    UnsupportedSchemeError with the module and the fix."""
    recipe.check_fields()
    if recipe.activations not in ACTIVATIONS:
        raise ShapeError(f"unknown activations '{recipe.activations}'", hint=f"use one of {', '.join(ACTIVATIONS)}")
    from advisor.validate import check_head_size, check_head_tied

    check_head_size(structure, target)
    check_head_tied(structure)
    ignore = list(structure.skipped) + [m for m in recipe.ignore if m not in structure.skipped]
    recipe = replace(recipe, target=target.name, ignore=ignore)
    layer_actions, used_layers = _actions_on(recipe, [li.name for li in structure.layers], "layer")
    linear_actions, used_linears = _actions_on(recipe, [li.name for li in structure.linears], "linear")
    unused = [k for k in recipe.actions if k not in used_layers | used_linears]
    if unused:
        kind = parse_action(recipe.actions[unused[0]]).unit
        what = "decoder layer" if kind == "layer" else "quantizable linear layer"
        example = structure.layers[0].name if kind == "layer" and structure.layers else "model.layers.0.mlp.down_proj"
        raise ShapeError(f"recipe action '{unused[0]}' matches no {what} of {structure.architecture}",
                         hint=f"name modules as `model.named_modules()` does (e.g. {example}), or use a `re:` regex")
    if recipe.heal and not (recipe.structure or any(a.structural for a in {**layer_actions, **linear_actions}.values())):
        raise ShapeError("the recipe heals, but prunes, factorizes or removes nothing",
                         hint="drop `heal`, or add a structure request or structural actions")
    if (recipe.heal or recipe.structure) and not recipe.calibration:
        raise ShapeError("structure search and healing read calibration text; the recipe has none",
                         hint="give the recipe a `calibration` block")
    if recipe.structure:
        check_structure_request(recipe.structure, structure)
    for name, action in {**layer_actions, **linear_actions}.items():
        action.check(name, structure, target)
    structural = {**layer_actions, **{n: a for n, a in linear_actions.items() if a.structural}}
    removed = {n for n, a in layer_actions.items() if a.kind == "remove-layer"}
    if structure.layers and len(removed) >= len(structure.layers):
        raise ShapeError(f"the recipe removes every decoder layer of {structure.architecture}",
                         hint="keep at least one layer")
    # Linears of removed layers take no other action: they are gone before quantization.
    linears = assign_linears(replace(recipe, group_size=None), structure)
    check_fused(structure, linears)
    schemes = {s.name: s for s in linears.values() if s is not None}.values()
    if recipe.activations == "asymmetric" and not any(
            s.input_activations is not None and s.input_activations.type == "int" for s in schemes):
        raise ShapeError(f"asymmetric activations apply to int8 activations; {recipe.scheme} has none",
                         hint="drop --activations, or use --scheme w8a8-int8")
    target.require_scheme(recipe.scheme)
    if recipe.scheme == DENSE and (recipe.method != "rtn" or recipe.smoothing != "none" or recipe.dense_budget > 0):
        raise ShapeError("scheme `dense` quantizes nothing: a rounding method, smoothing or a dense budget do not "
                         "apply", hint="drop --method, --smoothing and --dense-budget, or choose a quantized scheme")
    for scheme in schemes:
        target.require_scheme(scheme.name)
        if recipe.method != "rtn" and scheme.weights.type != "int":
            raise ShapeError(f"{recipe.method} rounds integer weights; {scheme.name} stores FP8",
                             hint="use --method rtn for fp8")
    live = [li for li in structure.linears if not any(li.name.startswith(r + ".") for r in removed)]
    grouped = [li for li in live if linears[li.name] is not None and linears[li.name].grouped]
    group_size = recipe.group_size
    if grouped:
        from advisor.validate import check_group_size, choose_group_size

        if group_size is None:
            group_size = choose_group_size(structure, grouped)
        else:
            check_group_size(structure, group_size, grouped)
    elif group_size is not None:
        raise ShapeError(f"scheme {recipe.scheme} has no groups; --group-size does not apply",
                         hint="drop --group-size, or use w4a16")
    _check_budget(recipe, target)
    if recipe.iterations is not None and (recipe.method != "autoround" or recipe.iterations < 1):
        raise ShapeError("--iterations sets the learning steps of --method autoround (a positive number)",
                         hint="drop --iterations, or use --method autoround with --iterations ≥ 1")
    pair_sum = None
    if any(s.weights.type == "int" and s.weights.num_bits == 8 and s.input_activations is not None for s in schemes):
        pair_sum = target.int8_pair_sum
    recipe = replace(recipe, group_size=group_size, int8_pair_sum=pair_sum)
    return Plan(recipe, structure, assign_linears(recipe, structure), structural=structural)


def _check_budget(recipe: Recipe, target) -> None:
    if not 0 <= recipe.dense_budget < 1:
        raise ShapeError(f"dense budget {recipe.dense_budget} is not a share of the weights",
                         hint="use a value from 0 (quantize every linear) to below 1, e.g. --dense-budget 0.02")
    if recipe.budget_scheme == DENSE or recipe.dense_budget <= 0:
        return
    if recipe.budget_scheme not in SCHEMES:
        raise ShapeError(f"unknown budget scheme '{recipe.budget_scheme}'",
                         hint=f"use dense or one of {', '.join(SCHEMES)}")
    raised = get_scheme(recipe.budget_scheme)
    if raised.weights.num_bits <= get_scheme(recipe.scheme).weights.num_bits:
        raise ShapeError(f"budget scheme {recipe.budget_scheme} has no more bits than {recipe.scheme}",
                         hint="use --budget-scheme dense, or one with more bits (e.g. w8a16 for w4a16)")
    target.require_scheme(raised.name)


def check_fused(structure: ModelStructure, linears: dict[str, Scheme | None]) -> None:
    """Refuse plans that give linears vLLM fuses into one layer different schemes."""
    for unit in structure.fused:
        present = [n for n in unit if n in linears]
        kinds = {linears[n].name if linears[n] else DENSE for n in present}
        if len(kinds) > 1:
            parent = present[0].rpartition(".")[0]
            leaves = [n.rpartition(".")[2] for n in present]
            names = ", ".join(f"{n}={linears[n].name if linears[n] else DENSE}" for n in present)
            raise ShapeError(
                f"vLLM fuses {'/'.join(leaves)} into one layer, so they need one scheme ({names})",
                hint=f"give {parent}.{{{','.join(leaves)}}} the same scheme in the recipe actions",
            )


def fused_units(fused: tuple[tuple[str, ...], ...], names: list[str]) -> list[list[str]]:
    """`names` grouped into the units that must share a scheme (`fused`: ModelStructure.fused), in order; every
    other linear is its own unit."""
    units, seen = [], set()
    present = set(names)
    for name in names:
        if name in seen:
            continue
        unit = [n for n in next((u for u in fused if name in u), (name,)) if n in present]
        seen.update(unit)
        units.append(unit)
    return units
