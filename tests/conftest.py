"""Shared fixtures: hermetic Hub settings for every test, a fake Hub, and a tiny real Llama model.

No test may reach huggingface.co or read the developer's token and cache, so every test gets its own HF_HOME,
no token, and an endpoint that refuses connections unless it asks for `fake_hub`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakehub import FakeHub  # tests/ is on sys.path: pytest inserts the rootdir conftest's folder

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


def _tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer built in code (no downloads): special tokens, the words of a small text, then letters,
    letter pairs and w<N> words until it has exactly `vocab_size` entries, so every id the model can emit decodes to text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    text = (
        "the quick brown fox jumps over the lazy dog . a model is compressed to run on a small gpu , "
        "and its quality is measured before it is pushed to the hub ! what is the capital of france ? "
        "paris is the capital of france . one two three four five six seven eight nine ten"
    )
    words = list(dict.fromkeys(text.split()))
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    fillers = letters + [a + b for a in letters for b in letters] + [f"w{i}" for i in range(vocab_size)]
    tokens = list(dict.fromkeys(specials + words + fillers))[:vocab_size]
    assert len(tokens) == vocab_size
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete, loadable LlamaForCausalLM folder (random weights, seed 0, safetensors, tokenizer), under 1 MB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1024,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)  # safetensors is the only format transformers 5 writes
    _tiny_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder
