"""Shared fixtures: hermetic Hub settings for every test, a fake Hub, and a tiny real Llama model.

No test may reach huggingface.co or read the developer's token and cache, so every test gets its own HF_HOME,
no token, and an endpoint that refuses connections unless it asks for `fake_hub`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `hubc` sets it (hubplugin/cli.py), before torch loads

from fakehub import FakeHub  # tests/ is on sys.path: pytest inserts the rootdir conftest's folder
from helpers import build_tiny_llama, trained_copy

# huggingface_hub reads these when it is imported (progress bars, telemetry, Xet), possibly before any fixture
# runs, so they are set for the whole test process here; the autouse fixture below sets them again per test.
_FLAGS = {
    "HF_HUB_DISABLE_TELEMETRY": "1",  # else the first request of a process is GET /api/agent-harnesses
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_XET": "1",  # the fake speaks plain HTTP only
    "NO_PROXY": "127.0.0.1,localhost",  # httpx honours HTTP(S)_PROXY, also for loopback otherwise
    "no_proxy": "127.0.0.1,localhost",
}
os.environ.update(_FLAGS)

# Port 9 (discard) on loopback refuses at once: a test that forgets `fake_hub` fails fast instead of hanging.
_DEAD_ENDPOINT = "http://127.0.0.1:9"


def _point_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """huggingface_hub computes its endpoint at import, and the module-level `api` keeps it, so all three places
    are patched (hub-protocol.md §1.1), and HF_ENDPOINT is set for anything that reads the environment later."""
    from huggingface_hub import constants, hf_api

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)


@pytest.fixture(autouse=True)
def isolated_hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Give every test its own HF_HOME, HF cache, hubc cache and token files, with no token and no real Hub."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    env = {
        **_FLAGS,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HUBC_CACHE": str(tmp_path / "hubc_cache"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "HF_OIDC_RESOURCE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    ):
        monkeypatch.delenv(key, raising=False)
    patched = {
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,  # offline mode would refuse the fake Hub too
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,  # read at call time by is_xet_available()
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    _point_client_at(monkeypatch, _DEAD_ENDPOINT)
    return tmp_path


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running fake Hub the real client is pointed at; `.token` is a valid write token for user 'tester'
    (member of org 'org'), `.read_token` a read-only one."""
    with FakeHub() as hub:
        _point_client_at(monkeypatch, hub.url)
        yield hub


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete LlamaForCausalLM folder that transformers loads and vLLM serves (`helpers.build_tiny_llama`), with
    transformers' default init (std 0.02): the quantization tolerances of tests/advisor are set for weights that
    small."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), initializer_range=0.02)


@pytest.fixture(scope="session")
def trained_tiny_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama trained briefly on wikitext-2 valid (`helpers.trained_copy`): low-bit quantization costs it
    perplexity, as it does a real model."""
    return trained_copy(tiny_llama_dir, tmp_path_factory.mktemp("trained") / "tiny-trained")
