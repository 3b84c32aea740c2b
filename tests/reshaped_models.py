"""Reshape a tiny model in place as structural actions do (fewer MLP channels, one KV group fewer, a linear stored as
two low-rank factors), so the architecture side (advisor.architecture, serving/vllm_hubc.py) is tested on every
shape it must describe. Plain slicing and SVD: which channels, heads or singular values survive does not matter here.
"""

from __future__ import annotations

import torch

from advisor.lowrank import LowRankLinear


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def prune_mlp(layer, width: int) -> None:
    """Keep the first `width` intermediate channels of a layer's gate/up/down projections."""
    mlp = layer.mlp
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        setattr(mlp, name, _linear(old.weight[:width], None if old.bias is None else old.bias[:width]))
    mlp.down_proj = _linear(mlp.down_proj.weight[:, :width], mlp.down_proj.bias)


def drop_kv_group(layer, head_dim: int, group: int = -1) -> None:
    """Remove one KV group: its key and value heads, the query heads that read them, and their o_proj inputs."""
    attn = layer.self_attn
    kv = attn.k_proj.out_features // head_dim
    heads = attn.q_proj.out_features // head_dim
    group %= kv
    per = heads // kv

    def rows(n_heads: int, drop: range) -> torch.Tensor:
        return torch.tensor([i for h in range(n_heads) if h not in drop for i in range(h * head_dim, (h + 1) * head_dim)])

    q_rows = rows(heads, range(group * per, (group + 1) * per))
    kv_rows = rows(kv, range(group, group + 1))
    for name, keep in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        old = getattr(attn, name)
        setattr(attn, name, _linear(old.weight[keep], None if old.bias is None else old.bias[keep]))
    attn.o_proj = _linear(attn.o_proj.weight[:, q_rows], attn.o_proj.bias)


def factorize(module, name: str, rank: int) -> None:
    """Replace linear `name` of `module` by its rank-`rank` truncated SVD, as a LowRankLinear."""
    dense = getattr(module, name)
    u, s, vh = torch.linalg.svd(dense.weight.detach().float(), full_matrices=False)
    factors = LowRankLinear.from_factors((u[:, :rank] * s[:rank]).to(dense.weight.dtype),
                                         vh[:rank].to(dense.weight.dtype), dense.bias)
    setattr(module, name, factors)


def reshape_every_way(model) -> None:
    """Layer 0: MLP 128 → 96 channels and q_proj factorized (rank 32); layer 1: one KV group fewer and down_proj
    factorized (rank 32). The shapes then differ per layer and two linears are factors."""
    layers = model.model.layers
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads
    prune_mlp(layers[0], 96)
    factorize(layers[0].self_attn, "q_proj", 32)
    drop_kv_group(layers[1], head_dim)
    factorize(layers[1].mlp, "down_proj", 32)
