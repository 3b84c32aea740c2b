"""advisor.weight_files: intact checkpoints in every naming hubc meets pass, damaged ones fail naming the file; the
CLI side of each damage is tests/hubplugin/test_damaged_weights.py."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from advisor.errors import DamagedWeightsError
from advisor.weight_files import check_weight_files, config_weights


@pytest.fixture
def model(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny Llama a test may damage."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


def edit_state(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state = edit(state) or state
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def drop(*names: str):
    """An edit_state edit removing tensors."""
    return lambda state: {k: v for k, v in state.items() if k not in names}


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_header(file: Path, edit) -> None:
    """Rewrite a safetensors header in place, keeping the data bytes."""
    raw = file.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


def damaged(folder: Path, *fragments: str) -> str:
    with pytest.raises(DamagedWeightsError) as info:
        check_weight_files(folder)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_the_tiny_model_passes_and_its_weights_come_from_config(model):
    check_weight_files(model)
    weights = config_weights(model)
    assert weights is not None and weights.prefix == "model"
    shapes = {name: w.shape for w in weights.params for name in w.names}
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (64, 64)  # 2 KV heads of 32
    assert not any("inv_freq" in name for name in shapes)  # buffers are not weights
    assert any("inv_freq" in name for name in weights.buffers)


def test_a_tied_output_head_may_be_absent_an_untied_one_may_not(model):
    edit_state(model, drop("lm_head.weight"))
    damaged(model, "'lm_head.weight'", str(model))
    edit_config(model, tie_word_embeddings=True)
    check_weight_files(model)
    tied = next(w for w in config_weights(model).params if "lm_head.weight" in w.names)
    assert set(tied.names) == {"lm_head.weight", "model.embed_tokens.weight"}


def test_names_without_the_base_model_prefix_and_stored_buffers_pass(model):
    import torch

    edit_config(model, tie_word_embeddings=True)

    def strip(state):
        state = {k.removeprefix("model."): v for k, v in state.items() if k != "lm_head.weight"}
        state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # older checkpoints stored it
        return state

    edit_state(model, strip)
    check_weight_files(model)
    edit_state(model, drop("norm.weight"))
    damaged(model, "'model.norm.weight'")


def test_compressed_tensors_names_pass_and_a_missing_packed_weight_does_not(model):
    import torch

    edit_config(model, quantization_config={"quant_method": "compressed-tensors", "format": "pack-quantized"})

    def pack(state):
        for i in range(2):
            name = f"model.layers.{i}.mlp.down_proj"
            out, inp = state.pop(f"{name}.weight").shape
            state[f"{name}.weight_packed"] = torch.zeros(out, inp // 8, dtype=torch.int32)
            state[f"{name}.weight_scale"] = torch.ones(out, inp // 32)
            state[f"{name}.weight_shape"] = torch.tensor([out, inp])
            state[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.zeros(128, 64, dtype=torch.int8)
            state[f"model.layers.{i}.self_attn.q_proj.weight_scale"] = torch.ones(128, 1)

    edit_state(model, pack)
    check_weight_files(model)
    edit_state(model, drop("model.layers.1.mlp.down_proj.weight_packed"))
    damaged(model, "'model.layers.1.mlp.down_proj.weight'")


@pytest.mark.parametrize("quantization", [None, {"quant_method": "gptq", "bits": 4}])
def test_configs_the_names_cannot_be_compared_with_still_get_the_file_checks(model, quantization):
    """A model type transformers does not know, or another quantizer's names (qweight, scales): the comparison
    with config.json is skipped, not guessed at; a cut-off file is still found."""
    if quantization:
        edit_config(model, quantization_config=quantization)
        edit_state(model, lambda s: {k.replace("q_proj.weight", "q_proj.qweight"): v for k, v in s.items()})
    else:
        edit_config(model, model_type="not-a-transformers-model")
    assert config_weights(model) is None
    check_weight_files(model)
    file = model / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-4])
    damaged(model, str(file), "truncated", "918,780")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda f: f.write_bytes(b"\x01\x02"), "shorter than a safetensors header"),
        (lambda f: f.write_bytes(f.read_bytes() + b"\0" * 10), "10 bytes after its last tensor"),
        (lambda f: edit_header(f, lambda h: h["model.norm.weight"].update(shape=[65])), "needs 260 bytes"),
        (lambda f: edit_header(f, lambda h: h["model.norm.weight"].update(data_offsets=[0, 256])), "overlap"),
        (lambda f: edit_header(f, lambda h: h["model.norm.weight"].pop("dtype")), "'model.norm.weight'"),
        (lambda f: f.write_bytes(struct.pack("<Q", 2) + b"[]"), "not a JSON object"),
        (lambda f: f.write_bytes(struct.pack("<Q", 3) + b"{x}"), "not valid JSON"),
    ],
    ids=["tiny", "trailing-bytes", "shape-vs-offsets", "overlap", "no-dtype", "json-list", "bad-json"],
)
def test_damaged_headers_name_the_file(model, damage, fragment):
    file = model / "model.safetensors"
    damage(file)
    damaged(model, f"'{file}' is damaged", fragment)


def test_the_latency_model_reads_headers_through_the_same_checks(model):
    from advisor.checkpoint_features import LatencyModelError, checkpoint_features

    file = model / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-4])
    with pytest.raises(LatencyModelError, match="truncated"):
        checkpoint_features(model)


def test_an_index_that_is_not_json_or_names_nothing_on_disk(model):
    index = model / "model.safetensors.index.json"
    index.write_text("{")
    damaged(model, str(index), "weight_map")
    (model / "model.safetensors").unlink()
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}))
    damaged(model, "'model-00001-of-00001.safetensors'", "not in")


@pytest.mark.parametrize("pickle", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin"])
def test_pickle_weights_only_say_how_to_convert(model, pickle):
    (model / "model.safetensors").unlink()
    (model / pickle).write_bytes(b"pickle")
    damaged(model, pickle, "save_pretrained")
