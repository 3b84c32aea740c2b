"""A model reshaped in place (per-layer MLP widths and heads, factorized linears) becomes a checkpoint transformers
loads, with no remote code, as the model it was in memory; uniform shapes keep the model's own architecture; the
architectures hubc cannot describe are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import build_tiny_llama
from reshaped_models import drop_kv_group, factorize, prune_mlp, reshape_every_way
from tiny_models import build_tiny_model

from advisor.architecture import HubcLlamaConfig, adopt, check_reshape, supports_reshape
from advisor.errors import ShapeError
from advisor.model import inspect_structure, load_model, structure_of

IDS = torch.tensor([[1, 17, 25, 9, 33, 60, 42, 7, 51, 12]])


def _source(tmp_path, model_type: str):
    folder = tmp_path / model_type
    return build_tiny_llama(folder) if model_type == "llama" else build_tiny_model(folder, model_type)


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_per_layer_shapes_and_factors_round_trip_through_a_hubc_checkpoint(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_model(_source(tmp_path, model_type))
    reshape_every_way(model)
    before = _logits(model)
    adopted = adopt(model)
    config = adopted.config
    assert config.model_type == f"hubc_{model_type}" and config.architectures == [type(adopted).__name__]
    assert config.hubc_layers[:2] == [  # every tiny model has 4 query heads in 2 KV groups
        {"intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2},
        {"intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1},
    ]
    assert config.hubc_low_rank == {"model.layers.0.self_attn.q_proj": 32, "model.layers.1.mlp.down_proj": 32}
    assert config.head_dim == 32 and not adopted.training
    torch.testing.assert_close(_logits(adopted), before, rtol=0, atol=0)

    adopted.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == f"hubc_{model_type}" and "auto_map" not in saved
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)  # no trust_remote_code
    torch.testing.assert_close(_logits(loaded), before, rtol=1e-5, atol=1e-5)

    # Per-layer shapes read from the modules; the factors are linears of their own, and a hubc checkpoint can be
    # compressed again (its skeleton traced on the meta device through the registered class).
    structure = inspect_structure(tmp_path / "out")
    assert [(li.attention_heads, li.kv_heads, li.mlp_width) for li in structure.layers][:2] == [(4, 2, 96), (2, 1, 128)]
    names = {li.name for li in structure.linears}
    assert {"model.layers.0.self_attn.q_proj.u", "model.layers.0.self_attn.q_proj.v",
            "model.layers.1.mlp.down_proj.u", "model.layers.1.mlp.down_proj.v"} <= names
    assert "model.layers.1.mlp.down_proj" not in names
    assert structure.layers == structure_of(loaded).layers


def test_uniform_shapes_keep_the_models_own_architecture(tmp_path):
    model = load_model(_source(tmp_path, "llama"))
    for layer in model.model.layers:
        prune_mlp(layer, 96)
        drop_kv_group(layer, 32)
    before = _logits(model)
    adopted = adopt(model)
    config = adopted.config
    assert type(adopted).__name__ == "LlamaForCausalLM" and config.architectures == ["LlamaForCausalLM"]
    assert (config.model_type, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == ("llama", 96, 2, 1, 32)
    assert not hasattr(config, "hubc_layers")
    torch.testing.assert_close(_logits(adopted), before, rtol=0, atol=0)


def test_qwen2_with_fewer_heads_becomes_hubc_because_vllm_derives_its_head_size(tmp_path):
    # vLLM's Qwen2 computes head_dim as hidden_size // heads: 128 // 2 = 64 would be wrong for heads of 32.
    model = load_model(_source(tmp_path, "qwen2"))
    for layer in model.model.layers:
        drop_kv_group(layer, 32)
    adopted = adopt(model)
    assert adopted.config.model_type == "hubc_qwen2" and adopted.config.hubc_low_rank == {}
    assert {layer["num_attention_heads"] for layer in adopted.config.hubc_layers} == {2}


def test_a_hubc_model_made_uniform_again_returns_to_its_base_architecture(tmp_path):
    model = load_model(_source(tmp_path, "qwen3"))
    prune_mlp(model.model.layers[0], 96)
    hubc = adopt(model)
    for layer in hubc.model.layers[1:]:
        prune_mlp(layer, 96)
    assert adopt(hubc).config.model_type == "qwen3"


def test_architectures_hubc_cannot_describe_are_refused_in_one_line(tmp_path):
    assert supports_reshape("llama") and supports_reshape("hubc_qwen3")
    assert supports_reshape("gemma2", uniform=True) and not supports_reshape("gemma2")
    assert not supports_reshape("phi3", uniform=True)
    with pytest.raises(ShapeError, match="phi3.*qkv_proj, gate_up_proj") as phi3:
        check_reshape("phi3", uniform=True)
    assert "\n" not in str(phi3.value) and "llama, mistral, qwen2, qwen3" in str(phi3.value)

    model = load_model(_source(tmp_path, "gemma"))
    factorize(model.model.layers[0].mlp, "down_proj", 32)
    with pytest.raises(ShapeError, match="'gemma' models per-layer shapes or factorized linears"):
        adopt(model)
    model = load_model(_source(tmp_path, "gemma"))
    for layer in model.model.layers:
        prune_mlp(layer, 96)
    assert adopt(model).config.model_type == "gemma"


def test_inconsistent_shapes_are_refused_with_the_layer_named(tmp_path):
    model = load_model(_source(tmp_path, "llama"))
    model.model.layers[1].mlp.gate_proj = torch.nn.Linear(64, 96, bias=False)
    with pytest.raises(ShapeError, match="model.layers.1: its linears disagree"):
        adopt(model)


def test_uniform_heads_that_llamas_config_cannot_state_become_hubc():
    from transformers import LlamaConfig, LlamaForCausalLM

    # transformers' Llama requires the hidden size to be a multiple of the head count: 96 is not one of 5.
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=6, num_key_value_heads=6, head_dim=32)).eval()
    drop_kv_group(model.model.layers[0], 32)
    before = _logits(model)
    adopted = adopt(model)
    assert adopted.config.model_type == "hubc_llama" and adopted.config.hubc_layers[0]["num_attention_heads"] == 5
    torch.testing.assert_close(_logits(adopted), before, rtol=0, atol=0)


def test_a_hubc_config_with_the_wrong_layer_count_is_refused_on_load():
    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises(StrictDataclassClassValidationError, match="hubc_layers must list 2 decoder layers"):
        HubcLlamaConfig(num_hidden_layers=2, hubc_layers=[
            {"intermediate_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1}])


def test_transformers_without_hubc_refuses_a_hubc_checkpoint(tmp_path):
    model = load_model(_source(tmp_path, "llama"))
    reshape_every_way(model)
    adopt(model).save_pretrained(tmp_path / "out")
    # A fresh interpreter that never imports hubc: what a user without hubc installed sees.
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "except ValueError as exc:\n    print(str(exc).splitlines()[0])\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, check=False)
    assert "advisor" not in result.stderr
    assert result.stdout.strip() == ("The checkpoint you are trying to load has model type `hubc_llama` but "
                                     "Transformers does not recognize this architecture. This could be because of "
                                     "an issue with the checkpoint, or because your version of Transformers is out "
                                     "of date.")
