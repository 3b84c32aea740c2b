"""The simplest serving check: the server answers a plain text completion, as a user's first request would."""

from __future__ import annotations

import httpx

from serving.errors import ServingError
from serving.server import VllmServer


def generate_text(server: VllmServer, prompt: str = "The capital of France is", max_tokens: int = 16) -> str:
    """Greedy completion of a text prompt through /v1/completions (tokenized by the server itself)."""
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(300.0, connect=10.0)) as client:
        response = client.post(f"{server.base_url}/v1/completions", json=body)
    if response.status_code != 200:
        raise ServingError(
            f"vLLM answered {response.status_code} to a text completion: {response.text[:200]}"
        )
    text = response.json()["choices"][0]["text"]
    if not text.strip():
        raise ServingError(
            "vLLM returned an empty completion", hint=f"see the server log at {server.log_path}"
        )
    return text
