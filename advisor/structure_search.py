"""From a model-level structure request to explicit per-unit actions: `choose(model, structure, spec, windows,
cache)` measures what each decoder layer, head, MLP channel and linear contributes on calibration text and writes
the recipe actions that remove what costs least (`{prune: {...}}` per layer, `remove-layer`, `{factorize: rank}` per
linear), so the written recipe reproduces the result without the search.

Costs are made comparable across layers and kinds as estimated loss increases (nats per token). A layer's
sensitivity is the loss increase when it is skipped divided by the energy it adds to the hidden state (both
measured); removing channels or heads is charged the energy they add to the residual stream times their layer's
sensitivity (with `importance: taylor`, the Fisher estimate of the loss itself); a whole layer is charged its skip
loss; a factorization step its share of the linear's output energy lost (whitened truncation error) times its
layer's skip loss. Removals are then taken greedily by cost per parameter removed, in order within each layer,
until the request is met.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from advisor.actions.factorize import RANK_MULTIPLE, largest_saving_rank, spectrum
from advisor.actions.prune import (
    WIDTH_MULTIPLE,
    choose_heads,
    head_choices,
    head_scorer,
    kept_width,
    mlp_scores,
    statistics_needed,
)
from advisor.errors import ShapeError

DEFAULT_MIX = ("mlp", "heads")
"""What `params` removes by default, ranked together (chosen by benchmarks/structure_importance.py)."""
LATENCY_MIX = ("mlp", "heads", "layers")
"""What a latency request removes by default: whole layers too, since a decode step pays per layer as well as per
byte (advisor.latency; on CPUs at batch 1 the per-layer term dominates)."""
SAVED_MS = "latency saved ms"
"""Cache key: the decode-step milliseconds the chosen removals are predicted to save."""
MAX_LAYER_SHARE = 0.5
"""Global allocation takes at most this share of one layer's MLP channels or heads: the cost estimates are local and
stop holding when most of a layer is gone."""


@dataclass(order=True)
class Step:
    """One removal: `params` weights for an estimated `cost`; steps of one `chain` are taken in order."""

    rate: float
    cost: float
    params: int
    chain: tuple
    index: int
    layer: str
    kind: str
    """`mlp` (channels), `heads`, `layer` or `factorize`."""
    amount: float
    """After this step: share removed (mlp, heads), or rank (factorize)."""
    units: int = 0
    """Channels or query heads this step removes."""
    saving: float = 0.0
    """With a latency request: the predicted milliseconds per decode step this removal saves (`rate` is then cost
    per millisecond); else equal to `params`."""


def choose(model, structure, spec: dict, windows, cache: dict) -> dict[str, object]:
    """Per-unit recipe actions realizing `spec` on `model` (unchanged): keys `params`, `mlp`, `heads` (shares),
    `layers` (count), `factorize` (share), `allocation` (`global` | `uniform`), `importance` (activation | taylor |
    wanda | magnitude), `group_size` (factor ranks become multiples of it), `mix` (what `params` may remove:
    mlp, heads, layers), `latency` (a decode-step time to save instead of a share of weights: {save_ms,
    ms_per_param, ms_per_layer}, from advisor.latency.speedup_plan; removals are then ranked by estimated loss per
    millisecond saved, whole layers included). Statistics measured go to `cache`, shared with the actions that apply
    the choice."""
    importance = spec.get("importance", "activation")
    allocation = spec.get("allocation", "global")
    if allocation not in ("global", "uniform"):
        raise ShapeError(f"unknown allocation {allocation!r}", hint="use global or uniform")
    layers = {li.name: li for li in structure.layers}
    sizes = {li.name: li.in_features * li.out_features for li in structure.linears}
    total = sum(layer_params(layers[n], sizes) for n in layers)
    latency = spec.get("latency")
    mix = tuple(spec.get("mix", DEFAULT_MIX)) if spec.get("params") else ()
    if latency:
        mix = tuple(spec.get("mix", LATENCY_MIX))
    measure_all(model, structure, spec, importance, windows, cache, mix)
    sensitivity = layer_sensitivity(cache) if windows else {}
    actions: dict[str, object] = {}
    dropped: list[str] = []
    if spec.get("layers"):
        dropped = cheapest_layers(cache, spec["layers"])
    live = [n for n in layers if n not in dropped]
    ratios: dict[str, dict] = {}
    multiple = math.lcm(WIDTH_MULTIPLE, spec.get("group_size") or 1)  # MLP channels go in whole groups of this
    if spec.get("params"):
        steps = mix_steps(model, layers, live, mix, importance, cache, sensitivity, sizes, multiple)
        ratios, dropped = take_cheapest(steps, spec["params"] * total)
    elif latency:
        steps = priced(mix_steps(model, layers, live, mix, importance, cache, sensitivity, sizes, multiple),
                       latency["ms_per_param"], latency.get("ms_per_layer", 0.0))
        ratios, dropped = take_cheapest(steps, latency["save_ms"], by="saving")
        cache[SAVED_MS] = saved_ms(steps, ratios, dropped)
    for kind in ("mlp", "heads"):
        share = spec.get(kind)
        if not share:
            continue
        if allocation == "uniform":
            for n in live:
                width = layers[n].mlp_width if kind == "mlp" else None
                if width and width % multiple == 0:
                    # The share rounded to whole groups of channels (kept_width then keeps exactly that).
                    ratios.setdefault(n, {})[kind] = 1 - kept_width(width, share, multiple) / width
                else:
                    ratios.setdefault(n, {})[kind] = share
            continue
        steps = prune_steps(model, layers, live, kind, importance, cache, sensitivity, sizes, multiple)
        count = sum(unit_count(layers[n], kind) for n in live)
        chosen, _ = take_cheapest(steps, share * count, by="units")
        for n, r in chosen.items():
            ratios.setdefault(n, {}).update(r)
    for name in dropped:
        actions[name] = "remove-layer"
    for name, r in ratios.items():
        r = {k: round(v, 6) for k, v in r.items() if v > 0}
        if r and name not in dropped:
            extra = {**({"importance": importance} if importance != "activation" else {}),
                     **({"refit": False} if not spec.get("refit", True) else {})}
            actions[name] = {"prune": {**r, **extra}}
    if spec.get("factorize"):
        # Factorization takes the linears pruning leaves as they are (their ranks are chosen on these shapes).
        free = [li for li in structure.linears if layer_of(li.name, layers) in live and layer_of(li.name, layers)
                not in actions]
        multiple = math.lcm(RANK_MULTIPLE, spec.get("group_size") or 1)
        whitening = spec.get("whitening", True)
        if allocation == "uniform":
            ranks = uniform_ranks(free, spec["factorize"], multiple)
        else:
            ranks = choose_ranks(model, free, spec["factorize"] * total, cache, multiple,
                                 whitening, layers)
        actions.update({n: {"factorize": r if whitening else {"rank": r, "whitening": False}}
                        for n, r in ranks.items()})
    return actions


def layer_of(linear: str, layers: dict) -> str | None:
    return next((n for n in layers if linear.startswith(n + ".")), None)


def layer_params(layer, sizes: dict[str, int]) -> int:
    return sum(sizes.get(n, 0) for n in layer.linears)


def unit_count(layer, kind: str) -> int:
    return layer.mlp_width if kind == "mlp" else layer.attention_heads


def measure_all(model, structure, spec, importance, windows, cache, mix) -> None:
    """One pass over the calibration windows for everything the request reads, then the skip losses."""
    from advisor.importance import (
        INPUTS,
        LAYERS,
        SKIP_WINDOWS,
        input_statistics,
        measure,
        require_windows,
        skip_losses,
        spread,
    )

    needs: dict[str, set] = {"sumsq": set(), "covariance": set(), "taylor": set(), "relative": set()}
    kinds = {k for k in ("mlp", "heads") if spec.get(k)} | {k for k in mix if k != "layers"}
    heads = {}
    for layer in structure.layers:
        for key, names in statistics_needed(layer.name, importance, "mlp" in kinds, "heads" in kinds,
                                            spec.get("refit", True)).items():
            needs[key].update(names)
        heads[f"{layer.name}.self_attn.o_proj"] = layer.head_dim
    if spec.get("factorize") and spec.get("whitening", True):
        needs["covariance"].update(li.name for li in structure.linears if layer_of(li.name, {
            la.name: la for la in structure.layers}))
    if not windows:
        if importance != "magnitude" or spec.get("layers") or spec.get("params") or spec.get("factorize"):
            require_windows(windows)
        return
    if LAYERS not in cache:
        store = cache.get(INPUTS, {})
        measure(model, windows, cache, sumsq=sorted(set().union(*needs.values()) - set(store)),
                covariance=sorted(needs["covariance"] - {n for n, s in store.items() if s.covariance is not None}),
                taylor=sorted(needs["taylor"] - {n for n, s in store.items() if s.taylor is not None}),
                relative=sorted(needs["relative"] - {n for n, s in store.items() if s.relative_covariance is not None}),
                heads=heads, layers=True)
        skip_losses(model, spread(windows, SKIP_WINDOWS), cache)
    input_statistics(model, windows, cache, **{k: sorted(v) for k, v in needs.items()}, heads=heads)


def layer_sensitivity(cache: dict) -> dict[str, float]:
    """Loss increase per unit of energy added to the hidden state (per token), per layer: skip loss / the layer's
    mean squared change. Layers whose skip costs nothing measurable get 1% of the median."""
    from advisor.importance import LAYERS

    values = {n: max(li.skip_loss or 0.0, 0.0) / max(li.change, 1e-12) for n, li in cache[LAYERS].items()}
    positive = sorted(v for v in values.values() if v > 0)
    floor = positive[len(positive) // 2] * 1e-2 if positive else 1.0
    return {n: max(v, floor) for n, v in values.items()}


def cheapest_layers(cache: dict, count: int) -> list[str]:
    """The `count` layers whose skip costs least (block influence breaks ties)."""
    from advisor.importance import LAYERS

    importance = cache[LAYERS]
    if count >= len(importance):
        raise ShapeError(f"cannot remove {count} of {len(importance)} decoder layers", hint="keep at least one")
    return sorted(sorted(importance, key=lambda n: (importance[n].skip_loss, importance[n].block_influence))[:count],
                  key=lambda n: int(n.rsplit(".", 1)[1]))


def prune_steps(model, layers: dict, live: list[str], kind: str, importance: str, cache: dict,
                sensitivity: dict[str, float], sizes: dict[str, int], multiple: int = WIDTH_MULTIPLE) -> list[Step]:
    """Every layer's removal steps of `kind`: blocks of `multiple` MLP channels (32, or the quantization group where
    the width divides by it), or the head counts its KV groups allow."""
    from advisor.importance import INPUTS

    stats = cache.get(INPUTS, {})
    steps = []
    for name in live:
        info, layer = layers[name], model.get_submodule(name)
        hidden = layer.self_attn.q_proj.in_features
        relative = importance in ("wanda", "magnitude")  # unitless scores: compared as shares of their layer's
        if kind == "mlp":
            scores = mlp_scores(layer.mlp, name, stats, importance)
            scale = per_token(stats, f"{name}.mlp.down_proj", importance, sensitivity.get(name, 1.0))
            costs = torch.sort(scores).values * (1 / scores.sum().item() if relative else scale)
            width = len(costs)
            step = multiple if width % multiple == 0 else WIDTH_MULTIPLE
            blocks = int(width * MAX_LAYER_SHARE) // step
            for b in range(blocks):
                cost = costs[b * step:(b + 1) * step].sum().item()
                steps.append(_step(cost, 3 * hidden * step, (name, kind), b, name, kind, (b + 1) * step / width, step))
        else:
            attn = layer.self_attn
            heads, kv = info.attention_heads, info.kv_heads
            cost = head_scorer(attn, name, stats, importance)
            scale = per_token(stats, f"{name}.self_attn.o_proj", importance, sensitivity.get(name, 1.0))
            if relative:
                scale = 1 / cost(list(range(heads)))
            counts = sorted({n for r in range(1, heads) for m, n in head_choices(heads, kv, r / heads)
                             if m != "none" and n >= heads * (1 - MAX_LAYER_SHARE)}, reverse=True)
            before, removed_params, removed_heads = 0.0, 0, 0
            for i, kept in enumerate(counts):
                choice = choose_heads(cost, heads, kv, 1 - kept / heads)
                removed = [h for h in range(heads) if h not in choice.heads]
                total_cost = cost(removed) * scale
                params = 2 * hidden * info.head_dim * (len(removed) + kv - len(choice.kv_heads))
                steps.append(_step(total_cost - before, params - removed_params, (name, kind), i, name, kind,
                                   1 - kept / heads, len(removed) - removed_heads))
                before, removed_params, removed_heads = total_cost, params, len(removed)
    return steps


def mix_steps(model, layers: dict, live: list[str], mix, importance: str, cache: dict, sensitivity: dict[str, float],
              sizes: dict[str, int], multiple: int) -> list[Step]:
    """The removal steps of every kind in `mix`, ranked together: channel blocks and head groups of the `live`
    layers, and whole layers."""
    steps = [s for kind in mix if kind != "layers"
             for s in prune_steps(model, layers, live, kind, importance, cache, sensitivity, sizes, multiple)]
    return steps + (layer_steps(cache, layers, sizes) if "layers" in mix else [])


def per_token(stats: dict, linear: str, importance: str, sensitivity: float) -> float:
    """What turns a summed score into nats per token: energy scores are summed over the calibration rows."""
    if importance == "activation":
        return sensitivity / max(stats[linear].rows, 1)
    return 1.0


def layer_steps(cache: dict, layers: dict, sizes: dict[str, int]) -> list[Step]:
    from advisor.importance import LAYERS

    return [_step(max(li.skip_loss or 0.0, 0.0), layer_params(layers[n], sizes), (n, "layer"), 0, n, "layer", 1.0)
            for n, li in cache[LAYERS].items()]


def _step(cost: float, params: int, chain: tuple, index: int, layer: str, kind: str, amount: float,
          units: int = 0) -> Step:
    return Step(max(cost, 0.0) / max(params, 1), cost, params, chain, index, layer, kind, amount, units)


def take_cheapest(steps: list[Step], target: float, by: str = "params") -> tuple[dict[str, dict], list[str]]:
    """Take steps by rate (cost per parameter, or per millisecond where `priced`), each chain in order, until
    `target` is reached: parameters removed (`by="params"`), channels or heads (`"units"`) or milliseconds saved
    (`"saving"`). Returns layer → {kind: share or rank} and the layers removed whole."""
    chains: dict[tuple, list[Step]] = {}
    for s in steps:
        chains.setdefault(s.chain, []).append(s)
    for key, chain in chains.items():
        chains[key] = convex(sorted(chain, key=lambda s: s.index))
    heap = [chain[0] for chain in chains.values()]
    heapq.heapify(heap)
    done, shares, dropped, taken = 0.0, {}, [], {}
    removed = (lambda s: s.saving) if by == "saving" else (lambda s: s.params)  # what a layer counts once
    measure = (lambda s: s.units) if by == "units" else removed
    while heap and done < target:
        step = heapq.heappop(heap)
        if step.layer in dropped:
            continue
        if step.kind == "layer":
            # What the layer's partial pruning already removed counts once.
            done += removed(step) - taken.get(step.layer, 0)
            dropped.append(step.layer)
            shares.pop(step.layer, None)
            continue
        shares.setdefault(step.layer, {})[step.kind] = step.amount
        taken[step.layer] = taken.get(step.layer, 0) + removed(step)
        done += measure(step)
        chain = chains[step.chain]
        if step.index + 1 < len(chain):
            heapq.heappush(heap, chain[step.index + 1])
    return shares, sorted(dropped, key=lambda n: int(n.rsplit(".", 1)[1]))


def priced(steps: list[Step], ms_per_param: float, ms_per_layer: float) -> list[Step]:
    """The steps re-rated by estimated loss per decode-step millisecond saved: a removal saves its weights' share of
    the step, a whole layer also the step's cost per layer."""
    out = []
    for s in steps:
        saving = s.params * ms_per_param + (ms_per_layer if s.kind == "layer" else 0.0)
        out.append(Step(max(s.cost, 0.0) / max(saving, 1e-12), s.cost, s.params, s.chain, s.index, s.layer, s.kind,
                        s.amount, s.units, saving))
    return out


def saved_ms(steps: list[Step], ratios: dict[str, dict], dropped: list[str]) -> float:
    """The milliseconds the chosen removals save, by the same terms the steps were priced with."""
    total = sum(s.saving for s in steps if s.kind == "layer" and s.layer in dropped)
    for s in steps:
        if s.kind != "layer" and s.layer not in dropped and s.amount <= ratios.get(s.layer, {}).get(s.kind, 0) + 1e-9:
            total += s.saving
    return total


def convex(chain: list[Step]) -> list[Step]:
    """The chain with every step whose rate is below its predecessor's merged into it, so rates increase along the
    chain: greedy by rate then never stops before a cheap step hidden behind a dear one (a factorization's first
    step saves few weights for its whole truncation error; the next ones save many)."""
    out: list[Step] = []
    for step in chain:
        while out and step.rate <= out[-1].rate:
            prev = out.pop()
            cost, params = prev.cost + step.cost, prev.params + step.params
            saving = prev.saving + step.saving
            rate = max(cost, 0.0) / (max(saving, 1e-12) if saving else max(params, 1))
            step = Step(rate, cost, params, step.chain, 0, step.layer, step.kind, step.amount,
                        prev.units + step.units, saving)
        out.append(step)
    for i, step in enumerate(out):
        step.index = i
    return out


def uniform_ranks(linears, share: float, multiple: int) -> dict[str, int]:
    """The same share of weights removed from every linear (SVD-LLM's uniform compression ratio): the rank with
    r·(m+n) nearest (1 − share)·m·n, in multiples of `multiple`; linears where no such rank saves weights stay."""
    ranks = {}
    for li in linears:
        m, n = li.out_features, li.in_features
        rank = min(round((1 - share) * m * n / (m + n) / multiple) * multiple, largest_saving_rank(n, m, multiple))
        if rank > 0:
            ranks[li.name] = rank
    return ranks


def choose_ranks(model, linears, target: float, cache: dict, multiple: int, whitening: bool, layers: dict
                 ) -> dict[str, int]:
    """A rank per linear (multiples of `multiple`, only ranks that store fewer weights) removing `target` weights,
    taken greedily by estimated loss per weight saved: a linear's first step goes from dense to the largest saving
    rank, each later one `multiple` lower."""
    from advisor.importance import INPUTS, LAYERS

    stats, importance = cache.get(INPUTS, {}), cache.get(LAYERS, {})
    steps = []
    for li in linears:
        m, n = li.out_features, li.in_features
        top = largest_saving_rank(n, m, multiple)
        if top <= 0:
            continue
        w = model.get_submodule(li.name).weight.detach()
        energy = spectrum(w, stats[li.name].gram if whitening else None).pow(2)
        tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # tail[r] = Σ_{i≥r} σᵢ²
        layer = layer_of(li.name, layers)
        weight = max(importance[layer].skip_loss or 0.0, 1e-6) if layer in importance else 1.0
        scale = weight / energy.sum().clamp_min(1e-300).item()
        previous_cost, previous_params = 0.0, m * n
        for i, rank in enumerate(range(top, 0, -multiple)):
            cost, params = tail[min(rank, len(energy))].item() * scale, rank * (m + n)
            steps.append(_step(cost - previous_cost, previous_params - params, (li.name, "factorize"), i, li.name,
                               "factorize", rank))
            previous_cost, previous_params = cost, params
    shares, _ = take_cheapest(steps, target)
    return {name: int(kinds["factorize"]) for name, kinds in shares.items()}
