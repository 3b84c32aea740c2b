"""`hubc optimize` on a model folder whose weight files are damaged: one `error:` line naming the file and what to do,
exit code 2, no traceback and no output folder, before any model is loaded."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubplugin.cli import main


def header_of(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def write_safetensors(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def garbage(folder: Path) -> str:
    (folder / "model.safetensors").write_bytes(b"\x8f\x01<html>not a model</html>" * 50)
    return "model.safetensors"


def bad_header_json(folder: Path) -> str:
    file = folder / "model.safetensors"
    _, data = header_of(file)
    text = b'{"model.norm.weight": {"dtype": "F32", '
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return "model.safetensors"


def truncated(folder: Path) -> str:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return "model.safetensors"


def sharded(folder: Path) -> dict:
    """Split the tiny model into two shards with an index, as save_pretrained does for large models."""
    header, data = header_of(folder / "model.safetensors")
    header.pop("__metadata__", None)
    names = sorted(header)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard, out, offset = f"model-0000{i + 1}-of-00002.safetensors", {}, 0
        chunks = []
        for name in part:
            begin, end = header[name]["data_offsets"]
            chunks.append(data[begin:end])
            out[name] = {**header[name], "data_offsets": [offset, offset + end - begin]}
            offset += end - begin
            weight_map[name] = shard
        write_safetensors(folder / shard, out, b"".join(chunks))
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def missing_shard(folder: Path) -> str:
    sharded(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors"


def index_names_a_tensor_not_in_its_shard(folder: Path) -> str:
    index = sharded(folder)
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.layers.9.mlp.up_proj.weight"


def hidden_size_changed_in_config(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    return "model.safetensors"


def tensor_with_the_wrong_shape(folder: Path) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"][:, :100].contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return "model.layers.1.mlp.down_proj.weight"


def tensor_missing(folder: Path) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return "model.layers.1.self_attn.k_proj.weight"


def no_weights(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    return "no weight files"


def only_pytorch_bin(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    return "pytorch_model.bin"


DAMAGES = [garbage, bad_header_json, truncated, missing_shard, index_names_a_tensor_not_in_its_shard,
           hidden_size_changed_in_config, tensor_with_the_wrong_shape, tensor_missing, no_weights,
           only_pytorch_bin]  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_damaged_weights_fail_in_one_line_and_write_nothing(damage, tiny_llama_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    names = damage(folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["optimize", str(folder), "--target", "cpu", "--no-serve", "--out", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("»")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert names in lines[0] and str(folder) in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_sharded_model_with_its_index_passes(tiny_llama_dir, tmp_path):
    """The sharding helper itself writes a model the check accepts (so the failures above are the damage's)."""
    from advisor.weight_files import check_weight_files

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    sharded(folder)
    check_weight_files(folder)


@pytest.mark.slow
def test_the_demo_passes_and_a_damaged_conversion_cache_says_to_delete_it(tmp_path):
    """The GGUF demo converts (about a minute on 2 cores) into a folder the check accepts; if that cached folder is
    damaged later, the error names the file and says to delete the cache, not to download anything."""
    import importlib.util

    from advisor.errors import DamagedWeightsError
    from hubplugin.source import DEMO_PACKAGE, resolve

    if importlib.util.find_spec(DEMO_PACKAGE) is None:
        pytest.skip("the demo model package is not installed")
    source = resolve("demo")
    file = source.path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(DamagedWeightsError, match="truncated") as info:
        resolve("demo")
    assert str(file) in str(info.value) and f"delete {source.path}" in str(info.value)
