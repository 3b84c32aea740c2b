"""Latency as served: time to first token and time per output token from streamed `/v1/completions` requests."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from serving.errors import ServingError
from serving.server import VllmServer


@dataclass
class LatencyConfig:
    """The traffic a latency measurement sends: fixed-length random prompts, fixed-length outputs, batch 1."""

    prompt_tokens: int = 128
    """Prompt length in tokens (random token ids)."""
    output_tokens: int = 32
    """Generated tokens per request (EOS is ignored, so every request generates exactly this many)."""
    requests: int = 5
    """Measured requests, sent one after another."""
    warmup: int = 1
    """Requests sent first and not measured."""
    seed: int = 0
    """Seed of the random prompts (each request gets a different prompt, so prefix caching cannot help)."""
    vocab_size: int | None = None
    """Prompt ids are drawn below this; None reads `vocab_size` from the checkpoint's config.json."""


@dataclass
class LatencyReport:
    """Measured serving latency of one checkpoint at batch 1, with its provenance."""

    ttft_ms_p50: float
    """Median time to first token: request sent to first streamed token, ms."""
    ttft_ms_p95: float
    """95th percentile of the time to first token, ms."""
    tpot_ms_p50: float
    """Median time per output token after the first: (last - first token time) / (tokens - 1), ms."""
    tpot_ms_p95: float
    """95th percentile of the time per output token, ms."""
    throughput_tok_s: float
    """Output tokens per second over the measured requests (sequential, so it includes prefill)."""
    requests: int
    """Measured requests."""
    prompt_tokens: int
    """Prompt length of each request."""
    output_tokens: int
    """Output length of each request."""
    engine: str = "vllm"
    """Engine that served the requests."""
    vllm_version: str = ""
    """vLLM version of the server."""
    dtype: str = ""
    """dtype the server ran in."""
    concurrency: int = 1
    """Requests in flight at once."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON reports."""
        return asdict(self)


@dataclass
class _Timing:
    ttft_s: float
    tpot_s: float
    tokens: int
    total_s: float


def measure_latency(server: VllmServer, config: LatencyConfig | None = None) -> LatencyReport:
    """Send `warmup` then `requests` streamed completions one at a time and report TTFT, TPOT and throughput."""
    config = config or LatencyConfig()
    if config.output_tokens < 2:
        raise ValueError("output_tokens must be >= 2 to measure the time per output token")
    if config.requests < 1 or config.prompt_tokens < 1:
        raise ValueError("requests and prompt_tokens must be >= 1")
    if config.prompt_tokens + config.output_tokens > server.config.max_model_len:
        raise ValueError(
            f"prompt_tokens + output_tokens = {config.prompt_tokens + config.output_tokens} exceeds the server's "
            f"max_model_len {server.config.max_model_len}"
        )
    vocab = config.vocab_size or checkpoint_vocab_size(server.model)
    rng = random.Random(config.seed)
    prompts = [
        [rng.randrange(vocab) for _ in range(config.prompt_tokens)]
        for _ in range(config.warmup + config.requests)
    ]
    timings: list[_Timing] = []
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        for i, prompt in enumerate(prompts):
            timing = _stream_one(client, server, prompt, config.output_tokens)
            if i >= config.warmup:
                timings.append(timing)
    ttft_ms = np.array([t.ttft_s for t in timings]) * 1e3
    tpot_ms = np.array([t.tpot_s for t in timings]) * 1e3
    return LatencyReport(
        ttft_ms_p50=float(np.percentile(ttft_ms, 50)),
        ttft_ms_p95=float(np.percentile(ttft_ms, 95)),
        tpot_ms_p50=float(np.percentile(tpot_ms, 50)),
        tpot_ms_p95=float(np.percentile(tpot_ms, 95)),
        throughput_tok_s=sum(t.tokens for t in timings) / sum(t.total_s for t in timings),
        requests=len(timings),
        prompt_tokens=config.prompt_tokens,
        output_tokens=config.output_tokens,
        vllm_version=server.vllm_version,
        dtype=server.config.dtype,
    )


def _stream_one(client: httpx.Client, server: VllmServer, prompt: list[int], output_tokens: int) -> _Timing:
    body = {
        "model": server.model_name,
        "prompt": prompt,
        "max_tokens": output_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,  # count tokens, not text chunks (a chunk may hold 0 or several tokens)
    }
    arrivals: list[tuple[float, int]] = []  # (time, tokens in this chunk)
    start = time.perf_counter()
    with client.stream("POST", f"{server.base_url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise ServingError(
                f"vLLM refused a streamed completion ({response.status_code}): {' '.join(response.text.split())[:400]}",
                hint=f"server log: {server.log_path}",
            )
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise ServingError(
                    f"vLLM failed while streaming: {chunk['error']}", hint=f"server log: {server.log_path}"
                )
            now = time.perf_counter()
            for choice in chunk.get("choices") or []:
                n = len(choice.get("token_ids") or [])
                if n:
                    arrivals.append((now, n))
    end = time.perf_counter()
    tokens = sum(n for _, n in arrivals)
    if tokens < 2:
        raise ServingError(f"vLLM streamed {tokens} tokens where {output_tokens} were asked for")
    first, last = arrivals[0][0], arrivals[-1][0]
    return _Timing(
        ttft_s=first - start, tpot_s=(last - first) / (tokens - 1), tokens=tokens, total_s=end - start
    )


def checkpoint_vocab_size(model: str) -> int:
    """`vocab_size` from a checkpoint's config.json (a local folder, or a Hub id through the local cache)."""
    path = Path(model)
    if path.is_dir():
        config_file = path / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(model, "config.json"))
    config = json.loads(config_file.read_text())
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not vocab:
        raise ServingError(
            f"no vocab_size in {config_file}",
            hint="set LatencyConfig.vocab_size to the model's vocabulary size",
        )
    return int(vocab)
