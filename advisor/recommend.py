"""The default recommender: the user's choices (each None for "hubc decides") → a recipe the target serves.

Every default here was chosen by measurement; each names the results file behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from advisor.errors import ShapeError
from advisor.model import ModelStructure
from advisor.plan import Plan, resolve
from advisor.quantize import METHODS
from advisor.recipe import Recipe
from advisor.schemes import Scheme, get_scheme, pair_limit


@dataclass
class Choices:
    """What a user may choose about a recipe (the `hubc optimize` flags); None leaves it to hubc's defaults."""

    scheme: str | None = None
    """Checkpoint scheme (w8a8-int8, w4a16, w8a16, fp8); default: the target's default."""
    group_size: int | None = None
    """Group size for group-wise schemes; default: the largest of 128/64/32 dividing every input dimension."""
    method: str | None = None
    """How weights are rounded: `rtn`, `gptq` or `autoround`; default: default_method."""
    iterations: int | None = None
    """Learning steps per decoder block for `autoround` (default 50)."""
    smoothing: str | None = None
    """Per-channel scaling: `search` or `none`; default: `search` for schemes that quantize activations."""
    dense_budget: float | None = None
    """Share of the linear weights kept dense, the most costly to quantize first; default: default_dense_budget."""
    budget_scheme: str | None = None
    """What the dense budget's linears get: `dense` or a scheme with more bits; default: default_dense_budget."""
    activations: str | None = None
    """int8 activations per token: `symmetric` (default) or `asymmetric`."""
    calibration: dict | None = None
    """Calibration text and amount {text, windows, seq_len}; default: 16 windows of 512 tokens of wikitext-2 valid
    (32 for autoround)."""
    calibration_text: str | tuple[str, ...] | None = None
    """The text calibration (and, after structure, healing) reads, in place of the default's wikitext-2 valid: a
    shipped text name or a UTF-8 file, or several taken in turn (--calibration-text, repeated); the amounts stay the
    default's."""
    actions: dict = field(default_factory=dict)
    """Per-unit actions (advisor.recipe.Recipe.actions), e.g. {"model.layers.0.mlp.down_proj": "dense"}."""
    remove_layers: tuple[int, ...] = ()
    """Decoder layers to remove, by index (`remove-layer` actions on them)."""
    structure: dict | None = None
    """What to remove, hubc choosing where (advisor.recipe.Recipe.structure), e.g. {"params": 0.2}."""
    heal_minutes: float | None = None
    """Distillation healing budget after structural changes; default DEFAULT_HEAL_MINUTES, 0 for none."""

    def given(self) -> list[str]:
        """The names of the choices the user made (not left to hubc)."""
        return [f.name for f in fields(self) if getattr(self, f.name) not in (None, {}, ())]


# Share of the linear weights a 4-bit recipe keeps at 8 bits by default, where the target serves w8a16. Demo model,
# W4A16 GPTQ, 16×512 tokens per text (benchmarks/results/default_method_a10g.md): +10.96% / +24.36% perplexity
# (wikitext-2 / licenses) with none, +8.97% / +19.00% at 10%, +4.26% / +12.17% at 20%, +2.76% / +8.14% at 30%.
LOW_BIT_BUDGET = 0.3

# Share of the linear weights an int8 GEMM under a pair limit keeps dense by default (see default_dense_budget).
PAIRED_INT8_BUDGET = 0.03


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
    return "gptq" if pair_limit(scheme, target.int8_pair_sum) is not None else "rtn"


def default_dense_budget(scheme: Scheme, target=None) -> tuple[float, str]:
    """2% of the weights stay dense where activations are quantized (W8A8, FP8): there the loss concentrates in a
    few layers and keeping them costs little memory; weight-only schemes quantize every linear. Measured on the
    demo model (W8A8 smoothed, 16×512 tokens of six texts: wikitext-2, licenses, Node.js docs, Python source, Rust
    release notes, Vim manual): KL to the base 0.0089-0.0169 with no layer dense, 0.0081-0.0134 at 1% (layer 0's
    down_proj), 0.0074-0.0133 at 2% (+6.3 MB, three layers), 0.0068-0.0119 at 4% (+12 MB); Δppl at 2% at most
    +0.72% on every text, against +1.23% at 1%.
    Under an int8 pair limit (CPUs without VNNI) the codes are coarser and 3%: the demo's W8A8 GPTQ default, AVX2
    emulated, KL 0.0073 / 0.0150 (wikitext-2 / licenses; Δppl +0.70% / +0.99%) at 2%, 0.0067 / 0.0138 (+0.74% /
    +0.79%) at 3% for 1 MB more (benchmarks/results/default_method_cpu.md, gptq-rows2048 against gptq-dense3).

    Returns (share, what the share gets: `dense` or a scheme id)."""
    if scheme.input_activations is not None:
        paired = target is not None and pair_limit(scheme, target.int8_pair_sum) is not None
        return (PAIRED_INT8_BUDGET if paired else 0.02), "dense"
    if scheme.weights.num_bits <= 4 and target is not None and target.supports("w8a16"):
        return LOW_BIT_BUDGET, "w8a16"
    return 0.0, "dense"


# Healing budget when the plan changes structure and the user named none: the bar (at most 15 minutes on a
# 2-core CPU). Demo model, 3 layers removed: perplexity 299.7 → 40.0 (wikitext-2 test, base 25.5) after 20 steps of
# 4×256 tokens (2.5 min, bf16); see benchmarks/results/structure_table.md for the measured budgets.
DEFAULT_HEAL_MINUTES = 15.0

# Calibration for structure: the calibration text plus as many windows the base model samples itself. Structure
# chosen on one domain overfits it (benchmarks/results/structure_calibration.md).
STRUCTURE_CALIBRATION = {"text": "wikitext2-valid", "windows": 16, "seq_len": 512, "self_generated": 16}


def recommend(structure: ModelStructure, target, choices: Choices | None = None) -> Plan:
    """Turn the user's choices into a plan the target serves, or fail in seconds with the fix."""
    choices = choices or Choices()
    scheme = get_scheme(choices.scheme or target.default_scheme)
    method = choices.method or default_method(scheme, target)
    if method not in METHODS:
        raise ShapeError(f"unknown method '{method}'", hint=f"use one of {', '.join(METHODS)}")
    default_share, default_raised = default_dense_budget(scheme, target)
    dense_budget = default_share if choices.dense_budget is None else choices.dense_budget
    budget_scheme = choices.budget_scheme or (default_raised if dense_budget > 0 else "dense")
    smoothing = choices.smoothing
    if smoothing is None:
        # Per-token activation quantization is where W8A8/FP8 lose quality (outlier channels): smooth by default.
        smoothing = "search" if scheme.input_activations is not None else "none"
    actions = dict(choices.actions)
    for index in choices.remove_layers:
        if not 0 <= index < len(structure.layers):
            raise ShapeError(f"--remove-layer {index}: {structure.architecture} has layers 0 to {len(structure.layers) - 1}",
                             hint=f"give a layer index below {len(structure.layers)}")
        actions[structure.layers[index].name] = "remove-layer"
    from advisor.actions import parse_action

    structural = bool(choices.structure) or any(parse_action(a).structural for a in actions.values())
    heal_minutes = choices.heal_minutes if choices.heal_minutes is not None else DEFAULT_HEAL_MINUTES
    if choices.heal_minutes and not structural:
        raise ShapeError("--heal-minutes heals a model after pruning, factorization or layer removal; this plan has "
                         "none", hint="add --prune or --factorize, or drop --heal-minutes")
    heal = {"minutes": heal_minutes} if structural and heal_minutes > 0 else None
    calibrates = smoothing != "none" or method != "rtn" or dense_budget > 0 or structural
    default_calibration = dict(STRUCTURE_CALIBRATION) if structural else {
        "text": "wikitext2-valid", "windows": 32 if method == "autoround" else 16, "seq_len": 512}
    calibration = choices.calibration or default_calibration
    if choices.calibration_text:
        from advisor.calibrate import text_names

        texts = text_names(choices.calibration_text)
        calibration = {**calibration, "text": texts[0] if len(texts) == 1 else texts}
    recipe = Recipe(
        scheme=scheme.name,
        smoothing=smoothing,
        calibration=calibration if calibrates else None,
        structure=dict(choices.structure) if choices.structure else None,
        heal=heal,
        dense_budget=dense_budget,
        budget_scheme=budget_scheme,
        activations=choices.activations or "symmetric",
        target=target.name,
        method=method,
        iterations=choices.iterations,
        group_size=choices.group_size,
        actions=actions,
        ignore=list(structure.skipped),
    )
    return resolve(recipe, structure, target)
