"""GPTQ lowers the layer output error below round-to-nearest at the same format, and the layer-by-layer driver
quantizes every decoder linear of a real model into a checkpoint compressed-tensors reads."""

from __future__ import annotations

import torch

from advisor.quantize.gptq import gptq_quantize
from advisor.quantize.rtn import pair_sums, quantize_weight
from advisor.schemes import QuantArgs

W4G32 = QuantArgs(4, "int", True, "group", group_size=32)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(128, 128, generator=gen)
    x = torch.randn(2048, 128, generator=gen) @ mix  # correlated input channels, as real activations are
    w = torch.randn(64, 128, generator=gen)
    h = 2 * x.T @ x / x.shape[0]
    ref = x @ w.T

    def err(q):
        return ((x @ q.dequantize().T - ref).pow(2).mean() / ref.pow(2).mean()).item()

    rtn, gptq = quantize_weight(w, W4G32), gptq_quantize(w, h, W4G32)
    assert gptq.codes.min() >= -8 and gptq.codes.max() <= 7 and gptq.scale.shape == (64, 4)
    assert err(gptq) < 0.7 * err(rtn)


def test_scale_search_uses_the_full_signed_grid_where_it_rounds_better():
    from advisor.quantize.gptq import search_scales

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(256, 64, generator=gen)
    scale = search_scales(w, W4G32)
    assert (scale < 0).any() and (scale > 0).any()  # the sign follows each group's largest weight

    def group_err(s):
        view = w.view(256, 2, 32)
        return (torch.round(view / s.unsqueeze(-1)).clamp(-8, 7) * s.unsqueeze(-1) - view).pow(2).sum(-1)

    absmax = w.view(256, 2, 32).abs().amax(-1)
    # Never worse than either plain grid, group by group.
    assert torch.all(group_err(scale) <= group_err(absmax / 7.5) + 1e-6)
    signed = torch.where(w.view(256, 2, 32).amax(-1) >= absmax, -absmax, absmax) / 8
    assert torch.all(group_err(scale) <= group_err(signed) + 1e-6)


def test_gptq_raises_its_dampening_where_the_hessian_is_not_positive_definite():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 64, generator=gen)  # fewer tokens than channels: XᵀX is singular
    h = 2 * x.T @ x / 16
    h -= 0.05 * torch.diag(h).mean() * torch.eye(64)  # and slightly indefinite, as a low-precision sum can be
    w = torch.randn(32, 64, generator=gen)
    q = gptq_quantize(w, h, W4G32)
    assert q.codes.min() >= -8 and q.codes.max() <= 7 and torch.isfinite(q.scale).all()


def test_gptq_keeps_the_int8_pair_limit_in_any_column_order():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=gen) * torch.linspace(0.1, 3, 64)[torch.randperm(64, generator=gen)]
    w = torch.where(torch.rand(32, 64, generator=gen) < 0.5, 1.0, -1.0) * (0.7 + 0.3 * torch.rand(32, 64, generator=gen))
    h = 2 * x.T @ x / 512
    for act_order in (True, False):
        q = gptq_quantize(w, h, QuantArgs(8, "int", True, "channel"), pair_sum=128, act_order=act_order).codes.int()
        assert int(pair_sums(q).max()) <= 128
        assert int(q.abs().max()) > 64  # the limit binds on pairs, not on every code


def test_sequential_gptq_exports_a_readable_checkpoint(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from advisor.compress import Compressed, CompressReport
    from advisor.export import load_for_eval, write_checkpoint
    from advisor.model import inspect_structure, load_model
    from advisor.plan import scheme_of
    from advisor.quantize.sequential import quantize_sequential
    from advisor.recommend import Choices, recommend
    from advisor.targets import get_target

    structure = inspect_structure(tiny_llama_dir)
    plan = recommend(structure, get_target("a10g"), Choices(scheme="w4a16", method="gptq"))
    recipe = plan.recipe
    model = load_model(tiny_llama_dir)
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 1024, (64,), generator=gen).tolist() for _ in range(4)]
    args = scheme_of(recipe).weights
    wanted = {li.name for li in structure.linears}
    quantized = quantize_sequential(model, wanted, windows, lambda n, w, h: gptq_quantize(w, h, args))
    assert set(quantized) == {li.name for li in structure.linears}
    write_checkpoint(Compressed(model, plan, quantized, CompressReport()), tmp_path)
    ids = torch.tensor([windows[0]])
    with torch.inference_mode():
        ours = load_for_eval(tmp_path)(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(ids).logits
        written = model(ids).logits  # the model now holds the dequantized GPTQ weights
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - written).abs().max() < 1e-4


def test_true_sequential_stages_follow_the_layer_dataflow(tiny_llama_dir):
    from advisor.model import load_model
    from advisor.quantize.sequential import decoder_layers, layer_arguments, stages

    model = load_model(tiny_llama_dir)
    _, layers = decoder_layers(model)
    hidden, arguments = layer_arguments(model, layers, [list(range(16))])
    args, kwargs = arguments[0][0]
    sample = ((hidden[0], *args), kwargs)
    names = {n: m for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    got = [[n.rsplit(".", 1)[-1] for n in stage] for stage in stages(layers[0], names, sample)]
    assert got == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
