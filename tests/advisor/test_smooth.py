"""Smoothing moves activation range into weights without changing the full-precision model, on several
architectures, and lowers the error of the quantized layers it touches."""

from __future__ import annotations

import pytest
import torch

from advisor.calibrate import collect
from advisor.quantize import smooth
from advisor.schemes import get_scheme


def _model(kind: str):
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 512, "head_dim": 32}
    cls, cfg = {
        "llama": (LlamaForCausalLM, LlamaConfig),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config),  # q/k norms inside attention
        "gemma2": (Gemma2ForCausalLM, Gemma2Config),  # (1 + weight) norms, tied embeddings
    }[kind]
    torch.manual_seed(0)
    model = cls(cfg(**common)).eval()
    with torch.no_grad():  # give a few input channels outliers, as trained LLMs have
        for name, p in model.named_parameters():
            if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
                p[:3] += 20.0
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma2"])
def test_smoothing_keeps_the_model_and_reduces_quantization_error(kind):
    model = _model(kind)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 512, (64,), generator=gen).tolist() for _ in range(4)]
    probe = torch.tensor([windows[0]])
    with torch.inference_mode():
        before = model(probe).logits
    groups = smooth.find_groups(model, names, windows[0][:16])
    kinds = {(g.kind, g.consumers[0].rsplit(".", 1)[-1]) for g in groups}
    assert {("norm", "q_proj"), ("norm", "gate_proj"), ("rows", "down_proj"), ("heads", "o_proj")} <= kinds
    qkv = next(g for g in groups if g.consumers[0].endswith("q_proj"))
    assert sorted(c.rsplit(".", 1)[-1] for c in qkv.consumers) == ["k_proj", "q_proj", "v_proj"]

    stats = collect(model, names, windows, 128)
    choices = smooth.search_and_apply(model, groups, stats, dict.fromkeys(names, get_scheme("w8a8-int8")), None)
    with torch.inference_mode():
        after = model(probe).logits
    assert (after - before).abs().max() / before.abs().max() < 1e-4
    smoothed = [c for c in choices if c.alpha is not None]
    assert smoothed and all(c.error_after < c.error_before for c in smoothed)
    assert any(c.group.kind == "norm" for c in smoothed)  # the outlier channels were moved


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma2"])
def test_layer_by_layer_tracing_finds_the_whole_models_groups(kind):
    """Every group lies within one decoder layer: traced one layer at a time on the layer's own inputs, the groups
    are those of the whole model's trace, and no linear reads its layer's input as given."""
    from advisor.model import decoder_layers
    from advisor.quantize.sequential import layer_arguments

    model = _model(kind)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    ids = list(range(4, 20))
    whole = smooth.find_groups(model, names, ids)
    prefix, layers = decoder_layers(model)
    hidden, arguments = layer_arguments(model, layers, [ids])
    by_layer = []
    h = hidden[0]
    for i, layer in enumerate(layers):
        args, kwargs = arguments[i][0]
        groups, outside = smooth.find_layer_groups(layer, f"{prefix}.{i}.", names, (h, *args), kwargs)
        assert outside == []
        by_layer += groups
        with torch.inference_mode():
            out = layer(h, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    assert sorted(map(repr, by_layer)) == sorted(map(repr, whole)) and len(whole) == 4 * len(layers)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_activation_aware_scaling_protects_weight_only_quantization(kind):
    """Weight-only schemes get AWQ-style scaling: the full-precision model is unchanged and the 4-bit error of the
    layers reading outlier channels drops."""
    model = _model(kind)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 512, (64,), generator=gen).tolist() for _ in range(4)]
    probe = torch.tensor([windows[0]])
    with torch.inference_mode():
        before = model(probe).logits
    groups = smooth.find_groups(model, names, windows[0][:16])
    stats = collect(model, names, windows, 128)
    choices = smooth.search_and_apply(model, groups, stats, dict.fromkeys(names, get_scheme("w4a16").with_group_size(32)),
                                      None)
    with torch.inference_mode():
        after = model(probe).logits
    assert (after - before).abs().max() / before.abs().max() < 1e-4
    norm_groups = [c for c in choices if c.group.kind == "norm"]
    assert all(c.alpha is not None and c.error_after < 0.9 * c.error_before for c in norm_groups)
