"""The measurements `pick` ranks on: the latest stored latency and served-perplexity records taken under the same
settings as this run (traffic, hardware, dtype, vLLM version, text windows), and served perplexity measured on a
running server when the store has none."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from serving.server import ServerConfig, VllmServer
from serving.store import LATENCY, QUALITY, CheckpointInfo, Measurement, ResultsStore, hardware

if TYPE_CHECKING:
    from serving.pick import PickConfig, QualityConfig


def measure_quality(
    server: VllmServer,
    info: CheckpointInfo,
    config: QualityConfig,
    store: ResultsStore | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> Measurement:
    """Served perplexity of the checkpoint on `config`'s text windows (vLLM prompt logprobs), stored if `store`."""
    from transformers import AutoTokenizer

    from advisor.evaluate import make_windows, read_text
    from serving.quality import served_quality, served_token_logprobs

    progress(
        f"served perplexity of {info.label} on {config.windows} x {config.seq_len} tokens of {config.text}"
    )
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    name, text = read_text(config.text)
    windows = make_windows(tokenizer, text, config.seq_len, config.windows)
    quality = served_quality(windows, served_token_logprobs(server, windows))
    record = Measurement(
        kind=QUALITY,
        checkpoint=info,
        metrics={"perplexity": quality.perplexity, "tokens": quality.tokens},
        hardware=hardware(),
        engine_version=server.vllm_version,
        settings={
            "text": name,
            "seq_len": config.seq_len,
            "windows": len(windows),
            "windows_sha": hashlib.sha256(json.dumps(windows).encode()).hexdigest()[:16],
            "dtype": server.config.dtype,
            "method": "teacher-forced prompt logprobs (/v1/completions, prompt_logprobs=1)",
        },
    )
    return store.add(record) if store is not None else record


def _same_version(stored: str, installed: str) -> bool:
    return stored.split("+")[0] == installed.split("+")[0]


def stored_latency(
    store: ResultsStore, info: CheckpointInfo, config: PickConfig, hw: str, version: str
) -> Measurement | None:
    """The latest latency of this checkpoint at the same traffic, hardware, server dtype and vLLM version."""
    dtype = config.server_config().dtype
    matches = [
        r for r in store.records(kind=LATENCY, fingerprint=info.fingerprint, traffic=str(config.bench.traffic),
                                 hardware=hw)
        if _same_version(r.engine_version, version) and r.settings.get("server", {}).get("dtype") == dtype
    ]  # fmt: skip
    return matches[-1] if matches else None


def stored_quality(
    store: ResultsStore, info: CheckpointInfo, config: PickConfig, server: ServerConfig, hw: str, version: str
) -> Measurement | None:
    """The latest served perplexity of this checkpoint on the same text, windows, dtype, vLLM version and
    hardware (the kernels differ per ISA, and so does the served quality: int8 on AVX2 vs VNNI)."""
    q = config.quality
    name = Path(q.text).name  # the label advisor.evaluate.read_text gives shipped texts and files alike
    matches = [
        r for r in store.records(kind=QUALITY, fingerprint=info.fingerprint, hardware=hw)
        if r.settings.get("text") == name and r.settings.get("seq_len") == q.seq_len
        and r.settings.get("windows") == q.windows and r.settings.get("dtype") == server.dtype
        and _same_version(r.engine_version, version)
    ]  # fmt: skip
    return matches[-1] if matches else None
