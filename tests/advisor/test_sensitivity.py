"""The per-layer quantization cost ranks layers as measuring them one at a time does, and the dense budget keeps
the costliest ones (fused siblings together) without exceeding it."""

from __future__ import annotations

import pytest
import torch

from advisor.quantize.rtn import fake_quantize_activations, quantize_weight
from advisor.schemes import get_scheme
from advisor.sensitivity import LayerCost, choose_dense, quantization_costs

W8A8 = get_scheme("w8a8-int8")


def _outlier_llama():
    """A tiny Llama whose layer-0 MLP input has three outlier channels (per-token int8 activations lose there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, vocab_size=256, initializer_range=0.2)).eval()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[:3] += 60.0
    return model


def _windows(n=4, length=48):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (length,), generator=gen).tolist() for _ in range(n)]


@torch.inference_mode()
def _kl_when_quantized(model, names, windows):
    """Measured KL(base || model with only `names` quantized as W8A8), per token."""
    modules = dict(model.named_modules())
    ids = torch.tensor(windows)
    base = torch.log_softmax(model(ids).logits.float(), -1)
    saved = {n: modules[n].forward for n in names}
    for n in names:
        m = modules[n]
        w = quantize_weight(m.weight.float(), W8A8.weights).dequantize()
        m.forward = lambda x, w=w, m=m: torch.nn.functional.linear(
            fake_quantize_activations(x, W8A8.input_activations), w, m.bias)
    try:
        quant = torch.log_softmax(model(ids).logits.float(), -1)
    finally:
        for n, f in saved.items():
            modules[n].forward = f
    return (base.exp() * (base - quant)).sum(-1).mean().item()


def test_cost_matches_the_loss_of_quantizing_each_layer_alone():
    from scipy.stats import spearmanr

    model = _outlier_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    windows = _windows()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    costs = quantization_costs(model, dict.fromkeys(names, W8A8), windows)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # measuring changes nothing
    assert all(p.requires_grad for p in model.parameters())  # and gives the grad flags back
    assert set(costs) == set(names) and all(c.cost >= 0 for c in costs.values())

    measured = [_kl_when_quantized(model, [n], windows) for n in names]
    estimated = [costs[n].cost for n in names]
    assert spearmanr(measured, estimated).statistic > 0.9
    # Second order: the estimate has the measured loss's magnitude, not just its rank, where the loss is not noise.
    ratios = [e / m for e, m in zip(estimated, measured) if m > 1e-5]
    assert ratios and all(0.3 < r < 3 for r in ratios)


def _cost(name, cost, params):
    return name, LayerCost(name, cost, params)


def test_choose_dense_keeps_fused_siblings_together_and_counts_layers_already_dense():
    costs = dict([_cost("m.layers.0.self_attn.q_proj", 9.0, 100), _cost("m.layers.0.self_attn.k_proj", 0.0, 50),
                  _cost("m.layers.0.self_attn.v_proj", 0.0, 50), _cost("m.layers.0.mlp.down_proj", 1.0, 100),
                  _cost("m.layers.0.self_attn.o_proj", 0.1, 100)])
    qkv = (("m.layers.0.self_attn.q_proj", "m.layers.0.self_attn.k_proj", "m.layers.0.self_attn.v_proj"),)
    # q alone is the costliest per parameter, but it only goes dense with k and v (200 parameters).
    assert sorted(choose_dense(costs, 200 / 400, qkv)) == ["m.layers.0.self_attn.k_proj", "m.layers.0.self_attn.q_proj",
                                                      "m.layers.0.self_attn.v_proj"]
    assert choose_dense(costs, 150 / 400, qkv) == ["m.layers.0.mlp.down_proj"]
    # 100 parameters already dense use up a 20% budget of 500.
    assert choose_dense(costs, 100 / 500, qkv, already_dense_params=100) == []


def test_pipeline_records_the_kept_layers_in_the_recipe_and_the_checkpoint(tiny_llama_dir, tmp_path):
    import json

    from transformers import AutoTokenizer

    from advisor.calibrate import Calibration
    from advisor.compress import compress
    from advisor.export import load_for_eval, write_checkpoint
    from advisor.model import inspect_structure, load_model
    from advisor.plan import DENSE, resolve
    from advisor.recommend import Choices, recommend
    from advisor.targets import get_target

    structure = inspect_structure(tiny_llama_dir)
    plan = recommend(structure, get_target("cpu"), Choices(
        scheme="w8a8-int8", smoothing="none", dense_budget=0.1,
        calibration={"text": "wikitext2-valid", "windows": 2, "seq_len": 64}))
    assert plan.recipe.dense_budget == 0.1 and plan.recipe.calibration is not None
    model = load_model(tiny_llama_dir)
    compressed = compress(model, plan, Calibration.of(plan.recipe, AutoTokenizer.from_pretrained(tiny_llama_dir)))
    kept, report = compressed.plan, compressed.report
    dense = [n for n, v in kept.recipe.actions.items() if v == DENSE]
    assert dense and sorted(dense) == sorted(report.kept_dense)
    sizes = {li.name: li.in_features * li.out_features for li in structure.linears}
    assert sum(sizes[n] for n in dense) <= 0.1 * sum(sizes.values())
    resolve(kept.recipe, structure, get_target("cpu"))  # fused siblings share a scheme
    assert all(kept.linears[n] is None for n in dense)

    out = tmp_path / "ckpt"
    out.mkdir()
    write_checkpoint(compressed, out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(dense) <= set(config["ignore"])
    variant = load_for_eval(out)
    assert all(type(m).__name__ == "Linear" for n, m in variant.named_modules() if n in dense)


@pytest.mark.parametrize("budget", [1.5, -0.1, "1%", True])
def test_recipe_rejects_a_dense_budget_that_is_not_a_share(budget):
    from advisor.errors import AdvisorError
    from advisor.recipe import Recipe

    text = Recipe(scheme="w8a8-int8", target="cpu").to_yaml().replace("dense_budget: 0.0", f"dense_budget: {budget}")
    with pytest.raises(AdvisorError, match="dense_budget"):
        Recipe.from_yaml(text)


def test_dense_budget_defaults_to_two_percent_where_activations_are_quantized(tiny_llama_dir):
    from advisor.model import inspect_structure
    from advisor.recommend import Choices, recommend
    from advisor.targets import get_target

    structure = inspect_structure(tiny_llama_dir)
    vnni = get_target("cpu", flags={"avx2", "avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_vnni"})
    avx2 = get_target("cpu", flags={"avx2"})
    assert vnni.int8_pair_sum is None and avx2.int8_pair_sum is not None
    assert recommend(structure, vnni, Choices(scheme="w8a8-int8")).recipe.dense_budget == 0.02
    # Under the int8 pair limit (no VNNI) the codes are coarser: 3%.
    assert recommend(structure, avx2, Choices(scheme="w8a8-int8")).recipe.dense_budget == 0.03
    from advisor.recommend import default_dense_budget
    from advisor.schemes import get_scheme

    assert default_dense_budget(get_scheme("fp8"), avx2) == (0.02, "dense")  # the pair limit is int8's only
    gpu = recommend(structure, get_target("a10g"), Choices(scheme="w4a16")).recipe
    assert (gpu.dense_budget, gpu.budget_scheme) == (0.3, "w8a16")  # 4 bits: the costliest weights at 8 bits
    assert recommend(structure, get_target("a10g"), Choices(scheme="w8a16")).recipe.dense_budget == 0.0
    assert recommend(structure, get_target("cpu"), Choices(scheme="w8a8-int8", dense_budget=0.0)).recipe.calibration is not None  # smoothing


@pytest.mark.parametrize("kind", ["qwen3", "gemma2", "phi3"])
def test_every_linear_gets_a_cost_on_other_architectures(kind):
    """q/k norms (Qwen3), scaled and tied embeddings with sandwich norms (Gemma 2), fused qkv/gate_up (Phi-3)."""
    import transformers

    cls, cfg = {"qwen3": ("Qwen3ForCausalLM", "Qwen3Config"), "gemma2": ("Gemma2ForCausalLM", "Gemma2Config"),
                "phi3": ("Phi3ForCausalLM", "Phi3Config")}[kind]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, vocab_size=256, initializer_range=0.2, pad_token_id=0)).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    costs = quantization_costs(model, dict.fromkeys(names, W8A8), _windows(2, 32))
    assert set(costs) == set(names)
    assert all(0 < c.cost < float("inf") for c in costs.values())


def test_calibrated_methods_rank_layers_without_the_pair_limit_rounding_to_nearest_has(tiny_llama_dir):
    """GPTQ and learned rounding work around an int8 pair limit; only round-to-nearest keeps its whole cost."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from advisor.calibrate import Calibration
    from advisor.compress import CompressReport, keep_sensitive_dense
    from advisor.model import inspect_structure, load_model
    from advisor.plan import resolve
    from advisor.recipe import Recipe
    from advisor.targets import get_target

    structure = inspect_structure(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = load_model(tiny_llama_dir)
    base = resolve(Recipe(scheme="w8a8-int8", target="cpu", dense_budget=0.1,
                          calibration={"text": "wikitext2-valid", "windows": 2, "seq_len": 64}),
                   structure, get_target("cpu"))
    windows = Calibration.of(base.recipe, tokenizer).windows

    def cost(**changes):
        report = CompressReport()
        keep_sensitive_dense(model, replace(base, recipe=replace(base.recipe, **changes)), windows, report)
        return report.quantization_cost

    unconstrained = cost(method="rtn", int8_pair_sum=None)
    assert cost(method="autoround", int8_pair_sum=128) == unconstrained
    assert cost(method="gptq", int8_pair_sum=128) == unconstrained
    assert cost(method="rtn", int8_pair_sum=128) > unconstrained
