"""Checkpoints hubc writes are read the same way by compressed-tensors (through transformers) as by hubc's own
evaluation, for every scheme; RTN respects each scheme's code range."""

from __future__ import annotations

import json

import pytest
import torch

from advisor.compress import compress
from advisor.errors import AdvisorError, ShapeError, UnsupportedSchemeError
from advisor.export import load_for_eval, quantization_config, write_checkpoint
from advisor.model import inspect_structure, load_model
from advisor.quantize.rtn import limit_pairs, pair_sums, quantize_weight
from advisor.recipe import Recipe
from advisor.recommend import Choices, recommend
from advisor.schemes import QuantArgs
from advisor.targets import get_target
from advisor.validate import check_group_size, choose_group_size

AVX2 = {"avx", "avx2", "fma"}
AVX512_VNNI = AVX2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}


def _export(model, plan, out, dtype=None):
    """Round-to-nearest needs no calibration text."""
    return write_checkpoint(compress(model, plan, None), out, dtype)


def test_rtn_int8_channel_error_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    qw = quantize_weight(w, QuantArgs(8, "int", True, "channel"))
    assert qw.codes.dtype == torch.int8 and qw.scale.shape == (32, 1)
    assert ((w - qw.dequantize()).abs() <= qw.scale / 2 + 1e-6).all()


def test_pair_limit_moves_only_the_pairs_above_it_to_the_nearest_allowed_codes():
    codes = torch.tensor([[-100.0, -90.0, 127.0, 1.0, 127.0, -128.0, 3.0, 5.0]])
    limited = limit_pairs(codes, 128)
    # Opposite signs never saturate the kernel's int16 pair sums: only the first pair moves.
    assert limited.tolist() == [[-69.0, -59.0, 127.0, 1.0, 127.0, -128.0, 3.0, 5.0]]
    # With the unrounded values given, the split follows them, not the rounded codes.
    real = torch.tensor([[-99.4, -90.6, 0, 0, 0, 0, 0, 0]])
    assert limit_pairs(codes, 128, real)[0, :2].tolist() == [-68.0, -60.0]


def test_rtn_under_a_pair_limit_keeps_it_and_beats_7bit_codes():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[:, 10] *= 6  # an outlier input channel, as activation-smoothed weights have
    args = QuantArgs(8, "int", True, "channel")
    limited = quantize_weight(w, args, pair_sum=128)
    assert int(pair_sums(limited.codes).max()) <= 128 and int(limited.codes.int().abs().max()) > 64
    scale7 = w.abs().amax(1, keepdim=True) / 63.5
    err7 = (torch.round(w / scale7).clamp(-64, 63) * scale7 - w).pow(2).sum()
    err_free = (quantize_weight(w, args).dequantize() - w).pow(2).sum()
    err = (limited.dequantize() - w).pow(2).sum()
    assert err_free < err < 0.5 * err7


def test_rtn_int4_group_codes_and_group_scales():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    qw = quantize_weight(w, QuantArgs(4, "int", True, "group", group_size=32))
    assert qw.scale.shape == (8, 4)
    assert qw.codes.min() >= -8 and qw.codes.max() <= 7
    with pytest.raises(ValueError):
        quantize_weight(torch.randn(8, 96), QuantArgs(4, "int", True, "group", group_size=64))


def test_group_size_is_chosen_per_model(tiny_llama_dir):
    structure = inspect_structure(tiny_llama_dir)  # hidden 64, MLP 128: 128 cannot divide q/k/v
    assert choose_group_size(structure) == 64
    with pytest.raises(ShapeError, match=r"model\.layers\.0\.self_attn\.q_proj.*--group-size 64"):
        check_group_size(structure, 128)


def test_plan_rejects_a_scheme_the_target_cannot_serve(tiny_llama_dir):
    structure = inspect_structure(tiny_llama_dir)
    cpu_avx2 = get_target("cpu", flags=AVX2)
    with pytest.raises(UnsupportedSchemeError, match="w4a16"):
        recommend(structure, cpu_avx2, Choices(scheme="w4a16"))
    with pytest.raises(UnsupportedSchemeError, match="w8a16"):
        recommend(structure, get_target("cpu", flags=AVX512_VNNI), Choices(scheme="w8a16"))


def test_plan_limits_int8_pairs_on_cpus_without_vnni(tiny_llama_dir):
    structure = inspect_structure(tiny_llama_dir)
    assert recommend(structure, get_target("cpu", flags=AVX2), Choices()).recipe.int8_pair_sum == 128
    assert recommend(structure, get_target("cpu", flags=AVX512_VNNI), Choices()).recipe.int8_pair_sum is None
    assert recommend(structure, get_target("a10g"), Choices(scheme="w8a8-int8")).recipe.int8_pair_sum is None


def test_defaults_calibrate_where_rounding_to_nearest_loses_too_much(tiny_llama_dir):
    """GPTQ for 4-bit weights and for int8 GEMMs under a pair limit, with 30% of a 4-bit model's weights kept at
    8 bits where the target serves w8a16; round-to-nearest elsewhere (benchmarks/results/default_method_*.md)."""
    structure = inspect_structure(tiny_llama_dir)
    avx2, vnni = get_target("cpu", flags=AVX2), get_target("cpu", flags=AVX512_VNNI)
    assert recommend(structure, avx2, Choices(method=None)).recipe.method == "gptq"
    assert recommend(structure, avx2, Choices(scheme="fp8", method=None)).recipe.method == "rtn"
    assert recommend(structure, vnni, Choices(method=None)).recipe.method == "rtn"
    assert recommend(structure, avx2, Choices(method="autoround")).recipe.method == "autoround"
    gpu = recommend(structure, get_target("a10g"), Choices(method=None)).recipe
    assert (gpu.scheme, gpu.method, gpu.dense_budget, gpu.budget_scheme) == ("w4a16", "gptq", 0.3, "w8a16")
    cpu4 = recommend(structure, vnni, Choices(scheme="w4a16", method=None)).recipe  # no w8a16 kernel on CPUs: nothing raised
    assert (cpu4.method, cpu4.dense_budget) == ("gptq", 0.0)
    assert recommend(structure, get_target("a10g"), Choices(scheme="w8a16", method=None)).recipe.method == "rtn"
    with pytest.raises(ShapeError, match="no more bits"):
        recommend(structure, get_target("a10g"), Choices(scheme="w8a16", dense_budget=0.1, budget_scheme="w4a16"))


def test_recipe_round_trips_and_rejects_unknown_keys():
    recipe = Recipe(scheme="w4a16", target="a10g", group_size=64, ignore=["lm_head"])
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    with pytest.raises(Exception, match="unknown recipe keys: module_path"):
        Recipe.from_yaml(recipe.to_yaml() + "module_path: os.system\n")


@pytest.mark.parametrize(
    "scheme,target,atol",
    [("w4a16", "a10g", 1e-4), ("w8a16", "a10g", 1e-4), ("fp8", "h100", 1e-3), ("w8a8-int8", "cpu", 0.05)],
)
def test_checkpoint_reads_the_same_in_compressed_tensors_and_hubc(tiny_llama_dir, tmp_path, scheme, target, atol):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    structure = inspect_structure(tiny_llama_dir)
    plan = recommend(structure, get_target(target, flags=AVX512_VNNI), Choices(scheme=scheme, method="rtn", smoothing="none", dense_budget=0))
    model = load_model(tiny_llama_dir)
    result = _export(model, plan, tmp_path)
    assert result.quantized_modules == len(structure.linears) == 14

    config = json.loads((tmp_path / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["ignore"] == ["lm_head"]
    QuantizationConfig.model_validate(qcfg)  # compressed-tensors' own parser accepts it
    assert qcfg == quantization_config(plan)

    ours = load_for_eval(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 1024, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b, base = ours(ids).logits, theirs(ids).logits, model(ids).logits
    assert (a - b).abs().max().item() < atol
    assert (a - base).abs().max().item() > 0  # quantization really happened



@pytest.mark.parametrize("scheme,target,scale_dtype", [
    ("w4a16", "a10g", torch.bfloat16), ("w8a16", "t4", torch.float16), ("w8a8-int8", "cpu", torch.float32),
])
def test_checkpoint_is_written_in_the_targets_dtype(tiny_llama_dir, tmp_path, scheme, target, scale_dtype):
    """Unquantized tensors in the 16-bit dtype the target serves, scales in the dtype vLLM's kernel holds them in
    (the weight-only kernels: the model's; int8/FP8 GEMMs: float32), and config.json saying so."""
    from safetensors import safe_open

    structure = inspect_structure(tiny_llama_dir)
    t = get_target(target, flags=AVX512_VNNI)
    plan = recommend(structure, t, Choices(scheme=scheme, method="rtn", smoothing="none", dense_budget=0))
    model = load_model(tiny_llama_dir)
    dtype = getattr(torch, t.checkpoint_dtype)
    assert dtype == (torch.float16 if target == "t4" else torch.bfloat16)
    _export(model, plan, tmp_path, dtype=dtype)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    want = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == want[dtype]
    assert dtypes["model.layers.0.self_attn.q_proj.weight_scale"] == want[scale_dtype]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == t.checkpoint_dtype
    # The evaluation reads exactly these tensors back: the embedding it computes with is the rounded one.
    ours = load_for_eval(tmp_path)
    assert torch.equal(ours.model.embed_tokens.weight, model.model.embed_tokens.weight.to(dtype).float())


def test_base_size_is_counted_in_the_checkpoint_dtype(tiny_llama_dir):
    from hubplugin.outfolder import weights_size, weights_size_in

    as_given = weights_size(tiny_llama_dir)  # the tiny model is written in float32
    half = weights_size_in(tiny_llama_dir, "bfloat16")
    assert weights_size_in(tiny_llama_dir, "float32") == pytest.approx(as_given, abs=64)
    assert half == pytest.approx(as_given / 2, rel=0.01)


VLLM_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@pytest.fixture(scope="module")
def vllm_scheme_of(tiny_llama_dir):
    """vLLM's own compressed-tensors scheme selection for a layer (as its model loader calls it), runnable without
    the GPU the scheme targets."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    with set_current_vllm_config(VllmConfig(model_config=ModelConfig(model=str(tiny_llama_dir), dtype="bfloat16"))):
        def select(qcfg: dict, layer: str) -> str | None:
            config = CompressedTensorsConfig.from_config(qcfg)
            config.packed_modules_mapping = VLLM_FUSED
            scheme = config.get_scheme(torch.nn.Linear(8, 8), layer)
            return None if scheme is None else type(scheme).__name__

        yield select


@pytest.mark.parametrize("scheme,target,expected", [
    ("w4a16", "a10g", "CompressedTensorsWNA16"), ("w8a16", "t4", "CompressedTensorsWNA16"),
    ("fp8", "h100", "CompressedTensorsW8A8Fp8"), ("w8a8-int8", "l4", "CompressedTensorsW8A8Int8"),
])
def test_vllm_selects_the_intended_kernel_scheme_for_gpu_targets(tiny_llama_dir, vllm_scheme_of, scheme, target, expected):
    qcfg = quantization_config(recommend(inspect_structure(tiny_llama_dir), get_target(target), Choices(scheme=scheme)))
    assert vllm_scheme_of(qcfg, "model.layers.0.self_attn.qkv_proj") == expected
    assert vllm_scheme_of(qcfg, "model.layers.1.mlp.down_proj") == expected
    assert vllm_scheme_of(qcfg, "lm_head") is None


def test_mixed_precision_recipe_exports_config_groups_every_reader_agrees_on(tiny_llama_dir, tmp_path, vllm_scheme_of):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    structure = inspect_structure(tiny_llama_dir)
    overrides = {
        r"re:.*\.mlp\.down_proj": "w8a8-int8",
        "model.layers.0.mlp.gate_proj": "w8a16",
        "model.layers.0.mlp.up_proj": "w8a16",
        "model.layers.1.self_attn.o_proj": "dense",
    }
    plan = recommend(structure, get_target("h100"), Choices(scheme="w4a16", actions=overrides, method="rtn", smoothing="none", dense_budget=0))
    assert Recipe.from_yaml(plan.recipe.to_yaml()) == plan.recipe
    model = load_model(tiny_llama_dir)
    dense_weight = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    result = _export(model, plan, tmp_path)
    assert result.quantized_modules == len(structure.linears) - 1

    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qcfg)
    assert qcfg["format"] == "mixed-precision" and len(qcfg["config_groups"]) == 3
    assert set(qcfg["ignore"]) == {"lm_head", "model.layers.1.self_attn.o_proj"}
    expect = {
        "model.layers.0.self_attn.qkv_proj": "CompressedTensorsWNA16",
        "model.layers.0.mlp.gate_up_proj": "CompressedTensorsWNA16",
        "model.layers.1.mlp.gate_up_proj": "CompressedTensorsWNA16",
        "model.layers.0.mlp.down_proj": "CompressedTensorsW8A8Int8",
        "model.layers.1.self_attn.o_proj": None,
    }
    assert {layer: vllm_scheme_of(qcfg, layer) for layer in expect} == expect

    ours = load_for_eval(tmp_path)
    assert torch.equal(ours.model.layers[1].self_attn.o_proj.weight, dense_weight)
    assert ours.model.layers[0].mlp.down_proj.act_args is not None  # int8 activations where W8A8
    assert ours.model.layers[0].mlp.gate_proj.act_args is None
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 1024, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = ours(ids).logits, theirs(ids).logits
    assert (a - b).abs().max().item() < 0.05


@pytest.mark.parametrize("overrides,match", [
    ({"model.layers.0.self_attn.q_proj": "w8a16"}, "vLLM fuses q_proj/k_proj/v_proj"),
    ({"model.layers.0.mlp.gate_proj": "dense"}, "vLLM fuses gate_proj/up_proj"),
    ({"model.layers.9.mlp.down_proj": "w8a16"}, "matches no quantizable linear"),
    ({"re:.*down_proj": "int3"}, "unknown recipe action 'int3'"),
    ({"model.layers.0": "remove-layer", "model.layers.1": "remove-layer"}, "removes every decoder layer"),
    ({"model.layers.7": "remove-layer"}, "matches no decoder layer"),
    ({"model.layers.0.mlp": "remove-layer"}, "matches no decoder layer"),
])
def test_mixed_precision_recipe_errors_name_the_module_and_fix(tiny_llama_dir, overrides, match):
    structure = inspect_structure(tiny_llama_dir)
    with pytest.raises(AdvisorError, match=match):
        recommend(structure, get_target("h100"), Choices(scheme="w4a16", actions=overrides))


@pytest.mark.parametrize("target", ["cpu", "l4"])
def test_asymmetric_activations_reach_vllms_int8_scheme(tiny_llama_dir, vllm_scheme_of, target):
    """vLLM takes a per-token zero point for int8 activations (CPU oneDNN, CUDA CUTLASS): the exported config must
    select its W8A8 int8 scheme with asymmetric input quantization."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    qcfg = quantization_config(recommend(inspect_structure(tiny_llama_dir), get_target(target, flags=AVX512_VNNI),
                                         Choices(scheme="w8a8-int8", activations="asymmetric")))
    assert vllm_scheme_of(qcfg, "model.layers.0.mlp.down_proj") == "CompressedTensorsW8A8Int8"
    groups = CompressedTensorsConfig.from_config(qcfg).target_scheme_map.values()
    assert {g["input_activations"].symmetric for g in groups} == {False}


@pytest.mark.parametrize("damage", ["scale shape", "packed shape", "config group"])
def test_reading_back_a_damaged_quantized_checkpoint_fails_in_one_hinted_error(tiny_llama_dir, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from advisor.errors import DamagedWeightsError

    plan = recommend(inspect_structure(tiny_llama_dir), get_target("a10g"),
                     Choices(scheme="w4a16", method="rtn", smoothing="none", dense_budget=0))
    _export(load_model(tiny_llama_dir), plan, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    if damage == "scale shape":
        state[f"{name}.weight_scale"] = state[f"{name}.weight_scale"][:32].contiguous()
    elif damage == "packed shape":
        state[f"{name}.weight_shape"] = torch.tensor([64, 256])
    else:
        config = json.loads((tmp_path / "config.json").read_text())
        config["quantization_config"]["config_groups"]["group_0"]["targets"] = ["Embedding"]
        (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DamagedWeightsError) as info:
        load_for_eval(tmp_path)
    assert info.value.hint and "\n" not in info.value.message


def test_a_head_size_vllm_cpu_cannot_serve_is_refused_before_work_for_cpu_only(tmp_path):
    from helpers import build_tiny_llama

    structure = inspect_structure(build_tiny_llama(tmp_path / "h16", head_dim=16))
    with pytest.raises(ShapeError, match="heads of size 16"):
        recommend(structure, get_target("cpu", flags=AVX512_VNNI), Choices())
    assert recommend(structure, get_target("a10g"), Choices(method="rtn", dense_budget=0)).recipe.scheme == "w4a16"
