"""Structured pruning: every weight sharing a pruned dimension is cut consistently, the pruned model runs, pruning
nothing changes nothing, removing what carries no activation changes nothing, and impossible plans are refused in
one line."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model

from advisor.actions import Prune, StructureContext, parse_action
from advisor.actions.prune import choose_heads, head_choices, kept_width
from advisor.errors import ShapeError
from advisor.model import load_model, structure_of


def _model(tmp_path, model_type="llama"):
    from helpers import build_tiny_llama

    folder = build_tiny_llama(tmp_path / "m") if model_type == "llama" else build_tiny_model(tmp_path / "m", model_type)
    model = load_model(folder)
    # structure_of traces a skeleton sharing the model's config, which leaves it on eager attention: read it once
    # here so outputs before and after pruning come from the same attention kernel.
    structure_of(model)
    return model


def _windows(n=3, length=48):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(4, 1000, (length,), generator=gen).tolist() for _ in range(n)]


@torch.inference_mode()
def _logits(model, windows):
    return model(torch.tensor(windows), use_cache=False).logits


def _prune(model, action, windows=None):
    structure = structure_of(model)
    units = {li.name: action for li in structure.layers}
    ctx = StructureContext(windows=windows or _windows(), structure=structure)
    Prune.apply(model, units, ctx)
    return ctx


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("importance", ["activation", "taylor", "wanda", "magnitude"])
def test_pruned_shapes_agree_and_the_model_runs(tmp_path, model_type, importance):
    model = _model(tmp_path, model_type)
    ctx = _prune(model, Prune(mlp=0.3, heads=0.5, importance=importance))
    assert ctx.reshaped
    for name, note in ctx.notes["prune"].items():
        layer = model.get_submodule(name)
        attn, mlp, d = layer.self_attn, layer.mlp, layer.self_attn.head_dim
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 96
        assert note["mlp_width"] == 96 and note["heads"] == len(note["kept_heads"])
        assert attn.q_proj.out_features == attn.o_proj.in_features == note["heads"] * d
        assert attn.k_proj.out_features == attn.v_proj.out_features == note["kv_heads"] * d
        assert note["heads"] % note["kv_heads"] == 0 and note["heads"] == 2
        if attn.q_proj.bias is not None:  # Qwen2
            assert attn.q_proj.bias.shape[0] == note["heads"] * d and attn.k_proj.bias.shape[0] == note["kv_heads"] * d
    out = _logits(model, _windows(1))
    assert torch.isfinite(out).all()


def test_pruning_nothing_keeps_outputs_exactly(tmp_path):
    model = _model(tmp_path)
    before = _logits(model, _windows(1))
    ctx = _prune(model, Prune(mlp=0.0, heads=0.0))
    assert not ctx.reshaped
    assert torch.equal(_logits(model, _windows(1)), before)


@pytest.mark.parametrize("importance", ["activation", "taylor", "wanda"])
def test_channels_and_heads_without_activation_are_the_ones_removed(tmp_path, importance):
    model = _model(tmp_path)
    d = model.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[32:64] = 0  # channels 32..63 never activate
            layer.mlp.up_proj.weight[32:64] = 0
            layer.self_attn.q_proj.weight[2 * d:] = 0  # KV group 1 (query heads 2, 3) outputs nothing
            layer.self_attn.k_proj.weight[d:] = 0
            layer.self_attn.v_proj.weight[d:] = 0
    before = _logits(model, _windows(1))
    ctx = _prune(model, Prune(mlp=0.25, heads=0.5, importance=importance))
    for note in ctx.notes["prune"].values():
        assert note["kept_heads"] == [0, 1] and note["heads_by"] == "group" and note["kv_heads"] == 1
    torch.testing.assert_close(_logits(model, _windows(1)), before, rtol=1e-5, atol=1e-5)


def test_head_choices_respect_kv_groups():
    assert head_choices(9, 3, 0.25) == [("group", 6), ("query", 6)]
    assert head_choices(32, 8, 0.25) == [("group", 24), ("query", 24)]
    assert head_choices(32, 8, 0.1) == [("group", 28)]  # 4 heads per group: whole groups come 4 at a time
    assert head_choices(9, 3, 0.1) == [("none", 9)]  # rounds to no pruning
    # Lower cost wins; equal cost goes to whole groups (they also drop k/v weights and KV cache).
    costs = [1.0, 1.0, 1.0, 0.1, 5.0, 5.0, 0.1, 5.0, 5.0]
    by_query = choose_heads(lambda hs: sum(costs[h] for h in hs), 9, 3, 0.25)
    assert by_query.mode == "query" and by_query.heads == [1, 2, 4, 5, 7, 8] and by_query.kv_heads == [0, 1, 2]
    by_group = choose_heads(lambda hs: sum(costs[h] for h in hs) * 0 + (0 if 0 in hs else 1), 9, 3, 0.25)
    assert by_group.mode == "group" and by_group.heads == [3, 4, 5, 6, 7, 8]


def test_kept_widths_are_multiples_of_32():
    assert kept_width(1536, 0.3) == 1088 and kept_width(1536, 0.0) == 1536 and kept_width(128, 0.9) == 32


def test_spec_round_trips_and_bad_specs_are_refused():
    action = parse_action({"prune": {"mlp": 0.3, "heads": 0.25, "importance": "magnitude"}})
    assert action == Prune(0.3, 0.25, "magnitude") and not action.calibrates
    assert parse_action(action.to_spec()) == action
    for bad in ({"mlp": 1.0}, {"mlp": -0.1}, {"heads": "half"}, {"mlp": 0.2, "width": 3}, {"importance": "x"}, 0.3):
        with pytest.raises(ShapeError):
            parse_action({"prune": bad})


def test_check_refuses_fused_layers_and_empty_layers(tmp_path):
    structure = structure_of(load_model(build_tiny_model(tmp_path / "phi3", "phi3")))
    with pytest.raises(ShapeError, match="fused") as err:
        Prune(mlp=0.2).check("model.layers.0", structure, None)
    assert "\n" not in str(err.value)
    structure = structure_of(_model(tmp_path))
    with pytest.raises(ShapeError, match="keeps none"):
        Prune(heads=0.8).check("model.layers.0", structure, None)
    Prune(mlp=0.5, heads=0.5).check("model.layers.0", structure, None)


def test_activation_importance_needs_calibration_text(tmp_path):
    model = _model(tmp_path)
    structure = structure_of(model)
    ctx = StructureContext(windows=None, structure=structure)
    with pytest.raises(Exception, match="calibration"):
        Prune.apply(model, {"model.layers.0": Prune(mlp=0.5)}, ctx)
    Prune.apply(model, {"model.layers.0": Prune(mlp=0.5, importance="magnitude")}, ctx)
    assert model.model.layers[0].mlp.down_proj.in_features == 64

