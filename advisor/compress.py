"""The one entry point of compression: `compress(model, plan, calibration)` applies a plan to a full-precision model
in place and returns what export writes. `hubc optimize`, every benchmark and the tests call it.

Steps, in order: structural actions (remove layers, ...), per-channel smoothing, the dense budget (the linears whose
quantization costs the most move to `budget_scheme`), then the recipe's rounding method (advisor.quantize). Every
transform that must leave the full-precision function unchanged (smoothing only moves scale between operations) is
checked on calibration tokens, and a model whose outputs moved is refused rather than shipped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from advisor.calibrate import CalibConfig, Calibration
from advisor.errors import AdvisorError
from advisor.plan import DENSE, Plan, assign_linears
from advisor.quantize.rtn import QuantizedWeight, pair_sums

# Largest allowed change of full-precision logits, relative to their scale, after folding the smoothing factors.
EQUIVALENCE_TOL = 1e-3


@dataclass
class CompressReport:
    """What compression did, for report.json and the card."""

    removed_layers: list[str] = field(default_factory=list)
    """Decoder layers removed (as the recipe names them)."""
    structure: dict = field(default_factory=dict)
    """Structural action kind → what it did (widths and heads kept, ranks, importance used)."""
    structure_request: dict | None = None
    """The recipe's model-level structure request, before it was resolved into per-unit actions."""
    heal: dict | None = None
    """Distillation healing (advisor.heal.HealReport): steps, time, KL, held-out perplexity before and after."""
    smoothing_groups: int = 0
    smoothed: int = 0
    alphas: dict = field(default_factory=dict)
    """Chosen migration strength → number of groups (`none`: left as is)."""
    error_reduction: float | None = None
    """Mean relative output error of the smoothed groups after / before smoothing (lower is better)."""
    calibration_tokens: int = 0
    block_error: dict | None = None
    """Learned rounding: mean relative output error of a decoder block with plain rounding and learned rounding."""
    iterations: int | None = None
    """Learned rounding: the learning steps per block it ran."""
    layer_seconds: list[float] | None = None
    """Streamed (advisor.stream): seconds each decoder layer took (read, calibrate, quantize, hand to the writer)."""
    kept_dense: dict | None = None
    """Linears moved to the budget's scheme by the dense budget → their estimated quantization cost (nats/token)."""
    quantization_cost: float | None = None
    """Estimated loss increase of quantizing every linear the recipe quantizes, before any was kept dense."""


@dataclass
class Compressed:
    """A compressed model, ready for advisor.export.write_checkpoint."""

    model: torch.nn.Module
    """The model after structural actions and transforms (weights still in full precision)."""
    plan: Plan
    """The plan as applied: the model's current module names, the dense budget's choices included."""
    quantized: dict[str, QuantizedWeight]
    """Each quantized linear's codes and scales."""
    report: CompressReport


def compress(model, plan: Plan, calibration: Calibration | None,
             step: Callable[[str, str], None] = lambda name, message: None,
             held_out: dict[str, list[list[int]]] | None = None, device: torch.device | None = None) -> Compressed:
    """Apply `plan` to `model` (in place; an action that changes shapes makes a new model: use the returned one).
    `calibration` holds the tokenised calibration windows (None when the recipe needs none: round-to-nearest with no
    smoothing, no dense budget, no structure). `step(name, message)` is called as each step starts (for progress and
    timing). `held_out`: text name → token windows that judge healing (perplexity before and after; never trained
    on). `device` (a GPU: advisor.device) computes the layer-by-layer quantization there."""
    recipe = plan.recipe
    needs = recipe.smoothing != "none" or recipe.method != "rtn" or recipe.dense_budget > 0 \
        or any(a.calibrates for a in plan.structural.values()) or bool(recipe.structure) or bool(recipe.heal)
    if needs and calibration is None:
        raise AdvisorError("this recipe calibrates (smoothing, a calibrated method or a dense budget) but was given "
                           "no calibration text", hint="give the recipe a `calibration` block")
    report = CompressReport(calibration_tokens=calibration.tokens if calibration and needs else 0)
    cache: dict = {}
    if recipe.structure:
        from advisor.plan import with_structure
        from advisor.structure_search import choose

        request = dict(recipe.structure)
        if request.get("speedup") and not request.get("latency"):
            raise AdvisorError("a structure `speedup` needs the latency model's terms (`latency`), which hubc "
                               "optimize adds from this hardware's measurements",
                               hint="run it through `hubc optimize --speedup X`")
        step("structure search", "measuring what each layer, head and channel contributes, and choosing what to "
                                 "remove (" + ", ".join(f"{k} {v}" for k, v in request.items()) + ")")
        # Widths and ranks become multiples of the quantization group where the scheme quantizes in groups.
        search = {**request, "group_size": request.get("group_size") or plan.recipe.group_size}
        plan = with_structure(plan, choose(model, plan.structure, search, calibration.windows, cache))
        report.structure_request = request
    teacher = None
    if recipe.heal and plan.structural:
        import copy

        teacher = copy.deepcopy(model)  # the base, unchanged, teaches the pruned model
    if plan.structural:
        kinds = Counter(a.kind for a in plan.structural.values())
        step("structure", "applying " + ", ".join(f"{k} to {n} unit{'s' if n > 1 else ''}" for k, n in kinds.items()))
        model, plan = apply_structure(model, plan, report, calibration.windows if calibration else None, cache)
    if teacher is not None:
        from advisor.heal import HealConfig, heal

        config = HealConfig.from_dict(recipe.heal)
        budget = " and ".join(x for x in (f"{config.minutes:g} min" if config.minutes else "",
                                          f"{config.steps} steps" if config.steps else "") if x)
        step("healing", f"healing by distillation from the base ({budget}, {len(calibration.heal)} windows)")
        report.heal = heal(model, teacher, calibration.heal, config, held_out or {},
                           progress=lambda message: step("healing", message)).to_dict()
        del teacher
    if recipe.smoothing != "none":
        step("smoothing", f"calibrating and searching per-channel scales ({smoothing_kind(plan)})")
        smooth_model(model, plan, calibration.windows, report)
    if recipe.dense_budget > 0:
        step("dense budget", f"measuring each layer's quantization cost (up to {recipe.dense_budget:.1%} of the "
                             f"weights kept {recipe.budget_kept})")
        plan = keep_sensitive_dense(model, plan, calibration.windows, report)
    targets = plan.quant_targets
    if not targets:
        return Compressed(model, plan, {}, report)
    step("quantization", f"quantizing with {recipe.scheme} ({recipe.method})")
    from advisor.quantize import quantize_with

    quantized, info = quantize_with(recipe.method, model, targets, calibration.windows if calibration else None,
                                    plan.recipe, device)
    report.block_error = info.get("block_error")
    report.iterations = info.get("iterations")
    check_codes(targets, quantized)
    return Compressed(model, plan, quantized, report)


def check_codes(targets: dict, quantized: dict[str, QuantizedWeight]) -> None:
    """Refuse int8 codes above a target's pair limit (the kernel would saturate on them and serve wrong outputs):
    they are never written."""
    for name, qw in quantized.items():
        t = targets[name]
        if t.pair_sum is not None and bool((pair_sums(qw.codes) > t.pair_sum).any()):
            raise AdvisorError(f"{name}: int8 codes exceed the target's pair limit {t.pair_sum}",
                               hint="report this as a hubc bug; --method rtn is not affected")


def apply_structure(model, plan: Plan, report: CompressReport, windows: list[list[int]] | None = None,
                    cache: dict | None = None):
    """Apply the plan's structural actions, kind by kind (in each kind's `order`), and re-derive the plan for the
    changed model (its linears renamed as the model now names them). Returns (model, plan): an action that changes
    shapes (widths, heads, factors) makes a new model, built from a config that describes them."""
    from advisor.actions.base import StructureContext
    from advisor.model import structure_of

    by_kind: dict[type, dict[str, object]] = {}
    for name, action in plan.structural.items():
        by_kind.setdefault(type(action), {})[name] = action
    ctx = StructureContext(windows=windows, structure=plan.structure, cache={} if cache is None else cache)
    renamed: dict[str, str] = {}  # new prefix → recipe's prefix
    for kind in sorted(by_kind, key=lambda k: k.order):
        units = by_kind[kind]
        moved = kind.apply(model, {_current(n, renamed): a for n, a in units.items()}, ctx)
        renamed = _compose(renamed, moved)
        if kind.kind == "remove-layer":
            report.removed_layers += sorted(units, key=lambda n: int(n.rsplit(".", 1)[1]))
    report.structure = ctx.notes
    if ctx.reshaped:
        from advisor.architecture import adopt

        model = adopt(model)
    structure = structure_of(model)
    plan = replace(plan, structure=structure, renamed=renamed)
    return model, replace(plan, linears=assign_linears(plan.recipe, structure, plan.recipe_name))


def _current(name: str, renamed: dict[str, str]) -> str:
    """A recipe's module name as the model names it after earlier structural actions."""
    for new, old in renamed.items():
        if old == name:
            return new
    return name


def _compose(renamed: dict[str, str], moved: dict[str, str | None]) -> dict[str, str]:
    """Chain new renames (old → new, None when gone) onto the map new → recipe's name."""
    out: dict[str, str] = {}
    current = {new: old for new, old in renamed.items()}
    for old_now, new in moved.items():
        if new is None:
            current.pop(old_now, None)
            continue
        out[new] = current.pop(old_now, old_now)
    for new, old in current.items():
        if new not in moved:
            out.setdefault(new, old)
    return out


def smoothing_kind(plan: Plan) -> str:
    """What smoothing does for `plan`'s schemes, in words (for progress)."""
    return "smoothing activation outliers" if any(s.input_activations for s in plan.schemes) \
        else "activation-aware scaling"


def smooth_model(model, plan: Plan, windows: list[list[int]], report: CompressReport) -> None:
    """Per-channel smoothing (SmoothQuant / AWQ-style scales) folded into the preceding ops, searched per group,
    one decoder layer at a time (LayerSmoothing, as streaming runs it); then the whole model's full-precision
    logits are checked against the unsmoothed ones."""
    from advisor.model import decoder_layers

    probe = torch.tensor([windows[0][: min(128, len(windows[0]))]])
    with torch.inference_mode():
        before = model(probe).logits.float()
    smoothing = LayerSmoothing(model, plan, windows)
    for i, layer in enumerate(decoder_layers(model)[1]):
        smoothing(i, layer)
    with torch.inference_mode():
        after = model(probe).logits.float()
    _check_drift(((after - before).abs().max() / before.abs().max().clamp_min(1e-6)).item(), "model's outputs")
    smoothing.fill(report)


def _check_drift(drift: float, what: str) -> None:
    if drift > EQUIVALENCE_TOL:
        raise AdvisorError(
            f"smoothing changed the full-precision {what} (relative drift {drift:.2e}); this architecture feeds a "
            "norm's output to more than linear layers",
            hint="run with --smoothing none",
        )


class LayerSmoothing:
    """Smoothing one decoder layer at a time, each layer searched on its inputs in the full-precision, unsmoothed
    model (as a whole-model calibration pass would see them: layer i's outputs are computed before its factors are
    folded, and carried to layer i+1), so the factors do not depend on what was quantized before. The in-memory
    path (smooth_model) and advisor.stream run it; call it on each layer as the layer is ready, in order the first
    time. A layer read again from the shards gets the factors found for it folded again (the same bytes)."""

    def __init__(self, model, plan: Plan, windows: list[list[int]]) -> None:
        from advisor.model import decoder_layers
        from advisor.quantize.sequential import layer_arguments

        self.plan = plan
        self.prefix, layers = decoder_layers(model)
        self.names = list(plan.linears)  # dense linears too: those reading a scaled activation must absorb the factors
        self.sample_rows = (plan.recipe.calibration or {}).get("sample_rows", CalibConfig.sample_rows)
        self.hidden, self.arguments = layer_arguments(model, layers, windows)
        self.layers = len(layers)
        self.choices: dict[int, list] = {}

    def __call__(self, i: int, layer) -> None:
        from advisor.quantize import smooth

        prefix = f"{self.prefix}.{i}."
        modules = dict(layer.named_modules(prefix=prefix.rstrip(".")))
        if i in self.choices:
            smooth.fold(modules, self.choices[i])
            return
        if i != len(self.choices):
            raise RuntimeError(f"smoothing reached decoder layer {i} before layer {len(self.choices)}")
        inputs = [((h,) + args, kwargs) for h, (args, kwargs) in zip(self.hidden, self.arguments[i], strict=True)]
        groups, outside = smooth.find_layer_groups(layer, prefix, self.names, *inputs[0])
        if outside:
            raise AdvisorError(f"smoothing works within decoder layers, and {outside[0]} reads its layer's input as "
                               "given (its producer lies before the layer)", hint="run with --smoothing none")
        stats, outputs = smooth.layer_statistics(layer, prefix, self.names, inputs, self.sample_rows, seed=i)
        self.choices[i] = smooth.search_and_apply(modules, groups, stats, self.plan.linears,
                                                  self.plan.recipe.int8_pair_sum)
        with torch.inference_mode():
            after = layer(*inputs[0][0], **inputs[0][1])
        after = after[0] if isinstance(after, tuple) else after
        # Relative to what the layer adds to its input: the residual stream's large channels would hide a change of
        # the layer's own contribution.
        added = (outputs[0] - self.hidden[0]).abs().max().clamp_min(1e-6)
        _check_drift(((after - outputs[0]).abs().max() / added).item(), f"outputs of decoder layer {i}")
        self.hidden = outputs
        if len(self.choices) == self.layers:
            self.hidden, self.arguments = [], []  # every layer is searched: its inputs are no longer needed

    def fill(self, report: CompressReport) -> None:
        """The report's smoothing fields, over every layer."""
        choices = [c for layer in self.choices.values() for c in layer]
        report.smoothing_groups = len(choices)
        report.smoothed = sum(c.alpha is not None for c in choices)
        report.alphas = dict(sorted(Counter("none" if c.alpha is None else f"{c.alpha:.2f}" for c in choices).items()))
        done = [c for c in choices if c.alpha is not None and c.error_before > 0]
        if done:
            report.error_reduction = sum(c.error_after / c.error_before for c in done) / len(done)


def keep_sensitive_dense(model, plan: Plan, windows: list[list[int]], report: CompressReport | None = None) -> Plan:
    """The plan with its most costly linears moved to `recipe.budget_scheme` (dense, or a scheme with more bits),
    within `recipe.dense_budget` (measured on the model as transformed, so after smoothing); the layers already
    dense or at the budget's scheme count against the budget."""
    from advisor.sensitivity import quantization_costs

    costs = quantization_costs(model, plan.linears, windows[:DENSE_BUDGET_WINDOWS], cost_pair_sum(plan.recipe))
    return with_dense_choice(plan, costs, report)


# The cost ranking settles within a few windows (the top layers agree with leave-one-out evaluation at 8).
DENSE_BUDGET_WINDOWS = 8


def cost_pair_sum(recipe) -> int | None:
    """The int8 pair limit a layer's quantization cost is measured under. GPTQ and learned rounding recover most of
    what an int8 pair limit costs round-to-nearest (weights), never what activation quantization costs: for them a
    layer is ranked by its cost with unconstrained codes. Ranked with the limit, the AVX2 demo kept a down_proj
    whose pair-limited rounding learned rounding then fixed anyway."""
    return recipe.int8_pair_sum if recipe.method == "rtn" else None


def with_dense_choice(plan: Plan, costs: dict, report: CompressReport | None = None) -> Plan:
    """The plan with the linears the dense budget keeps (from their measured costs, advisor.sensitivity.LayerCost)
    moved to the budget's scheme."""
    from advisor.sensitivity import choose_dense

    recipe = plan.recipe
    sizes = {li.name: li.in_features * li.out_features for li in plan.structure.linears}
    protected = None if recipe.budget_scheme == DENSE else recipe.budget_scheme
    chosen = plan.linears
    already = sum(sizes[n] for n, s in chosen.items() if (s.name if s else None) == protected)
    costs = {n: c for n, c in costs.items() if (chosen[n].name if chosen[n] else None) != protected}
    keep = choose_dense(costs, recipe.dense_budget, plan.structure.fused, already)
    if report is not None:
        report.quantization_cost = sum(c.cost for c in costs.values())
        report.kept_dense = {plan.recipe_name(n): costs[n].cost for n in keep}
    if not keep:
        return plan
    return plan.with_actions(dict.fromkeys(keep, recipe.budget_scheme))
