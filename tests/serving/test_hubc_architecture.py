"""Checkpoints of hubc's architectures (per-layer MLP widths and heads, factorized linears; dense fp32 and W8A8-int8)
are served by vLLM through hubc's plugin as hubc evaluates them: teacher-forced perplexity within 1% and the same
greedy tokens as transformers; without the plugin vLLM refuses them, naming the model type."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch
from helpers import build_tiny_llama
from reshaped_models import reshape_every_way
from tiny_models import build_tiny_model

from advisor.architecture import adopt
from advisor.evaluate import perplexity, score
from advisor.model import load_model
from serving.quality import served_quality, served_token_logprobs
from serving.server import ServerConfig, VllmServer

pytestmark = pytest.mark.vllm

GREEDY_TOKENS = 16


def _windows() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(4, 1024, (64,), generator=gen).tolist() for _ in range(2)]


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [[1, *torch.randint(4, 1024, (7,), generator=gen).tolist()] for _ in range(5)]


def _source(folder: Path, model_type: str) -> Path:
    return build_tiny_llama(folder) if model_type == "llama" else build_tiny_model(folder, model_type)


def _reshaped_checkpoint(source: Path, out: Path) -> Path:
    model = load_model(source)
    reshape_every_way(model)
    adopt(model).save_pretrained(out)
    for f in source.glob("*token*"):
        shutil.copy(f, out)
    return out


def _greedy(model, prompt: list[int]) -> list[int]:
    """transformers' greedy continuation, argmax by argmax (no end-of-text stop, as the server is asked)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(GREEDY_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _served_greedy(server: VllmServer, prompt: list[int]) -> list[int]:
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": GREEDY_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(300.0, connect=10.0)) as client:
        response = client.post(f"{server.base_url}/v1/completions", json=body)
    assert response.status_code == 200, response.text[:300]
    return response.json()["choices"][0]["token_ids"]


def _server_config(env: dict[str, str] | None = None) -> ServerConfig:
    from advisor.targets import get_target

    target = get_target("cpu")
    return ServerConfig(dtype="float32", max_model_len=256, health_timeout_s=300,
                        env={"HF_HUB_OFFLINE": "1", **target.serve_env, **(env or {})})


def _check_served_as_evaluated(folder: Path, evaluated_model, log_dir: Path) -> None:
    windows, prompts = _windows(), _prompts()
    evaluated = perplexity(score(evaluated_model, windows, "evaluated")[0])
    expected = [_greedy(evaluated_model, p) for p in prompts]
    with VllmServer(folder, _server_config(), log_dir=log_dir) as server:
        served = served_quality(windows, served_token_logprobs(server, windows)).perplexity
        tokens = [_served_greedy(server, p) for p in prompts]
    assert served == pytest.approx(evaluated, rel=0.01), (served, evaluated)
    assert sum(t == e for t, e in zip(tokens, expected, strict=True)) >= 4, (tokens, expected)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_a_reshaped_and_factorized_checkpoint_is_served_as_evaluated(model_type, tmp_path):
    out = _reshaped_checkpoint(_source(tmp_path / "source", model_type), tmp_path / "out")
    _check_served_as_evaluated(out, load_model(out), tmp_path / "logs")


def test_a_factorized_w8a8_checkpoint_is_served_as_evaluated(tmp_path):
    from advisor.compress import compress
    from advisor.export import load_for_eval, write_checkpoint
    from advisor.model import structure_of
    from advisor.plan import resolve
    from advisor.recipe import Recipe
    from advisor.targets import get_target

    source = _source(tmp_path / "source", "qwen2")  # q/k/v biases: the factorized q_proj's bias goes to its `u`
    model = load_model(source)
    reshape_every_way(model)
    model = adopt(model)
    plan = resolve(Recipe(scheme="w8a8-int8", target="cpu"), structure_of(model), get_target("cpu"))
    assert {"model.layers.0.self_attn.q_proj.u", "model.layers.1.mlp.down_proj.v"} <= {
        n for n, s in plan.linears.items() if s is not None}
    out = tmp_path / "out"
    out.mkdir()
    write_checkpoint(compress(model, plan, None), out)
    for f in source.glob("*token*"):
        shutil.copy(f, out)
    _check_served_as_evaluated(out, load_for_eval(out), tmp_path / "logs")


def test_vllm_without_the_hubc_plugin_refuses_a_hubc_checkpoint(tmp_path):
    from serving.errors import ServerStartError

    out = _reshaped_checkpoint(_source(tmp_path / "source", "llama"), tmp_path / "out")
    # VLLM_PLUGINS is vLLM's allow-list of plugin names: an empty one loads none, as if hubc were not installed.
    with pytest.raises(ServerStartError) as refused, \
            VllmServer(out, _server_config({"VLLM_PLUGINS": ""}), log_dir=tmp_path / "logs"):
        pass
    assert "model type `hubc_llama` but Transformers does not recognize this architecture" in str(refused.value)


@pytest.mark.parametrize("action, native", [
    ({"mlp": 0.25}, True),  # one MLP width in every layer: the base's own architecture, served natively
    ({"heads": 0.5}, None),  # whole KV groups or query heads within groups, chosen per layer on calibration text
])
def test_a_checkpoint_pruned_by_the_prune_action_is_served_as_evaluated(action, native, tmp_path):
    import json

    from advisor.actions import Prune, StructureContext
    from advisor.model import structure_of

    model = load_model(_source(tmp_path / "source", "qwen3"))
    structure = structure_of(model)
    ctx = StructureContext(windows=_windows(), structure=structure)
    Prune.apply(model, {li.name: Prune(**action) for li in structure.layers}, ctx)
    model = adopt(model)
    out = tmp_path / "out"
    model.save_pretrained(out)
    for f in (tmp_path / "source").glob("*token*"):
        shutil.copy(f, out)
    config = json.loads((out / "config.json").read_text())
    if native is not None:
        assert (config["model_type"] == "qwen3") == native, config["model_type"]
    _check_served_as_evaluated(out, load_model(out), tmp_path / "logs")
