"""What structural actions decide by: statistics of the model's activations on calibration text, measured once on
the model before any structural action changes it, and shared between kinds through `StructureContext.cache`.

Per linear input (`InputStats`):
- `sumsq`: Σₜ xⱼ² per input channel (Wanda's ‖Xⱼ‖₂ is its square root);
- `covariance`: XᵀX, the whitening of activation-aware SVD (SVD-LLM) and the output energy of a set of channels;
- `taylor`: Σₜ (xⱼ·∂L/∂xⱼ)² per channel, and per head of `head_dim` channels the matrix Σₜ pₜpₜᵀ of the heads'
  summed products: the Fisher estimate of the loss increase when channels are removed (½ of it, in nats per token;
  Optimal Brain Damage's diagonal Fisher, LLM-Pruner's Taylor importance). Needs a backward pass per window.
Per decoder layer (`LayerImportance`): ShortGPT's block influence (1 − mean cosine similarity of the layer's input
and output hidden states) and the loss increase when the layer alone is skipped.

Everything accumulates in float64: sums over thousands of tokens of squared activations lose the small directions
that Cholesky and the truncation error depend on in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from advisor.errors import AdvisorError

SKIP_WINDOWS = 8
"""Windows (of their first 256 tokens) each layer is skipped on: the skip losses rank layers and scale every other
cost (advisor.structure_search), and 4 windows of one text ranked the demo's early layers unlike its held-out text."""
INPUTS = "importance.inputs"
LAYERS = "importance.layers"


@dataclass
class InputStats:
    """What one linear layer reads, over the calibration windows."""

    rows: int
    """Tokens seen."""
    sumsq: torch.Tensor
    """[in] Σ x² per input channel (float64)."""
    covariance: torch.Tensor | None = None
    """[in, in] XᵀX (float64), where asked for."""
    taylor: torch.Tensor | None = None
    """[in] Σ (x·∂L/∂x)² per input channel (float64), where asked for."""
    head_taylor: torch.Tensor | None = None
    """[heads, heads] Σ p pᵀ with p the per-head sums of x·∂L/∂x over `head_dim` channels, where asked for."""
    tokens: int = 0
    """Tokens whose loss the gradients came from (to express `taylor` per token)."""
    relative: torch.Tensor | None = None
    """[in] Σ x²/ρ per input channel, ρ the mean square of the decoder layer's input hidden state at that token:
    what a channel adds to the residual stream relative to the stream itself, which is what the next RMSNorm sees
    (a few tokens carry hidden states thousands of times larger than the rest and would rank channels alone)."""
    relative_covariance: torch.Tensor | None = None
    """[in, in] Σ x·xᵀ/ρ, where asked for."""
    kept: torch.Tensor | None = None
    """Indices of the linear's present input channels among those measured (set when an action removed inputs)."""

    def channels(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.kept is None else values[self.kept]

    @property
    def norms(self) -> torch.Tensor:
        """‖Xⱼ‖₂ per present input channel."""
        return self.channels(self.sumsq).sqrt()

    @property
    def relative_gram(self) -> torch.Tensor:
        """Σ x·xᵀ/ρ over the present input channels."""
        if self.relative_covariance is None:
            raise AdvisorError("the relative input covariance was not measured", hint="report this as a hubc bug")
        c = self.relative_covariance
        return c if self.kept is None else c[self.kept][:, self.kept]

    @property
    def gram(self) -> torch.Tensor:
        """XᵀX over the present input channels."""
        if self.covariance is None:
            raise AdvisorError("the input covariance was not measured", hint="report this as a hubc bug")
        return self.covariance if self.kept is None else self.covariance[self.kept][:, self.kept]


@dataclass
class LayerImportance:
    block_influence: float
    """1 − mean cosine similarity of the layer's input and output hidden states (ShortGPT)."""
    skip_loss: float | None = None
    """Loss increase (nats per token) when the layer alone is skipped, on a few windows."""
    change: float = 0.0
    """Mean over tokens of ‖output − input‖²/ρ (ρ: the input's mean square): what the layer adds to the hidden
    state, relative to it (its perturbation when skipped, in the units of InputStats.relative)."""


def input_statistics(model, windows, cache: dict, sumsq=(), covariance=(), taylor=(), heads: dict | None = None,
                     relative=()) -> dict[str, InputStats]:
    """Statistics of the inputs of linears `sumsq` ∪ `covariance` ∪ `taylor` (with the covariance for `covariance`,
    the Taylor terms for `taylor`; `heads`: linear → head_dim for per-head Taylor matrices), measured in one pass
    of `windows` for whatever `cache` does not hold yet."""
    heads = heads or {}
    store = cache.setdefault(INPUTS, {})
    names = list(dict.fromkeys([*sumsq, *covariance, *taylor, *relative]))
    missing = lambda n, field: n not in store or getattr(store[n], field) is None
    todo = {n for n in names if n not in store} | {n for n in covariance if missing(n, "covariance")} \
        | {n for n in taylor if missing(n, "taylor")} | {n for n in relative if missing(n, "relative_covariance")}
    if todo:
        measure(model, windows, cache, sumsq=sorted(todo), covariance=[n for n in covariance if n in todo],
                taylor=[n for n in taylor if n in todo], heads=heads, relative=[n for n in relative if n in todo])
    return {n: store[n] for n in names}


def layer_importance(model, windows, cache: dict, skip_windows: int = SKIP_WINDOWS, skip_tokens: int = 256
                     ) -> dict[str, LayerImportance]:
    """Block influence and skip loss of every decoder layer (cached)."""
    if LAYERS not in cache or any(li.skip_loss is None for li in cache[LAYERS].values()):
        measure(model, windows, cache, layers=True)
        skip_losses(model, spread(windows, skip_windows), cache, skip_tokens)
    return cache[LAYERS]


def spread(windows, count: int) -> list:
    """`count` windows taken evenly across `windows`: calibration text is several sources one after another (text,
    then the model's own samples), and a few windows must cover them all."""
    if len(windows) <= count:
        return list(windows)
    return [windows[i * len(windows) // count] for i in range(count)]


def keep_inputs(cache: dict, name: str, kept: torch.Tensor) -> None:
    """Record that linear `name` now reads only input channels `kept` (of those it read before), so statistics
    cached from the unchanged model keep describing its present inputs."""
    store = cache.get(INPUTS, {})
    st = store.get(name)
    if st is not None:
        # A new record, not an update: a copy of the cache (one per variant, in benchmarks) stays valid.
        store[name] = replace(st, kept=kept if st.kept is None else st.kept[kept])


def require_windows(windows) -> None:
    """Raise with the fix when calibration windows are needed and there are none."""
    if not windows:
        raise AdvisorError("activation importance and whitening need calibration text",
                           hint="give the recipe a `calibration` block, or use importance: magnitude / "
                                "whitening: false")


def measure(model, windows, cache: dict, sumsq=(), covariance=(), taylor=(), heads: dict | None = None,
            layers: bool = False, relative=()) -> None:
    """One pass over `windows` with hooks on the named linears (and on every decoder layer with `layers`); results
    go to `cache`. With `taylor`, each window also runs backward (weights frozen)."""
    from advisor.model import decoder_layers

    require_windows(windows)
    heads = heads or {}
    modules = dict(model.named_modules())
    cov_names, taylor_names, rel_names = set(covariance), set(taylor), set(relative)
    rho: dict = {}  # the decoder layer now running → 1/ρ per token
    found: dict[str, InputStats] = {}
    handles = []
    last: dict = {}  # q/k/v (gate/up) read one tensor: compute its statistics once per call

    def stats_of(x: torch.Tensor, with_cov: bool, with_rel: bool):
        if last.get("x") is not x or (with_cov and last.get("cov") is None) \
                or (with_rel and last.get("rcov") is None):
            x64 = x.detach().reshape(-1, x.shape[-1]).double()
            xr = x64 * rho["inv"][:, None] if "inv" in rho else None
            last.update(x=x, sq=x64.pow(2).sum(0), cov=x64.T @ x64 if with_cov else None,
                        rel=None if xr is None else (xr * x64).sum(0),
                        rcov=xr.T @ x64 if with_rel and xr is not None else None)
        return last["sq"], last["cov"], last["rel"], last["rcov"]

    def pre_hook(name: str):
        def fn(module, args):
            x = args[0]
            sq, cov, rel, rcov = stats_of(x, name in cov_names, name in rel_names)
            st = found.get(name)
            if st is None:
                found[name] = st = InputStats(0, torch.zeros_like(sq))
            st.rows += x.numel() // x.shape[-1]
            st.sumsq += sq
            for field, value in (("covariance", cov), ("relative", rel), ("relative_covariance", rcov)):
                if value is not None:
                    setattr(st, field, value.clone() if getattr(st, field) is None else getattr(st, field) + value)
            if name in taylor_names and x.requires_grad:
                x.register_hook(taylor_hook(name, x.detach()))
        return fn

    def taylor_hook(name: str, x: torch.Tensor):
        def fn(g):
            p = (x * g).reshape(-1, x.shape[-1]).double()
            st = found[name]
            if st.taylor is None:
                st.taylor = torch.zeros(x.shape[-1], dtype=torch.float64)
            st.taylor += p.pow(2).sum(0)
            if name in heads:
                ph = p.reshape(p.shape[0], -1, heads[name]).sum(-1)
                st.head_taylor = ph.T @ ph + (0 if st.head_taylor is None else st.head_taylor)
        return fn

    influence: dict[str, list[float]] = {}

    def layer_pre_hook(module, args, kwargs):
        x = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).detach()
        rho["inv"] = 1.0 / x.reshape(-1, x.shape[-1]).double().pow(2).mean(-1).clamp_min(1e-12)

    def layer_hook(name: str):
        def fn(module, args, kwargs, out):
            x = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).detach().float()
            y = (out[0] if isinstance(out, tuple) else out).detach().float()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            acc = influence.setdefault(name, [0.0, 0.0, 0])
            acc[0] += cos.sum().item()
            acc[1] += ((y - x).double().pow(2).sum(-1).reshape(-1) * rho["inv"]).sum().item()
            acc[2] += cos.numel()
        return fn

    for name in dict.fromkeys([*sumsq, *covariance, *taylor, *relative]):
        handles.append(modules[name].register_forward_pre_hook(pre_hook(name)))
    prefix, layer_list = decoder_layers(model)
    for i, layer in enumerate(layer_list):
        handles.append(layer.register_forward_pre_hook(layer_pre_hook, with_kwargs=True))
        if layers:
            handles.append(layer.register_forward_hook(layer_hook(f"{prefix}.{i}"), with_kwargs=True))
    grad = bool(taylor_names)
    if grad:
        # Frozen weights: gradients flow to activations only, from the embedding output onwards.
        handles.append(model.get_input_embeddings().register_forward_hook(
            lambda m, a, out: out.detach().requires_grad_(True)))
    grad_state = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = 0
    try:
        what = "importance and gradients" if grad else "importance"
        for w in tqdm(windows, desc=f"measuring {what}", unit="window", leave=False):
            ids = torch.tensor([w])
            last.clear()
            if grad:
                with torch.enable_grad():
                    logits = model(ids, use_cache=False).logits[0, :-1].float()
                    # Summed: each token's gradient is that token's own loss gradient.
                    torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
            else:
                with torch.inference_mode():
                    model(ids, use_cache=False)
            tokens += len(w) - 1
    finally:
        for h in handles:
            h.remove()
        for p, req in zip(model.parameters(), grad_state):
            p.requires_grad_(req)
    store = cache.setdefault(INPUTS, {})
    for name, st in found.items():
        st.tokens = tokens
        old = store.get(name)
        if old is not None and old.kept is None:
            # Keep what an earlier pass over the same inputs measured and this one did not.
            for field in ("covariance", "taylor", "head_taylor", "relative_covariance"):
                if getattr(st, field) is None:
                    setattr(st, field, getattr(old, field))
        store[name] = st
    if layers:
        cache[LAYERS] = {n: LayerImportance(1.0 - c / k, None, d / k) for n, (c, d, k) in influence.items()}


@torch.inference_mode()
def window_loss(model, windows) -> float:
    """Mean next-token loss (nats per token) over `windows`."""
    total, count = 0.0, 0
    for w in windows:
        ids = torch.tensor([w])
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(w) - 1
    return total / count


def skip_losses(model, windows, cache: dict, tokens: int = 256) -> None:
    """The loss increase when each decoder layer alone is skipped (its output replaced by its input), on the first
    `tokens` tokens of `windows`, into the cached LayerImportance."""
    from advisor.model import decoder_layers

    require_windows(windows)
    windows = [w[:tokens] for w in windows]
    prefix, layer_list = decoder_layers(model)
    base = window_loss(model, windows)
    layers = cache[LAYERS]

    def skip(module, args, kwargs, out):
        x = kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    for i, layer in enumerate(tqdm(layer_list, desc="skipping each layer", unit="layer", leave=False)):
        handle = layer.register_forward_hook(skip, with_kwargs=True)
        try:
            layers[f"{prefix}.{i}"].skip_loss = window_loss(model, windows) - base
        finally:
            handle.remove()
