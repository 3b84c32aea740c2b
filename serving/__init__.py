"""Serving: start and stop real vLLM servers, measure quality as served and latency, store and pick.

Public API, by module:
- `server`: `VllmServer`, `ServerConfig` (one real vLLM server, its process tree always killed on exit);
  `processes`: process trees, freezing idle servers, memory sampling; `logs`: vLLM's one-line failure reason.
- `quality`: `served_token_logprobs`, `served_quality`, `measure_quality`, `QualityConfig` (prompt logprobs).
- `bench`: `bench`, `BenchConfig`, `run_once`, `store_report` (interleaved `vllm bench serve` runs, through
  `bench_client.BenchClient`); `results`: `BenchReport`, `CheckpointResult`, `RoundMetrics`, throughput percentiles.
- `check`: `generate_text`; `check`, `CheckConfig` (what `hubc optimize` measures on a base and its variant, with
  `bench`'s latency path, stored like `hubc bench`'s).
- `store`: `ResultsStore` (SQLite results), `describe`, `latest_latency`, `latest_quality`, `current_records`.
- `pick`: `pick`, `PickConfig`, `SLO` (SLO-based choice); `pareto`: its Pareto plot.
The records, checkpoint identity, traffic and hardware are `advisor.measurement`'s (re-exported by `store`).
vLLM itself is only ever run in a subprocess, so importing this package does not import vLLM.
"""
