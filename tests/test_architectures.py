"""Every architecture hubc accepts goes through `hubc optimize` and comes out as a checkpoint vLLM serves as hubc
evaluated it; a removed decoder layer is served as a smaller model of the same architecture; an architecture hubc
does not handle is refused in one line before any work."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import ARCHITECTURES, build_tiny_model

from hubplugin.cli import main


def _optimize(*args: str):
    return CliRunner().invoke(main, ["optimize", *args, "--target", "cpu", "--no-serve", "--eval-windows", "2",
                                     "--seq-len", "64", "--heal-minutes", "0", "--format", "json"], catch_exceptions=False)


def _served_perplexity(folder: Path, windows: list[list[int]], log_dir: Path) -> float:
    from advisor.targets import get_target
    from serving.quality import served_quality, served_token_logprobs
    from serving.server import ServerConfig, VllmServer

    target = get_target("cpu")
    config = ServerConfig(dtype=target.schemes["w8a8-int8"].serve_dtype or target.serve_dtype, max_model_len=256,
                          health_timeout_s=300, env={"HF_HUB_OFFLINE": "1", **target.serve_env})
    with VllmServer(folder, config, log_dir=log_dir) as server:
        return served_quality(windows, served_token_logprobs(server, windows)).perplexity


@pytest.mark.vllm
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_supported_architecture_is_compressed_and_served(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    from advisor.evaluate import perplexity, score
    from advisor.export import load_for_eval
    from advisor.model import inspect_structure

    source = build_tiny_model(tmp_path / model_type, model_type)
    structure = inspect_structure(source)
    # Fused units found from the model itself: q/k/v and gate/up where stored apart, none where stored fused (Phi-3).
    leaves = {tuple(n.rpartition(".")[2] for n in unit) for unit in structure.fused}
    assert leaves == (set() if model_type == "phi3" else {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")})
    assert [li.kv_heads for li in structure.layers] == [2, 2, 2]

    # Layer 1 removed on top of the default recipe: the checkpoint is the same architecture with two layers.
    out = tmp_path / "variant"
    result = _optimize(str(source), "--remove-layer", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["transforms"]["removed_layers"] == [structure.layers[1].name]
    assert f"{structure.layers[1].name} removed" in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["architectures"] == json.loads(
        (source / "config.json").read_text())["architectures"]
    if "layer_types" in config:
        assert len(config["layer_types"]) == 2
    assert report["quality"][0]["variant"]["perplexity"] != report["quality"][0]["base"]["perplexity"]

    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(4, 1024, (64,), generator=gen).tolist() for _ in range(2)]
    evaluated = perplexity(score(load_for_eval(out), windows, "variant")[0])
    served = _served_perplexity(out, windows, tmp_path / "logs")
    assert served == pytest.approx(evaluated, rel=0.03), (model_type, served, evaluated)
    # transformers reads the checkpoint as its own architecture too (compressed-tensors through its config)
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def test_an_unsupported_architecture_is_refused_in_one_line_before_any_work(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256)).save_pretrained(source)
    started = time.monotonic()
    result = _optimize(str(source), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith("» ")]  # progress lines aside
    assert len(errors) == 1 and "does not handle 'gpt2'" in errors[0] and "qwen3" in errors[0]
    assert time.monotonic() - started < 30 and not (tmp_path / "out").exists()


def test_a_gemma2_with_its_own_output_head_is_refused_before_work(tmp_path):
    import dataclasses

    from advisor.errors import ShapeError
    from advisor.model import inspect_structure
    from advisor.recommend import recommend
    from advisor.targets import get_target

    structure = inspect_structure(build_tiny_model(tmp_path / "gemma2", "gemma2"))
    assert structure.tied_embeddings
    with pytest.raises(ShapeError, match="own output head"):
        recommend(dataclasses.replace(structure, tied_embeddings=False), get_target("a10g"))
