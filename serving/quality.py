"""Quality where it is served: teacher-forced perplexity and top-1 agreement from vLLM's own prompt logprobs.

Each token window goes to `/v1/completions` as a list of token ids with `prompt_logprobs` (a vLLM extension), so
the numbers come from the kernels users will run (activation quantization, FP8 emulation, fused layers), not from
transformers' emulation of the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import httpx

from advisor.measurement import QUALITY, CheckpointInfo, MeasurementRecord, hardware
from serving.errors import ServingError
from serving.server import VllmServer

if TYPE_CHECKING:
    from serving.store import ResultsStore

SERVED_METHOD = "teacher-forced prompt logprobs (/v1/completions, prompt_logprobs=1)"
"""How served perplexity is computed, as records name it."""


@dataclass
class QualityConfig:
    """The text served perplexity is measured on: the same windows for every checkpoint."""

    text: str = "wikitext2-test"
    """A text shipped with hubc (wikitext2-test, licenses) or a path to a UTF-8 file."""
    seq_len: int = 512
    """Tokens per window."""
    windows: int = 2
    """Windows, from the start of the text."""


@dataclass
class ServedWindow:
    """What the server said about one window of n tokens, at positions 1..n-1 (position 0 has no context)."""

    token_logprobs: list[float]
    """Log-probability of the window's actual token at each position (vLLM clamps -inf to -9999.0)."""
    top1: list[int]
    """The served argmax token id at each position (the entry of rank 1)."""
    vllm_version: str
    """Version of the vLLM server that answered."""
    dtype: str
    """dtype the server ran in."""


@dataclass
class ServedQuality:
    """Teacher-forced quality of a served checkpoint, with the provenance of the numbers."""

    perplexity: float
    """exp of the mean negative log-likelihood over every scored token."""
    top1_agreement: float | None
    """Share of positions where the served argmax equals the reference's argmax; None without a reference."""
    tokens: int
    """Scored tokens (n-1 per window)."""
    engine: str = "vllm"
    """Engine that produced the logprobs."""
    vllm_version: str = ""
    """vLLM version of the server."""
    dtype: str = ""
    """dtype the server ran in."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON reports."""
        return asdict(self)


def served_token_logprobs(
    server: VllmServer, windows: Sequence[Sequence[int]], top_k: int = 1, concurrency: int = 1
) -> list[ServedWindow]:
    """Score each token window on the server: the logprob of every actual next token and the served top-1.

    `top_k` is the number of top entries vLLM returns per position (at least 1, for the argmax). Windows must be
    at least 2 tokens and at most `max_model_len - 1` (one token is generated). `concurrency` > 1 sends that many
    windows at once, which lets vLLM batch them.
    """
    if top_k < 1:
        raise ValueError("top_k must be >= 1: the served argmax is read from the rank-1 entry")
    for i, window in enumerate(windows):
        if len(window) < 2:
            raise ValueError(f"window {i} has {len(window)} tokens; at least 2 are needed to score one")
    url = f"{server.base_url}/v1/completions"
    version, dtype = server.vllm_version, server.config.dtype
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(600.0, connect=10.0)) as client:

        def score(window: Sequence[int]) -> ServedWindow:
            body = {
                "model": server.model_name,
                "prompt": [int(t) for t in window],
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": top_k,
            }
            response = client.post(url, json=body)
            if response.status_code != 200:
                raise ServingError(
                    f"vLLM refused a prompt_logprobs request ({response.status_code}): {_error_text(response)}",
                    hint=f"server log: {server.log_path}",
                )
            logprobs, top1 = parse_prompt_logprobs(response.json()["choices"][0]["prompt_logprobs"], window)
            return ServedWindow(token_logprobs=logprobs, top1=top1, vllm_version=version, dtype=dtype)

        if concurrency <= 1:
            return [score(w) for w in windows]
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(score, windows))


def parse_prompt_logprobs(
    prompt_logprobs: list[dict[str, dict] | None], window: Sequence[int]
) -> tuple[list[float], list[int]]:
    """Read vLLM's `prompt_logprobs` (one entry per prompt token; the first is null; each a dict keyed by the token
    id as a string, of {"logprob", "rank", "decoded_token"}, holding the actual token and the top-k) into the
    actual token's logprob and the top-1 token id at positions 1..n-1."""
    if len(prompt_logprobs) != len(window):
        raise ServingError(
            f"vLLM returned {len(prompt_logprobs)} prompt logprobs for a {len(window)}-token window"
        )
    logprobs: list[float] = []
    top1: list[int] = []
    for pos in range(1, len(window)):
        entries = prompt_logprobs[pos]
        actual = entries.get(str(window[pos])) if entries else None
        if actual is None:
            raise ServingError(f"vLLM returned no logprob for the prompt token at position {pos}")
        logprobs.append(float(actual["logprob"]))
        # The entries hold the top-k and the actual token, so the highest logprob is the argmax. Not the `rank`
        # field: with torch capped to AVX2 on an AVX-512 CPU, vLLM 0.32 has ranked the actual token 1 below the
        # true top-1 (measured: two rank-1 entries at one position of 511); the rank only breaks exact ties.
        best = max(entries.items(), key=lambda item: (item[1]["logprob"], -(item[1].get("rank") or 1 << 30)))
        top1.append(int(best[0]))
    return logprobs, top1


def served_quality(
    windows: Sequence[Sequence[int]],
    served: Sequence[ServedWindow],
    reference_top1: Sequence[Sequence[int]] | None = None,
) -> ServedQuality:
    """Perplexity over all windows and, given the reference model's argmax for the same positions
    (`reference_top1[w][j]` predicts token j+1 of window w, n-1 ids per window), the top-1 agreement."""
    if len(windows) != len(served):
        raise ValueError(f"{len(windows)} windows but {len(served)} served results")
    nll = 0.0
    tokens = 0
    for window, result in zip(windows, served, strict=True):
        if len(result.token_logprobs) != len(window) - 1:
            raise ValueError("a served window does not match its token window (expected n-1 logprobs)")
        nll -= sum(result.token_logprobs)
        tokens += len(result.token_logprobs)
    if tokens == 0:
        raise ValueError("no tokens to score")
    agreement = None
    if reference_top1 is not None:
        if len(reference_top1) != len(served):
            raise ValueError(f"{len(reference_top1)} reference windows but {len(served)} served results")
        same = 0
        for ref, result in zip(reference_top1, served, strict=True):
            if len(ref) != len(result.top1):
                raise ValueError(
                    f"reference top-1 has {len(ref)} positions, the served window {len(result.top1)}"
                )
            same += sum(int(a) == b for a, b in zip(ref, result.top1, strict=True))
        agreement = same / tokens
    first = served[0] if served else None
    return ServedQuality(
        perplexity=math.exp(nll / tokens),
        top1_agreement=agreement,
        tokens=tokens,
        engine="vllm",
        vllm_version=first.vllm_version if first else "",
        dtype=first.dtype if first else "",
    )


def _error_text(response: httpx.Response) -> str:
    """vLLM's error message from an OpenAI-style error body, on one line."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    return " ".join(str(message).split())[:400]


def quality_record(
    info: CheckpointInfo,
    text: str,
    seq_len: int,
    windows: list[list[int]],
    quality: ServedQuality,
    hw: str | None = None,
) -> MeasurementRecord:
    """The results-store record of a served perplexity of checkpoint `info` on `windows` of `text` (its label)."""
    return MeasurementRecord(
        kind=QUALITY,
        checkpoint=info,
        metrics={"perplexity": quality.perplexity, "tokens": quality.tokens},
        hardware=hw or hardware(),
        engine_version=quality.vllm_version,
        dtype=quality.dtype,
        text=text,
        tokens=quality.tokens,
        settings={
            "text": text,
            "seq_len": seq_len,
            "windows": len(windows),
            "windows_sha": hashlib.sha256(json.dumps(windows).encode()).hexdigest()[:16],
            "dtype": quality.dtype,
            "method": SERVED_METHOD,
        },
    )


def measure_quality(
    server: VllmServer,
    info: CheckpointInfo,
    config: QualityConfig,
    store: ResultsStore | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> MeasurementRecord:
    """Served perplexity of the checkpoint on `config`'s text windows (vLLM prompt logprobs), stored if `store`."""
    from transformers import AutoTokenizer

    from advisor.evaluate import make_windows, read_text

    progress(
        f"served perplexity of {info.label} on {config.windows} x {config.seq_len} tokens of {config.text}"
    )
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    name, text = read_text(config.text)
    windows = make_windows(tokenizer, text, config.seq_len, config.windows)
    quality = served_quality(windows, served_token_logprobs(server, windows))
    record = quality_record(info, name, config.seq_len, windows, quality, hardware(env=server.config.env))
    return store.add(record) if store is not None else record
