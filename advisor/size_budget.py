"""A size budget (`hubc optimize --max-size`): the recipe that fits it with the least expected loss.

The checkpoint's size is computed, not guessed: every tensor hubc writes, from the model's structure and the plan
(advisor.export writes the same tensors: codes, scales in the dtype vLLM computes with, packed shapes; unquantized
tensors in the target's checkpoint dtype). What is not known before the run — which linears the dense budget keeps,
how pruned widths round — is bounded: the estimate counts the dense budget at its share of the weights and the
search removes at least the share asked.

Levers, cheapest in quality per byte first (measured on the demo model):
1. fewer bits: W8A8-int8 halves the decoder linears for +0.2-0.7% perplexity, W4A16 GPTQ quarters them for +11% /
   +24% (wikitext-2 / licenses; benchmarks/results/default_method_a10g.md, README);
2. a smaller dense budget (the budget buys a few points of perplexity per 10% of the weights kept at more bits);
3. structured pruning, chosen by advisor.structure_search: removing 20% of the decoder-linear weights costs +36% /
   +136% before healing, +4% / +88% after 30 steps of it (benchmarks/results/heal_settings.md).
So the scheme is the one with the most bits that fits, then the dense budget shrinks, and only what is still over
the budget is pruned. A budget that needs more than MAX_PRUNE of the weights pruned is refused with the sizes each
scheme reaches.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from advisor.checkpoint_features import DTYPE_BYTES
from advisor.errors import ShapeError

MAX_PRUNE = 0.5
"""The largest share of decoder-linear weights a size budget prunes: at 40% the demo model is +1903% / +1558%
before healing and still +97% / +432% after it (benchmarks/results/structure_table.md)."""

def parse_size(text: str) -> int:
    """`120MB`, `1.5GB`, `800MiB`, `500000000` → bytes. ValueError with what to write otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read size {text!r}: write e.g. 120MB, 1.5GB or 800MiB")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper().rstrip("B") or "B"
    powers = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    size = number * powers[unit]
    if size < 1:
        raise ValueError(f"size {text!r} is not a positive size: write e.g. 120MB")
    return int(size)


def linear_bytes(in_features: int, out_features: int, scheme, dtype_bytes: int, bias: bool = False) -> int:
    """Bytes one linear takes in a checkpoint at `scheme` (None: unquantized, in the checkpoint dtype), as
    advisor.export writes it."""
    n = in_features * out_features
    extra = out_features * dtype_bytes if bias else 0
    if scheme is None:
        return n * dtype_bytes + extra
    w = scheme.weights
    # Scales: float32 for the int8/FP8 GEMMs' per-channel scales, the model's dtype for weight-only kernels.
    scale_bytes = 4 if scheme.input_activations is not None else dtype_bytes
    groups = math.ceil(in_features / w.group_size) if w.strategy == "group" and w.group_size else 1
    scales = out_features * groups
    zero = 0 if w.symmetric else scales * (1 if scheme.ct_format != "pack-quantized" else w.num_bits / 8)
    codes = n * w.num_bits / 8
    shape = 16 if scheme.ct_format == "pack-quantized" else 0  # weight_shape: two int64
    return math.ceil(codes + scales * scale_bytes + zero + shape) + extra


@dataclass(frozen=True)
class SizeEstimate:
    """A recipe's checkpoint size, in parts."""

    fixed: int
    """Everything that is not a decoder linear (embeddings, norms, the output head when untied), unquantized."""
    linears: int
    """The decoder linears at the recipe's scheme, the dense budget's share at its own."""
    decoder_params: int
    """Weights of the decoder linears (what a pruning share is a share of)."""
    per_weight: float
    """Bytes per decoder-linear weight at this recipe (what pruning one weight saves)."""

    @property
    def total(self) -> int:
        return self.fixed + self.linears


def estimate(structure, scheme, dtype: str, dense_budget: float = 0.0, budget_scheme=None) -> SizeEstimate:
    """The checkpoint size of `structure` at `scheme` (None: dense) with `dense_budget` of the linear weights at
    `budget_scheme` (None: dense)."""
    d = DTYPE_BYTES[dtype]
    params = sum(li.in_features * li.out_features for li in structure.linears)
    at_scheme = sum(linear_bytes(li.in_features, li.out_features, scheme, d, li.bias) for li in structure.linears)
    at_budget = sum(linear_bytes(li.in_features, li.out_features, budget_scheme, d, li.bias)
                    for li in structure.linears)
    linears = int((1 - dense_budget) * at_scheme + dense_budget * at_budget)
    linear_params = params + sum(li.out_features for li in structure.linears if li.bias)
    fixed = (structure.num_parameters - linear_params) * d
    return SizeEstimate(fixed=fixed, linears=linears, decoder_params=params, per_weight=linears / max(1, params))


@dataclass(frozen=True)
class BudgetChoice:
    """What a size budget chose."""

    scheme: str
    dense_budget: float
    budget_scheme: str
    """What the dense budget's linears get: `dense` or a scheme with more bits."""
    prune: float
    """Share of the decoder-linear weights to prune (0: none)."""
    estimate: int
    """Estimated checkpoint bytes of the choice."""
    reason: str


def fit(structure, target, max_bytes: int, scheme: str | None = None, dense_budget: float | None = None,
        budget_scheme: str | None = None) -> BudgetChoice:
    """The recipe that fits `max_bytes`; each argument the user gave is kept, the others chosen (module docstring).
    ShapeError, with the sizes reachable, when nothing within MAX_PRUNE fits."""
    from advisor.recommend import LOW_BIT_BUDGET, default_dense_budget
    from advisor.schemes import get_scheme
    from advisor.validate import choose_group_size

    dtype = target.checkpoint_dtype
    group = choose_group_size(structure)

    def resolved(name):
        if name in (None, "dense"):
            return None
        s = get_scheme(name)
        return s.with_group_size(group) if s.grouped else s

    @dataclass(frozen=True)
    class Option:
        need: float
        """Share of the decoder-linear weights to prune to fit."""
        rank: tuple
        name: str
        budget: float
        raised: str
        default_share: float
        est: SizeEstimate

    options = []
    for name in [scheme] if scheme else [s for s in target.schemes if s != "dense"]:
        s = resolved(name)
        share, raised = (dense_budget, budget_scheme) if dense_budget is not None else default_dense_budget(s, target)
        budgets = {share}
        if dense_budget is None:
            budgets |= {share / 2, 0.0}
            if s is not None and s.weights.num_bits <= 4:
                # Room left under the budget buys quality where it is cheapest: the layers 4 bits costs the most,
                # at 8 bits where the target serves them (README: +10.96% → +2.76% on wikitext-2 at 30%).
                budgets |= {0.1, 0.2, LOW_BIT_BUDGET}
                raised = raised if share else ("w8a16" if target.supports("w8a16") else "dense")
        raised = raised or "dense"
        bits = s.weights.num_bits if s else 16
        for b in budgets:
            est = estimate(structure, s, dtype, b, resolved(raised) if b else None)
            need = max(0.0, (est.total - max_bytes) / (est.per_weight * est.decoder_params))
            # Least pruning first (the costliest lever per byte), then the most bits (weight-only before quantized
            # activations), then the largest dense budget; the target's default scheme first among equals.
            rank = (round(need, 6), -bits, s is not None and s.input_activations is not None, -b,
                    name != target.default_scheme)
            options.append(Option(need, rank, name, b, raised, share, est))
    options.sort(key=lambda o: o.rank)
    best = options[0]
    if best.need > MAX_PRUNE:
        reach = {}
        for o in options:
            e = o.est
            reach[o.name] = min(reach.get(o.name, e.total), int(e.total - MAX_PRUNE * e.per_weight * e.decoder_params))
        smallest = min(reach.values())
        fixed = min(o.est.fixed for o in options)
        hint = (f"the embeddings, norms and head alone take {human(fixed)} unquantized: " if max_bytes <= fixed
                else "") + f"give at least {human(smallest)}"
        raise ShapeError(f"no recipe fits {human(max_bytes)}: with {MAX_PRUNE:.0%} of the decoder-linear weights "
                         "pruned, the smallest are " + ", ".join(f"{n} {human(v)}" for n, v in sorted(reach.items(),
                                                                                          key=lambda kv: kv[1])),
                         hint=hint + (f", or another --scheme than {scheme}" if scheme else ""))
    need, name, b, est = best.need, best.name, best.budget, best.est
    if need > 0:
        need = math.ceil(need * 1000) / 1000  # the search removes at least this share
        why = (f"{name} with {need:.1%} of the decoder-linear weights pruned fits {human(max_bytes)} "
               f"({human(est.total)} unpruned)")
    else:
        why = f"{name} fits {human(max_bytes)} ({human(est.total)})"
    if b != best.default_share:
        why += f"; dense budget {b:.0%}" + (f" at {best.raised}" if b and best.raised != "dense" else "") + \
            f" instead of {best.default_share:.0%}"
    return BudgetChoice(name, b, best.raised, need, int(est.total - need * est.per_weight * est.decoder_params), why)


def fit_choices(structure, target, max_bytes: int, choices) -> tuple[object, dict]:
    """The user's choices (advisor.recommend.Choices) completed to fit `max_bytes` (`fit`): the scheme, dense budget and
    pruning share the user left open. A structural choice of the user's does not combine with a size budget."""
    from dataclasses import replace

    from advisor.actions import parse_action

    if choices.structure or choices.remove_layers or any(parse_action(a).structural for a in choices.actions.values()):
        raise ShapeError("--max-size chooses how much to prune; it does not combine with --prune, --factorize or "
                         "--remove-layer", hint="drop --max-size, or drop the structural options")
    choice = fit(structure, target, max_bytes, scheme=choices.scheme, dense_budget=choices.dense_budget,
                 budget_scheme=choices.budget_scheme)
    chosen = replace(choices, scheme=choice.scheme, dense_budget=choice.dense_budget,
                     budget_scheme=choice.budget_scheme if choice.dense_budget else None,
                     structure={"params": choice.prune} if choice.prune > 0 else None,
                     heal_minutes=choices.heal_minutes if choice.prune > 0 else None)
    return chosen, {"max_bytes": max_bytes, "estimate": choice.estimate, "choice": choice.reason,
                    "scheme": choice.scheme, "dense_budget": choice.dense_budget, "prune": choice.prune}


def human(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
