"""A recipe says what was done to a model, in a versioned YAML that round-trips and rejects unknown keys.

Recipes may come from the Hub, so they name schemes and methods by registry id only, never by import path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml

from advisor.errors import AdvisorError

RECIPE_VERSION = 2
SMOOTHING = ("none", "search")
ACTIVATIONS = ("symmetric", "asymmetric")


@dataclass
class Recipe:
    """How every linear layer is quantized: one scheme, with per-module overrides (mixed precision)."""

    scheme: str
    """Scheme id from advisor.schemes (e.g. w8a8-int8, w4a16)."""
    target: str
    """Target name from the catalog the recipe was made for."""
    method: str = "rtn"
    """How weights are rounded: `rtn` (round-to-nearest) or `gptq` (Hessian-based error compensation, layer by
    layer on calibration text, with activation order, dampening and clipping search) or `autoround` (rounding
    offsets and clipping learned per decoder block by signed gradient descent against the full-precision block)."""
    iterations: int | None = None
    """Learning steps per decoder block for `autoround`."""
    seed: int | None = None
    """Minibatch order of `autoround` (default 0): the learned rounding depends on it, so a run is repeated with the
    same seed and a method's spread is measured over several."""
    group_size: int | None = None
    """Weights per scale for group-wise schemes; chosen per model so it divides every input dimension."""
    smoothing: str = "none"
    """Per-channel scaling before quantization, folded into the preceding op: `none`, or `search` (the strength
    searched per layer group on calibration text: SmoothQuant for schemes that quantize activations, AWQ-style
    activation-aware scaling for weight-only schemes)."""
    activations: str = "symmetric"
    """How int8 activations are quantized per token: `symmetric` ([-absmax, absmax]) or `asymmetric` (each token's
    [min, max] with a zero point, which vLLM's int8 kernels take on CPU and CUDA). Demo model, W8A8 smoothed, 2%
    dense, 16×512 tokens per text: asymmetric KL to the base 0.0064 / 0.0111 against symmetric's 0.0075 / 0.0133
    (wikitext-2 / licenses), perplexity +0.58% / +1.26% against +0.19% / +0.76%
    (benchmarks/results/dense_budget{,_asymmetric}.md)."""
    dense_budget: float = 0.0
    """Share of the linear weights (by parameter count) that may stay dense: the linears whose quantization costs
    the most loss per parameter, measured on calibration text (advisor.sensitivity), are added to `overrides` as
    `dense` until the share is reached. 0: every linear gets its scheme."""
    budget_scheme: str = "dense"
    """What the linears chosen by `dense_budget` get: `dense` (left unquantized), or a scheme id with more bits than
    `scheme` (e.g. `w8a16` under a `w4a16` recipe: a quarter of dense's extra bytes, nearly all of its quality)."""
    calibration: dict | None = None
    """Calibration text and amount, when a step needs it: {text, windows, seq_len}."""
    int8_pair_sum: int | None = None
    """Largest |q[2j]| + |q[2j+1]| of the int8 codes of W8A8 layers along the input dimension, set from the
    target (128 on CPUs whose int8 GEMM adds adjacent products in int16: AVX2, AVX-512 without VNNI)."""
    actions: dict[str, object] = field(default_factory=dict)
    """Per-unit actions (advisor.actions): module name (or `re:` regex) → an action. On linears: a scheme id (mixed
    precision) or `dense`; every other linear gets `scheme`, and linears vLLM fuses (q/k/v, gate/up) must share one.
    On decoder layers (`model.layers.7`): `remove-layer`. Version-1 recipes called this `overrides`."""
    structure: dict | None = None
    """A model-level structural request that compress turns into explicit per-unit `actions` on calibration text
    (advisor.structure_search): `params` (share of decoder-linear parameters to remove, hubc choosing where and
    what), `mlp`, `heads` (ratios), `layers` (how many to remove), `factorize` (share removed by low-rank
    factorization), `allocation` (global or uniform), `importance` (activation or magnitude). The recipe written with
    a checkpoint holds the resolved actions instead. `speedup` (a decode step this many times faster than the base's,
    as the latency model predicts it; `hubc optimize` adds the model's terms as `latency`) asks for time instead of
    weights."""
    heal: dict | None = None
    """Distillation healing after structural actions (advisor.heal.HealConfig): {minutes, steps, temperature,
    kl_weight, lr, batch, seq_len, windows, self_generated, seed}."""
    ignore: list[str] = field(default_factory=list)
    """Linear modules left dense whatever the actions say (the output head)."""
    targets: list[str] = field(default_factory=lambda: ["Linear"])
    version: int = RECIPE_VERSION

    @property
    def budget_kept(self) -> str:
        """How the dense budget keeps the linears it chooses, in words: `dense` or `at <scheme>`."""
        return "dense" if self.budget_scheme == "dense" else f"at {self.budget_scheme}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise AdvisorError("a recipe must be a YAML mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"overrides"})
        if unknown:
            raise AdvisorError(f"unknown recipe keys: {', '.join(unknown)}", hint=f"known keys: {', '.join(sorted(known))}")
        version = data.get("version", RECIPE_VERSION)
        if not isinstance(version, int) or version > RECIPE_VERSION:
            raise AdvisorError(f"recipe version {version!r} is newer than this hubc understands ({RECIPE_VERSION})",
                               hint="upgrade hubc")
        if "overrides" in data:
            # Version 1: per-module schemes or `dense` under `overrides`, which version 2 calls `actions`.
            if data.get("version", 1) >= 2 or "actions" in data:
                raise AdvisorError("recipe key `overrides` is version 1's name for `actions`",
                                   hint="write per-module actions under `actions`")
            data = {**{k: v for k, v in data.items() if k != "overrides"}, "actions": data["overrides"] or {}}
        data["version"] = RECIPE_VERSION
        missing = [k for k in ("scheme", "target") if k not in data]
        if missing:
            raise AdvisorError(f"the recipe has no {' and no '.join(f'`{k}`' for k in missing)}",
                               hint="a recipe names at least its scheme and its target")
        recipe = cls(**data)
        recipe.check_fields()
        return recipe

    def check_fields(self) -> None:
        """Every field has a known value of the right type (what needs the model or the target is checked by
        advisor.plan.resolve). Raises AdvisorError naming the field and its allowed values."""
        from advisor.quantize import METHODS

        for key in ("scheme", "target"):
            if not isinstance(getattr(self, key), str):
                raise AdvisorError(f"recipe `{key}` must be a name, not {getattr(self, key)!r}")
        if self.smoothing not in SMOOTHING:
            raise AdvisorError(f"unknown smoothing '{self.smoothing}'", hint=f"known: {', '.join(SMOOTHING)}")
        if not isinstance(self.actions, dict) or not all(isinstance(k, str) for k in self.actions):
            raise AdvisorError("recipe `actions` must map module names (or `re:` regexes) to actions")
        from advisor.actions import parse_action
        from advisor.errors import HintedError

        for key, value in self.actions.items():
            try:
                parse_action(value)
            except HintedError as exc:
                raise AdvisorError(f"recipe action for '{key}': {exc.message}", hint=exc.hint) from None
        if self.method not in METHODS:
            raise AdvisorError(f"unknown method '{self.method}'", hint=f"known methods: {', '.join(METHODS)}")
        if self.activations not in ACTIVATIONS:
            raise AdvisorError(f"unknown activations '{self.activations}'", hint=f"known: {', '.join(ACTIVATIONS)}")
        if isinstance(self.dense_budget, bool) or not isinstance(self.dense_budget, (int, float)) \
                or not 0 <= self.dense_budget < 1:
            raise AdvisorError(f"recipe `dense_budget` must be a share between 0 and 1, not {self.dense_budget!r}")
        if not isinstance(self.budget_scheme, str):
            raise AdvisorError(f"recipe `budget_scheme` must be `dense` or a scheme id, not {self.budget_scheme!r}")
        for key in ("iterations", "seed", "group_size", "int8_pair_sum"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise AdvisorError(f"recipe `{key}` must be a whole number, not {value!r}")
        if self.calibration is not None:
            from advisor.calibrate import CalibConfig

            CalibConfig.from_dict(self.calibration)
        if self.structure is not None:
            check_structure(self.structure)
        if self.heal is not None:
            from advisor.heal import HealConfig

            HealConfig.from_dict(self.heal)
        if not isinstance(self.ignore, list) or not all(isinstance(m, str) for m in self.ignore):
            raise AdvisorError("recipe `ignore` must be a list of module names")


STRUCTURE_KEYS = {"params": "share", "mlp": "share", "heads": "share", "layers": "count", "factorize": "share",
                  "allocation": ("global", "uniform"), "importance": ("activation", "magnitude"),
                  "speedup": "speedup", "latency": "latency"}
LATENCY_KEYS = ("save_ms", "ms_per_param", "ms_per_layer")


def check_structure(spec) -> None:
    """A recipe's `structure` block, key by key (before any model is loaded)."""
    if not isinstance(spec, dict) or not spec:
        raise AdvisorError(f"recipe `structure` must be a mapping like {{params: 0.2}}, not {spec!r}")
    for key, value in spec.items():
        kind = STRUCTURE_KEYS.get(key)
        if kind is None:
            raise AdvisorError(f"unknown structure key '{key}'", hint=f"known: {', '.join(STRUCTURE_KEYS)}")
        if kind == "share" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1):
            raise AdvisorError(f"structure `{key}` must be a share from 0 to below 1 (e.g. 0.2), not {value!r}")
        if kind == "count" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise AdvisorError(f"structure `{key}` must be a whole number of layers, not {value!r}")
        if isinstance(kind, tuple) and value not in kind:
            raise AdvisorError(f"structure `{key}` must be one of {', '.join(kind)}, not {value!r}")
        if kind == "speedup" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1):
            raise AdvisorError(f"structure `speedup` must be a number above 1 (e.g. 1.3), not {value!r}")
        if kind == "latency" and (not isinstance(value, dict) or set(value) != set(LATENCY_KEYS) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in value.values())):
            raise AdvisorError(f"structure `latency` must map {', '.join(LATENCY_KEYS)} to numbers ≥ 0, not "
                               f"{value!r}", hint="leave it out: hubc optimize fills it in from `speedup`")
    if "params" in spec and any(k in spec for k in ("mlp", "heads", "layers")):
        raise AdvisorError("structure `params` lets hubc choose where to prune; it does not combine with mlp, heads "
                           "or layers", hint="give either params, or mlp/heads/layers")
    if "speedup" in spec and any(k in spec for k in ("params", "mlp", "heads", "layers")):
        raise AdvisorError("structure `speedup` lets hubc choose what to remove for a decode-time goal; it does not "
                           "combine with params, mlp, heads or layers", hint="give either a speed-up or a share")
