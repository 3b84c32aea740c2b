"""Per-channel scaling before quantization, searched per layer group against the layer's real calibration inputs
instead of one global strength: activation-outlier smoothing for W8A8/FP8 (SmoothQuant, Xiao et al. 2023), and
activation-aware weight scaling for weight-only schemes (AWQ, Lin et al. 2024).

Dividing a channel of the activations by s and multiplying the matching weight column by s leaves the
full-precision output unchanged but moves range from activations (quantized per token, where one outlier channel
ruins every other channel's resolution) to weights (quantized per output channel, which absorb it cheaply); for
weight-only schemes it enlarges the weight columns that meet large activations, so their rounding error shrinks
relative to their contribution. The division is folded into the op that produces the activations: a norm's weight, `up_proj`'s rows (for `down_proj`),
or `v_proj`'s rows (for `o_proj`). Groups are found by tracing which linears read which norm's output, so no module
names are assumed beyond the common `up_proj/down_proj` and `v_proj/o_proj` pairs.

Every group lies within one decoder layer (a layer's norms feed its own linears), so smoothing runs one layer at a
time on that layer's full-precision inputs (`layer_statistics`, `find_layer_groups`): the in-memory path and the
streamed one (advisor.stream) run the same code and fold the same factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from advisor.calibrate import LinearStats
from advisor.quantize.rtn import fake_quantize_activations, quantize_weight
from advisor.schemes import Scheme, pair_limit

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
# Activation-aware scaling (weight-only schemes) searches its exponent on a finer grid, from 0 (no scaling) up.
AWQ_ALPHAS = tuple(i / 20 for i in range(1, 20))


@dataclass
class SmoothGroup:
    """Linears that read the same activations, and the op whose output those activations are."""

    producer: str
    kind: str
    """`norm` (a norm's output), `rows` (a linear's output rows, elementwise into the consumer), `heads` (v → o)."""
    consumers: list[str]
    repeat: int = 1
    """For `heads`: query heads per KV head (the consumer's channel c reads producer channel c mapped through GQA)."""
    head_dim: int = 0


@dataclass
class SmoothChoice:
    group: SmoothGroup
    alpha: float | None
    """None: smoothing did not reduce the error, the group is left as is."""
    error_before: float
    error_after: float
    scales: torch.Tensor | None = None
    """The per-producer-channel factors folded in (None when none were): `fold` applies them again to the same
    weights read anew."""


def _norm_form(norm) -> str | None:
    """`mul` when output ∝ weight, `offset` when output ∝ (1 + weight) (Gemma), None if neither (left alone)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.nn.Parameter) or w.dim() != 1:
        return None
    x = torch.randn(2, w.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = norm(x)
        saved = w.detach().clone()
        try:
            w.mul_(2.0)
            if torch.allclose(norm(x), 2 * ref, rtol=1e-4, atol=1e-5):
                return "mul"
            w.copy_((1 + saved) * 2 - 1)
            if torch.allclose(norm(x), 2 * ref, rtol=1e-4, atol=1e-5):
                return "offset"
        finally:
            w.copy_(saved)
    return None


@torch.inference_mode()
def find_groups(model, linear_names: list[str], probe_ids: list[int]) -> list[SmoothGroup]:
    """Trace one short forward pass of the whole model: a linear whose input *is* a norm's output tensor consumes
    that norm."""
    groups, _ = _trace(dict(model.named_modules()), linear_names, lambda: model(torch.tensor([probe_ids])))
    return groups


@torch.inference_mode()
def find_layer_groups(layer, prefix: str, linear_names: list[str], args: tuple, kwargs: dict,
                      ) -> tuple[list[SmoothGroup], list[str]]:
    """The groups of one decoder layer (`prefix`: its module name and a dot), traced from one call of the layer on
    `args`/`kwargs`; also the wanted linears that read a tensor the layer was given as it is (their producer, a norm
    applied before the layer, lies outside it: a group spanning layers, which layer-by-layer smoothing cannot
    fold)."""
    given = {id(t) for t in (*args, *kwargs.values()) if torch.is_tensor(t)}
    modules = dict(layer.named_modules(prefix=prefix.rstrip(".")))
    return _trace(modules, linear_names, lambda: layer(*args, **kwargs), given)


def _trace(modules: dict[str, torch.nn.Module], linear_names: list[str], run: Callable[[], object],
           given: frozenset[int] | set[int] = frozenset()) -> tuple[list[SmoothGroup], list[str]]:
    """The groups among `modules` (names → modules) from one `run()`, and the wanted linears whose input is one of
    the tensors whose ids are in `given`."""
    wanted = [n for n in linear_names if n in modules]
    wanted_set = set(wanted)
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    consumers: dict[str, list[str]] = {}
    outside: list[str] = []
    handles = []
    for name, m in modules.items():
        if name in wanted_set or not hasattr(m, "weight") or "norm" not in type(m).__name__.lower():
            continue
        handles.append(m.register_forward_hook(
            lambda mod, args, out, name=name: produced.__setitem__(id(out), (name, out)) if torch.is_tensor(out) else None))
    for name in wanted:
        def pre(mod, args, name=name):
            hit = produced.get(id(args[0]))
            if hit is not None:
                consumers.setdefault(hit[0], []).append(name)
            elif id(args[0]) in given and name not in outside:
                outside.append(name)
        handles.append(modules[name].register_forward_pre_hook(pre))
    try:
        run()
    finally:
        for h in handles:
            h.remove()

    groups = [SmoothGroup(norm, "norm", names) for norm, names in consumers.items() if _norm_form(modules[norm])]
    for name, m in modules.items():
        children = dict(m.named_children())
        if {"up_proj", "down_proj"} <= set(children) and f"{name}.down_proj" in wanted_set:
            up, down = children["up_proj"], children["down_proj"]
            if isinstance(up, torch.nn.Linear) and up.out_features == down.in_features:
                groups.append(SmoothGroup(f"{name}.up_proj", "rows", [f"{name}.down_proj"]))
        if {"v_proj", "o_proj"} <= set(children) and f"{name}.o_proj" in wanted_set:
            v, o = children["v_proj"], children["o_proj"]
            head_dim = getattr(m, "head_dim", None)
            if isinstance(v, torch.nn.Linear) and head_dim and o.in_features % v.out_features == 0:
                groups.append(SmoothGroup(f"{name}.v_proj", "heads", [f"{name}.o_proj"],
                                          repeat=o.in_features // v.out_features, head_dim=head_dim))
    return groups, outside


class _LayerAsModel:
    """One decoder layer in the role of the model advisor.calibrate.collect runs: its modules under their model
    names, and a call with window j's index runs the layer on window j's inputs, keeping the outputs."""

    def __init__(self, layer, prefix: str, inputs: list[tuple[tuple, dict]]) -> None:
        self.layer, self.prefix, self.inputs = layer, prefix, inputs
        self.outputs: list[torch.Tensor] = []

    def named_modules(self):
        return self.layer.named_modules(prefix=self.prefix.rstrip("."))

    def __call__(self, ids: torch.Tensor):
        args, kwargs = self.inputs[int(ids[0, 0])]
        out = self.layer(*args, **kwargs)
        self.outputs.append(out[0] if isinstance(out, tuple) else out)


def layer_statistics(layer, prefix: str, linear_names: list[str], inputs: list[tuple[tuple, dict]],
                     sample_rows: int, seed: int = 0) -> tuple[dict[str, LinearStats], list[torch.Tensor]]:
    """advisor.calibrate.collect's statistics of one decoder layer's linears, the layer run on each window's
    inputs ((positional arguments, hidden states first; keywords)); also the layer's outputs per window (the next
    layer's inputs)."""
    from advisor.calibrate import collect

    runner = _LayerAsModel(layer, prefix, inputs)
    names = [n for n in linear_names if n.startswith(prefix)]
    stats = collect(runner, names, [[j] for j in range(len(inputs))], sample_rows, seed)
    return stats, runner.outputs


def _expand(s_producer: torch.Tensor, group: SmoothGroup) -> torch.Tensor:
    """Map per-producer-channel factors to the consumer's input channels (GQA: KV head g feeds `repeat` heads)."""
    if group.kind != "heads":
        return s_producer
    kv = s_producer.view(-1, group.head_dim)  # [kv_heads, head_dim]
    return kv.repeat_interleave(group.repeat, dim=0).reshape(-1)


def _producer_absmax(x_absmax: torch.Tensor, group: SmoothGroup) -> torch.Tensor:
    if group.kind != "heads":
        return x_absmax
    heads = x_absmax.view(-1, group.repeat, group.head_dim)  # consumer channels grouped by the KV head they read
    return heads.amax(1).reshape(-1)


def _error(xs: torch.Tensor, weights: list[torch.Tensor], refs: list[torch.Tensor], s: torch.Tensor | None,
           schemes: list[Scheme], pair_sum: int | None) -> float:
    """Relative squared error of the quantized outputs against the full-precision ones, summed over consumers."""
    err = 0.0
    for w, ref, scheme in zip(weights, refs, schemes):
        xq, wq = (xs, w) if s is None else (xs / s, w * s)
        if scheme.input_activations is not None:
            xq = fake_quantize_activations(xq, scheme.input_activations)
        out = xq @ quantize_weight(wq, scheme.weights, pair_limit(scheme, pair_sum)).dequantize().T
        err += ((out - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-12)).item()
    return err


def _candidates(g: SmoothGroup, st: LinearStats, weights: list[torch.Tensor], quantized_activations: bool):
    """(alpha, per-producer-channel factors) to try for one group.

    With quantized activations (SmoothQuant) the factors balance each channel's activation and weight maxima,
    s = max|x|^α / max|w|^(1-α). Weight-only (AWQ, Lin et al. 2024) the activations stay exact, so the factors only
    enlarge the weight columns that meet large activations, s = mean|x|^α, protecting them from rounding error.
    """
    if quantized_activations:
        w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
        p_x = _producer_absmax(st.absmax, g).clamp_min(1e-5)
        p_w = _producer_absmax(w_absmax, g).clamp_min(1e-5)
        for alpha in ALPHAS:
            yield alpha, (p_x.pow(alpha) / p_w.pow(1 - alpha)).clamp(1e-4, 1e4)
        return
    mean = _producer_absmax(st.abssum / max(st.rows, 1), g).clamp_min(1e-5)
    for alpha in AWQ_ALPHAS:
        s = mean.pow(alpha)
        yield alpha, (s / (s.max() * s.min()).sqrt()).clamp(1e-4, 1e4)


@torch.inference_mode()
def search_and_apply(model, groups: list[SmoothGroup], stats: dict[str, LinearStats],
                     schemes: dict[str, Scheme | None], pair_sum: int | None) -> list[SmoothChoice]:
    """For each group pick the alpha (or none) that minimises the quantized output error of its consumers (each
    under its own scheme; dense consumers only absorb the factors), then fold it in. `model`: a module, or a
    mapping of module names to modules (one decoder layer's, under their model names)."""
    modules = model if isinstance(model, dict) else dict(model.named_modules())
    choices = []
    from tqdm import tqdm

    for g in tqdm(groups, desc="searching per-channel scales", unit="group", leave=False):
        quantized = [c for c in g.consumers if schemes.get(c) is not None]
        if not quantized:
            continue
        st = stats[quantized[0]]
        xs = st.sample[0]
        weights = [modules[c].weight.detach().float() for c in quantized]
        consumer_schemes = [schemes[c] for c in quantized]
        refs = [xs @ w.T for w in weights]
        base = _error(xs, weights, refs, None, consumer_schemes, pair_sum)
        best_alpha, best_err, best_s = None, base, None
        acts = any(sc.input_activations is not None for sc in consumer_schemes)
        for alpha, s in _candidates(g, st, weights, acts):
            err = _error(xs, weights, refs, _expand(s, g), consumer_schemes, pair_sum)
            if err < best_err:
                best_alpha, best_err, best_s = alpha, err, s
        if best_s is not None:
            _fold(modules, g, best_s)
        choices.append(SmoothChoice(g, best_alpha, base, best_err, best_s))
    return choices


@torch.inference_mode()
def fold(modules: dict[str, torch.nn.Module], choices: list[SmoothChoice]) -> None:
    """Fold chosen factors into weights read anew (in the order they were first folded: the same bytes)."""
    for c in choices:
        if c.scales is not None:
            _fold(modules, c.group, c.scales)


def _fold(modules: dict, g: SmoothGroup, s: torch.Tensor) -> None:
    producer = modules[g.producer]
    if g.kind == "norm":
        w = producer.weight.data
        if _norm_form(producer) == "offset":
            w.copy_((1 + w) / s.to(w.dtype) - 1)
        else:
            w.div_(s.to(w.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.data.div_(s.to(producer.bias.dtype))
    else:  # rows / heads: the producer's output channel c is divided by s[c]
        producer.weight.data.div_(s.to(producer.weight.dtype)[:, None])
        if producer.bias is not None:
            producer.bias.data.div_(s.to(producer.bias.dtype))
    s_in = _expand(s, g)
    for c in g.consumers:
        modules[c].weight.data.mul_(s_in.to(modules[c].weight.dtype)[None, :])
