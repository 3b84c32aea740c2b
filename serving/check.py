"""Serving checks on real vLLM servers.

`generate_text`: the server answers a plain text completion, as a user's first request would.
`check`: what `hubc optimize` proves about a base and its variant once both are served: quality as served on the
evaluation texts (vLLM prompt logprobs), latency through the same `vllm bench serve` path as `hubc bench`
(`serving.bench.bench`, interleaved rounds), and a text completion from the variant. Every latency and served
quality is also stored in the results store, so `hubc pick` and `hubc predict` use it without measuring again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from advisor.measurement import CheckpointInfo, MeasurementRecord, QualityMeasurement, Traffic, hardware
from serving.errors import ServingError
from serving.results import BenchReport, CheckpointResult
from serving.server import ServerConfig, VllmServer
from serving.store import ResultsStore

SAMPLE_PROMPT = "The capital of France is"


def generate_text(server: VllmServer, prompt: str = SAMPLE_PROMPT, max_tokens: int = 16) -> str:
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


@dataclass
class EvalWindows:
    """One evaluation text as token windows (the same windows for base and variant)."""

    text: str
    """The text's label (`wikitext2-test`, a file's name)."""
    windows: list[list[int]]
    """Token ids, one list per window."""
    seq_len: int = 512
    """Tokens per window, as asked (the records' `seq_len`)."""
    reference_top1: Any = None
    """The base's most likely next token per position and window (transformers), for top-1 agreement; None
    leaves agreement out."""


@dataclass
class CheckConfig:
    """How `check` serves and measures. The latency defaults measure a small model in a minute or two on a CPU."""

    server: ServerConfig
    """Server settings, the same for base and variant."""
    texts: Sequence[EvalWindows] = ()
    """Where served quality is measured."""
    traffic: Traffic = field(default_factory=lambda: Traffic(input_len=128, output_len=32, concurrency=1))
    """The latency traffic (`vllm bench serve`, random prompts)."""
    num_prompts: int = 5
    """Measured requests per benchmark run."""
    warmups: int = 1
    """Unmeasured requests first, in each run."""
    min_rounds: int = 2
    """Interleaved rounds (base, variant) always run: the spread across rounds is measured, not assumed."""
    max_rounds: int = 3
    """Rounds at most, added while TPOT p50 varies by more than `max_spread`."""
    max_spread: float = 0.05
    """Target relative range of TPOT p50 across rounds."""
    layout: str = "frozen"
    """`frozen` (both servers up, the idle one SIGSTOPped) or `one-at-a-time` (models too big for two servers)."""
    sample_prompt: str = SAMPLE_PROMPT
    """Prompt of the variant's text completion."""
    log_dir: Path | None = None
    """Server and benchmark logs; default next to the results store."""


@dataclass
class CheckResult:
    """What `check` measured: per role (`base`, `variant`), served quality per text and latency."""

    quality: dict[str, dict[str, QualityMeasurement]]
    """role -> text -> quality as served."""
    latency: dict[str, dict[str, Any]]
    """role -> TTFT/TPOT p50/p95 (ms, median over rounds), throughput (output tokens/s), requests, prompt and
    output tokens, rounds, the TPOT p50 spread across rounds (None from one round) and the stored record's id."""
    sample: dict[str, str]
    """The variant's completion: {prompt, completion}."""
    hardware: str
    vllm_version: str
    settings: dict[str, Any]
    """Server settings and request settings of the latency measurement."""
    report: BenchReport
    """The benchmark run itself (every round)."""


def check(
    base: CheckpointInfo,
    variant: CheckpointInfo,
    config: CheckConfig,
    store: ResultsStore | None = None,
    variant_record: CheckpointInfo | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> CheckResult:
    """Serve `base` and `variant`, measure served quality on `config.texts` and latency with `vllm bench serve`,
    and store every latency and served perplexity in `store`. `variant_record` is what the variant's records name
    when it is served from a folder that will move (a staging folder: the same files, the final path)."""
    from serving.bench import BenchConfig, bench, store_report
    from serving.quality import quality_record, served_quality, served_token_logprobs

    bench_config = BenchConfig(
        traffic=config.traffic, num_prompts=config.num_prompts, warmups=config.warmups,
        min_rounds=config.min_rounds, max_rounds=config.max_rounds, max_spread=config.max_spread,
        layout=config.layout, server=config.server, log_dir=config.log_dir,
    )  # fmt: skip
    quality: dict[str, dict[str, QualityMeasurement]] = {"base": {}, "variant": {}}
    served_records: list[MeasurementRecord] = []
    sample: dict[str, str] = {}

    def on_server(info: CheckpointInfo, server: VllmServer) -> None:
        role = "base" if info.fingerprint == base.fingerprint else "variant"
        hw = hardware(env=server.config.env)
        for t in config.texts:
            progress(f"served quality of the {role} on {t.text}")
            sq = served_quality(t.windows, served_token_logprobs(server, t.windows), t.reference_top1)
            quality[role][t.text] = QualityMeasurement(
                engine="vllm", engine_version=sq.vllm_version, dtype=sq.dtype, hardware=hw, text=t.text,
                tokens=sq.tokens, perplexity=sq.perplexity, top1_agreement=sq.top1_agreement,
                settings={"windows": len(t.windows), "seq_len": t.seq_len},
                fingerprint=info.fingerprint,
                note="vLLM prompt logprobs (teacher-forced) from the served checkpoint",
            )  # fmt: skip
            served_records.append(quality_record(info, t.text, t.seq_len, t.windows, sq, hw))
        if role == "variant":
            sample.update(prompt=config.sample_prompt, completion=generate_text(server, config.sample_prompt))

    report = bench([variant], bench_config, base=base, progress=progress, on_server=on_server)
    report.settings["by"] = "serving.check"  # stored records say this run was a serving check, not `hubc bench`
    if variant_record is not None:
        for result in report.results:
            if result.role == "variant":
                result.checkpoint = variant_record
        served_records = [
            dataclasses.replace(r, checkpoint=variant_record)
            if r.checkpoint.fingerprint == variant.fingerprint else r
            for r in served_records
        ]  # fmt: skip
    if store is not None:
        store_report(report, store)
        for record in served_records:
            store.add(record)
    server = report.settings["server"]
    settings = {
        **asdict(config.server),
        "prompt_tokens": config.traffic.input_len,
        "output_tokens": config.traffic.output_len,
        "concurrency": config.traffic.concurrency,
        "requests": config.num_prompts,
        "warmup": config.warmups,
        "rounds": report.rounds,
        "tool": "vllm bench serve",
        "threads": server.get("threads"),
    }
    return CheckResult(
        quality=quality,
        latency={r.role: _latency(r, report, config) for r in report.results},
        sample=sample,
        hardware=report.hardware,
        vllm_version=report.vllm_version,
        settings=settings,
        report=report,
    )


def _latency(result: CheckpointResult, report: BenchReport, config: CheckConfig) -> dict[str, Any]:
    s = result.summary
    return {
        "ttft_ms_p50": s["ttft_ms_p50"],
        "ttft_ms_p95": s["ttft_ms_p95"],
        "tpot_ms_p50": s["tpot_ms_p50"],
        "tpot_ms_p95": s["tpot_ms_p95"],
        "itl_ms_p50": s["itl_ms_p50"],
        "itl_ms_p95": s["itl_ms_p95"],
        "throughput_tok_s": s["output_throughput_tok_s"],
        "peak_memory_mib": s["peak_memory_mib"],
        "requests": config.num_prompts,
        "prompt_tokens": config.traffic.input_len,
        "output_tokens": config.traffic.output_len,
        "concurrency": config.traffic.concurrency,
        "rounds": len(result.rounds),
        "tpot_ms_p50_spread": result.spread if len(result.rounds) > 1 else None,
        "engine": "vllm",
        "vllm_version": report.vllm_version,
        "dtype": report.settings["server"]["dtype"],
        "measurement_id": result.measurement_id,
    }
