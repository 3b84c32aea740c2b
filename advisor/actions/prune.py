"""Structured pruning of one decoder layer: MLP intermediate channels and attention heads, removed from every weight
that shares the pruned dimension (gate/up rows and down columns; q rows, k/v rows of removed KV groups, o columns),
so the layer is a smaller dense layer of the same kind.

Recipe form: `{prune: {mlp: 0.3, heads: 0.25}}`, ratios of MLP channels and query heads removed, with optional
`importance` (IMPORTANCES) and `heads_by` (`auto`, `group`: whole KV groups, `query`: query heads evenly within
each group). Kept MLP widths are multiples of 32: vLLM's CPU WNA16 kernels take only input and output sizes that are
multiples of 32, so a pruned layer stays quantizable there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from advisor.actions.base import Action, register
from advisor.errors import ShapeError

IMPORTANCES = ("activation", "taylor", "wanda", "magnitude")
"""How a channel or head is scored:
- `activation`: the energy it adds to the residual stream on calibration text (‖W_down[:,k]‖²·Σₜhₖ²; for a set of
  heads ‖W_o[:,S]·a_S‖² over the tokens, with the cross terms); exactly what removing it alone subtracts from the
  layer's output, where Wanda-sp sums proxies of it over gate, up and down;
- `taylor`: the Fisher estimate of the loss increase, ½Σₜ(hₖ·∂L/∂hₖ)² (needs gradients);
- `wanda`: Wanda-sp, Σ|W|·‖X‖ over the weights of the channel (gate and up rows, down column) or head (q rows,
  o columns);
- `magnitude`: Σ|W| over the same weights (no calibration)."""
HEADS_BY = ("auto", "group", "query")
WIDTH_MULTIPLE = 32
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


@register
@dataclass(frozen=True)
class Prune(Action):
    kind = "prune"
    unit = "layer"
    structural = True
    order = 10
    mlp: float = 0.0
    """Share of the MLP's intermediate channels removed."""
    heads: float = 0.0
    """Share of the query heads removed."""
    importance: str = "activation"
    heads_by: str = "auto"
    refit: bool = True
    """Re-solve down_proj (o_proj) on the kept channels (heads) so the layer's output on calibration text changes
    least (`refit`); magnitude importance reads no calibration text and only slices."""

    @property
    def calibrates(self) -> bool:
        return self.importance != "magnitude"

    @property
    def refits(self) -> bool:
        return self.refit and self.calibrates

    @classmethod
    def from_spec(cls, arg) -> Prune:
        if not isinstance(arg, dict) or not arg:
            raise ShapeError(f"prune takes a mapping of ratios, got {arg!r}", hint="write {prune: {mlp: 0.3, heads: 0.25}}")
        known = {"mlp", "heads", "importance", "heads_by", "refit"}
        unknown = sorted(set(arg) - known)
        if unknown:
            raise ShapeError(f"unknown prune keys: {', '.join(unknown)}", hint=f"known: {', '.join(sorted(known))}")
        for key in ("mlp", "heads"):
            value = arg.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ShapeError(f"prune {key} must be a share in [0, 1), got {value!r}", hint=f"e.g. {key}: 0.25")
        if arg.get("importance", "activation") not in IMPORTANCES:
            raise ShapeError(f"unknown prune importance {arg['importance']!r}", hint=f"use one of {', '.join(IMPORTANCES)}")
        if arg.get("heads_by", "auto") not in HEADS_BY:
            raise ShapeError(f"unknown prune heads_by {arg['heads_by']!r}", hint=f"use one of {', '.join(HEADS_BY)}")
        if not isinstance(arg.get("refit", True), bool):
            raise ShapeError(f"prune refit must be true or false, got {arg['refit']!r}", hint="e.g. refit: false")
        return cls(**{k: (float(v) if k in ("mlp", "heads") else v) for k, v in arg.items()})

    def to_spec(self):
        spec = {"mlp": self.mlp, "heads": self.heads, "importance": self.importance, "heads_by": self.heads_by,
                "refit": self.refit}
        defaults = {"mlp": 0.0, "heads": 0.0, "importance": "activation", "heads_by": "auto", "refit": True}
        return {self.kind: {k: v for k, v in spec.items() if v != defaults[k]} or {"mlp": 0.0}}

    def check(self, name, structure, target) -> None:
        from advisor.architecture import check_reshape

        check_reshape(structure.model_type, uniform=True)  # per-layer widths are checked again when adopted
        layer = structure.layer(name)
        leaves = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[1] for n in layer.linears}
        needed = [f"mlp.{n}" for n in MLP_NAMES] if self.mlp else []
        needed += [f"self_attn.{n}" for n in ATTENTION_NAMES] if self.heads else []
        missing = [n for n in needed if n not in leaves]
        if missing:
            fused = any(n.endswith(("qkv_proj", "gate_up_proj")) for n in layer.linears)
            what = "stores q/k/v or gate/up fused (qkv_proj, gate_up_proj)" if fused else f"has no {', '.join(missing)}"
            raise ShapeError(f"cannot prune {name} of {structure.architecture}: it {what}",
                             hint="pruning works on layers with separate q/k/v/o_proj and gate/up/down_proj "
                                  "(llama, mistral, qwen2, qwen3, gemma); remove-layer works on every architecture")
        if self.mlp and layer.mlp_width is not None and layer.mlp_width * (1 - self.mlp) < 1:
            raise ShapeError(f"{name}: pruning {self.mlp:.0%} of {layer.mlp_width} MLP channels keeps none",
                             hint="use a smaller mlp ratio")
        if self.heads and layer.attention_heads * (1 - self.heads) < 1:
            raise ShapeError(f"{name}: pruning {self.heads:.0%} of {layer.attention_heads} heads keeps none",
                             hint=f"use a heads ratio below {1 - 1 / layer.attention_heads:.2f}")

    @classmethod
    def apply(cls, model, units, ctx) -> dict[str, str | None]:
        from advisor.importance import input_statistics, keep_inputs

        needs: dict[str, set] = {"sumsq": set(), "covariance": set(), "taylor": set(), "relative": set()}
        head_dims = {}
        for name, action in units.items():
            for key, names in statistics_needed(name, action.importance, action.mlp > 0, action.heads > 0,
                                                action.refits).items():
                needs[key].update(names)
            head_dims[f"{name}.self_attn.o_proj"] = head_dim_of(model.get_submodule(name))
        stats = {}
        if any(needs.values()):
            stats = input_statistics(model, ctx.windows, ctx.cache, **{k: sorted(v) for k, v in needs.items()},
                                     heads=head_dims)
        notes = ctx.notes.setdefault(cls.kind, {})
        for name, action in units.items():
            layer = model.get_submodule(name)
            note = {"importance": action.importance, "refit": action.refits}
            if action.mlp > 0:
                kept = select_channels(mlp_scores(layer.mlp, name, stats, action.importance),
                                       kept_width(layer.mlp.down_proj.in_features, action.mlp))
                down = refit(layer.mlp.down_proj, _gram(stats[f"{name}.mlp.down_proj"]), kept) if action.refits else None
                slice_mlp(layer.mlp, kept, down)
                keep_inputs(ctx.cache, f"{name}.mlp.down_proj", kept)
                note["mlp_width"] = len(kept)
            if action.heads > 0:
                attn = layer.self_attn
                choice = choose_heads(head_scorer(attn, name, stats, action.importance), *head_counts(attn),
                                      action.heads, action.heads_by)
                d = attn.head_dim
                cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in choice.heads])
                o = refit(attn.o_proj, _gram(stats[f"{name}.self_attn.o_proj"]), cols) if action.refits else None
                channels = slice_attention(attn, choice.heads, choice.kv_heads, o)
                keep_inputs(ctx.cache, f"{name}.self_attn.o_proj", channels)
                note.update(heads=len(choice.heads), kv_heads=len(choice.kv_heads), heads_by=choice.mode,
                            kept_heads=choice.heads)
            notes[name] = note
            ctx.reshaped = ctx.reshaped or action.mlp > 0 or action.heads > 0
        return {}


def kept_width(width: int, ratio: float, multiple: int = WIDTH_MULTIPLE) -> int:
    """MLP channels kept when `ratio` of `width` are removed: the nearest multiple of `multiple` (at least one),
    all at 0. A tie removes the group (a request for 25% of two groups removes one)."""
    if ratio <= 0 or width <= multiple:
        return width
    return max(multiple, min(width, math.floor(width * (1 - ratio) / multiple + 0.5 - 1e-9) * multiple))


def statistics_needed(layer: str, importance: str, mlp: bool, heads: bool, refit: bool = True) -> dict[str, list[str]]:
    """The advisor.importance.input_statistics arguments pruning one layer reads: its importance's, and the
    covariances the refit of down_proj / o_proj solves with."""
    attn, down, o = f"{layer}.self_attn", f"{layer}.mlp.down_proj", f"{layer}.self_attn.o_proj"
    needs: dict[str, list[str]] = {"sumsq": [], "relative": [], "covariance": [], "taylor": []}
    if importance == "activation":
        needs["sumsq"] += [down] if mlp else []
        needs["relative"] += [o] if heads else []
    elif importance == "taylor":
        needs["taylor"] += ([down] if mlp else []) + ([o] if heads else [])
    elif importance == "wanda":
        needs["sumsq"] += ([f"{layer}.mlp.gate_proj", down] if mlp else []) + ([f"{attn}.q_proj", o] if heads else [])
    if refit and importance != "magnitude":
        needs["relative"] += ([down] if mlp else []) + ([o] if heads else [])
    return {k: v for k, v in needs.items() if v}


def head_dim_of(layer) -> int:
    attn = layer.self_attn
    return getattr(attn, "head_dim", None) or attn.o_proj.in_features // attn.config.num_attention_heads


def head_counts(attn) -> tuple[int, int]:
    d = attn.head_dim
    return attn.q_proj.out_features // d, attn.k_proj.out_features // d


def mlp_scores(mlp, layer: str, stats: dict, importance: str) -> torch.Tensor:
    """Per intermediate channel: how much removing it costs (higher = keep)."""
    gate, up, down = (getattr(mlp, n).weight.detach().double() for n in MLP_NAMES)
    if importance == "activation":
        st = stats[f"{layer}.mlp.down_proj"]
        return down.pow(2).sum(0) * st.channels(st.relative)
    if importance == "taylor":
        st = stats[f"{layer}.mlp.down_proj"]
        return 0.5 * st.channels(st.taylor) / max(st.tokens, 1)
    x = stats[f"{layer}.mlp.gate_proj"].norms if importance == "wanda" else torch.ones(gate.shape[1], dtype=gate.dtype)
    h = stats[f"{layer}.mlp.down_proj"].norms if importance == "wanda" else torch.ones(gate.shape[0], dtype=gate.dtype)
    return (gate.abs() @ x) + (up.abs() @ x) + down.abs().sum(0) * h


def head_scorer(attn, layer: str, stats: dict, importance: str):
    """A function: list of query heads → cost of removing them together (higher = keep)."""
    d = attn.head_dim
    wo = attn.o_proj.weight.detach().double()
    if importance == "activation":
        gram = stats[f"{layer}.self_attn.o_proj"].relative_gram
        return lambda heads: _quadratic(wo, gram, heads, d)
    if importance == "taylor":
        st = stats[f"{layer}.self_attn.o_proj"]
        matrix = st.head_taylor if st.kept is None else _kept_heads(st.head_taylor, st.kept, d)
        return lambda heads: 0.5 * matrix[heads][:, heads].sum().item() / max(st.tokens, 1)
    wq = attn.q_proj.weight.detach().double()
    if importance == "wanda":
        x, a = stats[f"{layer}.self_attn.q_proj"].norms, stats[f"{layer}.self_attn.o_proj"].norms
    else:
        x, a = torch.ones(wq.shape[1], dtype=wq.dtype), torch.ones(wo.shape[1], dtype=wo.dtype)
    per = ((wq.abs() @ x).reshape(-1, d).sum(1) + (wo.abs().sum(0) * a).reshape(-1, d).sum(1)).tolist()
    return lambda heads: sum(per[h] for h in heads)


def _quadratic(wo: torch.Tensor, gram: torch.Tensor, heads: list[int], d: int) -> float:
    """Σₜ‖W_o[:,S]·a_S‖² = tr(W_S C_SS W_Sᵀ): the energy heads S add to the residual stream."""
    cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
    w = wo[:, cols]
    return (w @ gram[cols][:, cols] * w).sum().item()


def _kept_heads(matrix: torch.Tensor, kept_channels: torch.Tensor, d: int) -> torch.Tensor:
    heads = kept_channels.reshape(-1, d)[:, 0] // d
    return matrix[heads][:, heads]


def select_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in their original order."""
    return torch.sort(torch.topk(scores, keep).indices).values


@dataclass(frozen=True)
class HeadChoice:
    heads: list[int]
    """Query heads kept (ascending: the heads of one KV group stay together)."""
    kv_heads: list[int]
    mode: str
    """`group` (whole KV groups removed), `query` (query heads within groups) or `none`."""


def head_choices(heads: int, kv_heads: int, ratio: float, heads_by: str = "auto") -> list[tuple[str, int]]:
    """The (mode, query heads kept) that realize `ratio` as nearly as the KV groups allow: query heads kept must be
    whole KV groups (group) or the same number in every group (query). Ties go to keeping more heads."""
    if ratio <= 0:
        return [("none", heads)]
    per_group = heads // kv_heads
    options = []
    if heads_by in ("auto", "group"):
        options += [("group", per_group * k) for k in range(1, kv_heads + 1)]
    if heads_by in ("auto", "query"):
        options += [("query", kv_heads * e) for e in range(1, per_group + 1)]
    target = heads * (1 - ratio)
    best = min((abs(n - target), -n) for _, n in options)
    return [(m, n) for m, n in options if (abs(n - target), -n) == best and n < heads] or [("none", heads)]


def choose_heads(cost, heads: int, kv_heads: int, ratio: float, heads_by: str = "auto") -> HeadChoice:
    """Which query heads to keep. At an equal number of query heads removed, the attention output loses exactly the
    removed query heads' contributions (a KV head acts only through its query heads), so the mode whose removed set
    costs less wins; removing whole groups also saves the k/v weights and KV cache, so it wins ties."""
    per_group = heads // kv_heads
    groups = [list(range(g * per_group, (g + 1) * per_group)) for g in range(kv_heads)]
    candidates = []
    for mode, kept in head_choices(heads, kv_heads, ratio, heads_by):
        if mode == "none":
            return HeadChoice(list(range(heads)), list(range(kv_heads)), "none")
        if mode == "group":
            order = sorted(range(kv_heads), key=lambda g: cost(groups[g]))
            drop_groups = sorted(order[: kv_heads - kept // per_group])
            removed = [h for g in drop_groups for h in groups[g]]
            kv = [g for g in range(kv_heads) if g not in drop_groups]
        else:
            drop = per_group - kept // kv_heads
            removed = [h for g in groups for h in sorted(g, key=lambda h: cost([h]))[:drop]]
            kv = list(range(kv_heads))
        candidates.append((cost(removed), mode != "group", HeadChoice(
            [h for h in range(heads) if h not in removed], kv, mode)))
    return min(candidates, key=lambda c: c[:2])[2]


def _replace(parent, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    old = getattr(parent, name)
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=old.weight.device,
                          dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    setattr(parent, name, new)


def _rows(linear, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return linear.weight.detach()[rows], None if linear.bias is None else linear.bias.detach()[rows]


def _gram(st):
    """The refit's input covariance, each token weighted by 1/ρ (ρ: the mean square of the decoder layer's input at
    that token): tokens whose hidden state is large (the first token's attention sink) would otherwise decide the fit
    for every other token."""
    return st.relative_gram


REFIT_DAMPING = 0.01


def refit(linear, gram: torch.Tensor, kept: torch.Tensor, damping: float | None = None) -> torch.Tensor:
    """The weight on input channels `kept` that best reproduces the linear's outputs on the calibration inputs
    (covariance `gram`): argmin ‖W·X − W′·X_kept‖² + λ‖W′ − W_K‖², i.e. W′ = (W·C[:,K] + λ·W_K)·(C[K,K] + λI)⁻¹, with
    λ a share of the mean diagonal as in factorization's whitening: a ridge toward the original weights in the
    directions calibration did not see."""
    damping = REFIT_DAMPING if damping is None else damping
    w = linear.weight.detach().double()
    c = gram.double()
    a = c[kept][:, kept]
    a = a + damping * a.diagonal().mean().clamp_min(1e-12) * torch.eye(len(kept), dtype=a.dtype)
    lam = damping * c[kept][:, kept].diagonal().mean().clamp_min(1e-12)
    rhs = c[kept] @ w.T + lam * w[:, kept].T  # [K, out]
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(a)).T.to(linear.weight.dtype)


def slice_mlp(mlp, kept: torch.Tensor, down: torch.Tensor | None = None) -> None:
    """Keep intermediate channels `kept`: gate/up rows and down columns."""
    for name in ("gate_proj", "up_proj"):
        _replace(mlp, name, *_rows(getattr(mlp, name), kept))
    old = mlp.down_proj
    _replace(mlp, "down_proj", old.weight.detach()[:, kept] if down is None else down,
             None if old.bias is None else old.bias.detach())
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(kept)


def slice_attention(attn, heads: list[int], kv_heads: list[int], o_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Keep query heads `heads` and KV heads `kv_heads` (head_dim unchanged; q/k norms act per head_dim and stay);
    returns the o_proj input channels kept."""
    d = attn.head_dim
    q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])
    kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in kv_heads])
    _replace(attn, "q_proj", *_rows(attn.q_proj, q_rows))
    _replace(attn, "k_proj", *_rows(attn.k_proj, kv_rows))
    _replace(attn, "v_proj", *_rows(attn.v_proj, kv_rows))
    o = attn.o_proj
    _replace(attn, "o_proj", o.weight.detach()[:, q_rows] if o_weight is None else o_weight,
             None if o.bias is None else o.bias.detach())
    # transformers' attention repeats each KV head this many times (eager and sdpa alike).
    attn.num_key_value_groups = len(heads) // len(kv_heads)
    for key, value in (("num_heads", len(heads)), ("num_key_value_heads", len(kv_heads))):
        if hasattr(attn, key):
            setattr(attn, key, value)
    return q_rows
