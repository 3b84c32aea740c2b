"""Serving: start and stop real vLLM servers, measure quality as served and latency.

Public API: `VllmServer`, `ServerConfig` (server.py); `served_token_logprobs`, `served_quality` (quality.py);
`measure_latency`, `LatencyConfig`, `LatencyReport` (latency.py); `generate_text` (check.py); `bench`, `BenchConfig`,
`Traffic` (bench.py: interleaved `vllm bench serve` runs); `ResultsStore` (store.py: SQLite results);
`pick`, `PickConfig`, `SLO` (pick.py: SLO-based choice with a Pareto plot).
vLLM itself is only ever run in a subprocess, so importing this package does not import vLLM.
"""
