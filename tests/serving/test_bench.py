"""`hubc bench` with real vLLM servers and vLLM's own `vllm bench serve`: base and variant measured interleaved and
stored; SIGINT and SIGTERM mid-benchmark leave no vLLM process behind; a checkpoint vLLM refuses is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import build_tiny_llama, leftovers, perturbed_copy, tree_of  # tests/ is on sys.path

from serving.bench import BenchConfig, BenchReport, CheckpointResult, RoundMetrics, Traffic, stored_throughput
from serving.server import installed_vllm_version
from serving.store import LATENCY, CheckpointInfo, ResultsStore, describe

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--traffic", "in=32,out=8,concurrency=2", "--num-prompts", "8"]


def test_traffic_parses_and_prints_canonically() -> None:
    traffic = Traffic.parse("out=128, in=512,concurrency=8")
    assert traffic == Traffic(512, 128, 8) and str(traffic) == "in=512,out=128,concurrency=8"
    assert Traffic.parse(str(traffic)) == traffic
    assert Traffic.parse("in=64") == Traffic(64, 128, 8)
    for bad in ("in=x", "batch=4", "in", "out=1", "concurrency=0"):
        with pytest.raises(ValueError):
            Traffic.parse(bad)


def test_bench_config_defaults() -> None:
    config = BenchConfig(traffic=Traffic(512, 128, 8))
    assert (config.prompts(), config.warmup_requests()) == (32, 8)
    server = config.server_config()
    assert server.dtype == "bfloat16" and server.max_model_len == 512 + 128 + 16
    assert (
        "--no-enable-prefix-caching" in server.extra_args
    )  # earlier requests must not help a latency benchmark


def test_summary_is_the_median_over_rounds_and_spread_its_range() -> None:
    def metrics(round_no: int, tpot: float, memory: float) -> RoundMetrics:
        return RoundMetrics(
            round_no, 10, 12, tpot, tpot + 1, tpot, tpot + 2, 1000 / tpot, 5, memory, 1.0, 8, 0
        )

    result = CheckpointResult(checkpoint=None, role="variant")  # type: ignore[arg-type]
    result.rounds = [metrics(1, 20.0, 900), metrics(2, 22.0, 950), metrics(3, 21.0, 920)]
    assert result.summary["tpot_ms_p50"] == 21.0 and result.summary["peak_memory_mib"] == 950
    assert result.spread == pytest.approx(2.0 / 21.0)


def _round(round_no: int, tok_s: float, req_s: float, tpot: float = 20.0) -> RoundMetrics:
    return RoundMetrics(round_no, 10, 12, tpot, tpot + 1, tpot, tpot + 2, tok_s, req_s, 900, 1.0, 8, 0)


def test_throughput_is_reported_as_p50_and_p95_across_rounds() -> None:
    result = CheckpointResult(checkpoint=None, role="variant")  # type: ignore[arg-type]
    result.rounds = [_round(i + 1, tok, req) for i, (tok, req) in
                     enumerate([(100, 2.0), (130, 2.5), (120, 1.5), (110, 3.0), (140, 2.2)])]  # fmt: skip
    summary = result.summary
    # p50 is the median; p95 is the slow tail, the rate 95% of rounds reached: 100 + 0.2 x (110 - 100).
    assert summary["output_throughput_tok_s_p50"] == 120 and summary["output_throughput_tok_s"] == 120
    assert summary["output_throughput_tok_s_p95"] == pytest.approx(102.0)
    assert summary["request_throughput_rps_p50"] == 2.2
    assert summary["request_throughput_rps_p95"] == pytest.approx(1.6)

    stored = result.metrics()
    expected = {k: summary[k] for k in ("output_throughput_tok_s_p50", "output_throughput_tok_s_p95",
                                        "request_throughput_rps_p50", "request_throughput_rps_p95")}  # fmt: skip
    assert stored_throughput(stored) == expected
    # A record from a store written before these were kept has only the rounds: the same numbers come from them.
    old = {k: v for k, v in stored.items() if k not in expected}
    assert stored_throughput(old) == pytest.approx(expected)
    assert stored_throughput({"output_throughput_tok_s": 120.0}) == {}  # no rounds: nothing to compute

    result.rounds = result.rounds[:1]  # one round: both percentiles are that round's number
    assert result.summary["output_throughput_tok_s_p50"] == result.summary["output_throughput_tok_s_p95"] == 100


def test_bench_table_shows_throughput_p50_and_p95(capsys: pytest.CaptureFixture[str]) -> None:
    from hubplugin.render import bench_table

    base = CheckpointResult(CheckpointInfo("/m/tiny-base", "f1", 10), "base",
                            [_round(1, 100.0, 12.0, tpot=20.0), _round(2, 110.0, 14.0, tpot=21.0)])
    variant = CheckpointResult(CheckpointInfo("/m/tiny-variant", "f2", 5), "variant",
                               [_round(1, 130.0, 16.25, tpot=15.0), _round(2, 150.0, 18.75, tpot=15.5)])  # fmt: skip
    settings = {"server": {"dtype": "bfloat16"}, "benchmark": {"num_prompts": 8, "warmups": 2, "layout": "frozen"}}
    report = BenchReport(traffic=Traffic(32, 8, 2), results=[base, variant], hardware="a CPU", vllm_version="0.32.0",
                         settings=settings, rounds=2, converged=False, run_id="r", log_dir=Path("/logs"))  # fmt: skip
    bench_table(report, Path("/store.sqlite"))
    out = capsys.readouterr().out
    assert "tok/s p50/p95" in out and "req/s p50/p95" in out
    rows = {line.split()[1]: line for line in out.splitlines() if "tiny-" in line}
    # base: p50 105, p95 100 + 0.05 x 10 (the slow tail); variant: p50 140, p95 130 + 0.05 x 20.
    assert " 105.0 / 100.5 " in rows["tiny-base"] and " 13.00 / 12.10 " in rows["tiny-base"]
    assert " 140.0 / 131.0 " in rows["tiny-variant"] and " 17.50 / 16.38 " in rows["tiny-variant"]
    assert "p50 and p95 across the 2 rounds" in out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A vLLM-servable tiny base (head_dim 32) and a noisy copy of it as the variant."""
    root = tmp_path_factory.mktemp("bench-models")
    base = build_tiny_llama(root / "tiny-base")
    return {"base": base, "variant": perturbed_copy(base, root / "tiny-variant", scale=0.3)}


class Hubc:
    """`hubc ARGS` in a subprocess, its stderr collected line by line in a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hubplugin.cli", *args],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, fragment: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(fragment in line for line in self.stderr):
            assert self.proc.poll() is None, "\n".join(self.stderr[-20:])
            assert time.monotonic() < deadline, f"no '{fragment}' in time:\n" + "\n".join(self.stderr[-20:])
            time.sleep(0.1)

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=10)
        return code, "\n".join(self.stdout), "\n".join(self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def hubc() -> Iterator[list[Hubc]]:
    started: list[Hubc] = []
    yield started
    for run in started:
        run.kill()


@pytest.mark.vllm
def test_hubc_bench_measures_base_and_variant_interleaved_and_stores_them(tiny, hubc) -> None:
    run = Hubc("bench", str(tiny["variant"]), "--base", str(tiny["base"]), *SMALL, "--max-rounds", "2")
    hubc.append(run)
    code, stdout, stderr = run.finish()
    assert code == 0, stderr
    order = [line.split(": vllm bench serve on ")[1].split(" ")[0] for line in stderr.splitlines()
             if ": vllm bench serve on " in line]  # fmt: skip
    assert order == ["tiny-base", "tiny-variant", "tiny-base", "tiny-variant"]  # round-robin, base first
    for column in ("TTFT p50", "TTFT p95", "TPOT p50", "TPOT p95", "ITL p50", "tok/s p50/p95",
                   "req/s p50/p95", "peak mem"):  # fmt: skip
        assert column in stdout
    assert "tiny-base (base)" in stdout and "tiny-variant" in stdout and "2 interleaved rounds" in stdout

    records = ResultsStore().records(kind=LATENCY, traffic="in=32,out=8,concurrency=2")
    assert [r.checkpoint.fingerprint for r in records] == [
        describe(tiny[k]).fingerprint for k in ("base", "variant")
    ]
    assert len({r.settings["run_id"] for r in records}) == 1
    for record in records:
        assert len(record.metrics["rounds"]) == 2
        m = record.metrics
        assert m["ttft_ms_p50"] > 0 and m["output_throughput_tok_s"] > 0
        for name in ("output_throughput_tok_s", "request_throughput_rps"):
            per_round = sorted(r[name] for r in m["rounds"])
            assert m[f"{name}_p50"] == pytest.approx(sum(per_round) / 2)  # two rounds: their mean
            assert per_round[0] <= m[f"{name}_p95"] < m[f"{name}_p50"] or per_round[0] == per_round[1]
        assert record.metrics["peak_memory_mib"] > 100  # a vLLM server tree is hundreds of MiB at least
        assert (
            record.settings["benchmark"]["num_prompts"] == 8
            and record.settings["server"]["dtype"] == "bfloat16"
        )
        assert record.engine_version == installed_vllm_version()


@pytest.mark.vllm
@pytest.mark.parametrize(
    ("signum", "models", "during"),
    [
        (signal.SIGINT, ("variant",), "tiny-variant"),
        (signal.SIGTERM, ("base", "variant"), "tiny-base"),  # while the variant's server is SIGSTOPped
        # No handler runs: the servers get SIGTERM from the kernel (PR_SET_PDEATHSIG) and the frozen one is
        # resumed by bench's watchdog, else it would never act on that SIGTERM.
        (signal.SIGKILL, ("base", "variant"), "tiny-base"),
    ],
    ids=[
        "sigint-mid-benchmark",
        "sigterm-mid-benchmark-with-a-frozen-server",
        "sigkill-with-a-frozen-server",
    ],
)
def test_interrupt_mid_benchmark_leaves_no_vllm_process(tiny, hubc, signum: int, models, during: str) -> None:
    # Enough requests that the benchmark is still running when the signal arrives.
    args = ["bench", *(str(tiny[m]) for m in models), "--traffic", "in=32,out=8,concurrency=1", "--num-prompts",
            "5000", "--min-rounds", "1", "--max-rounds", "1"]  # fmt: skip
    run = Hubc(*args)
    hubc.append(run)
    run.wait_for(f"round 1: vllm bench serve on {during}")
    time.sleep(1.5)
    snapshot = tree_of(run.proc.pid)[1:]
    names = " ".join(p.name() for p in snapshot)
    assert names.count("VLLM::EngineCore") == len(models), names  # every server is up, frozen or not

    run.proc.send_signal(signum)
    signalled = time.monotonic()
    code, _, stderr = run.finish(timeout=90)
    expected = {signal.SIGINT: 130, signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGKILL: -signal.SIGKILL}
    assert code == expected[signum], stderr[-3000:]
    deadline = time.monotonic() + (60 if signum == signal.SIGKILL else 0)  # orphans shut down on their own
    while (left := leftovers(snapshot, paths=tuple(tiny[m] for m in models))) and time.monotonic() < deadline:
        time.sleep(0.5)
    print(
        f"\nhubc exited {code}; its processes were gone {time.monotonic() - signalled:.1f} s after "
        f"{signal.Signals(signum).name}"
    )
    assert left == []


@pytest.mark.vllm
def test_bench_on_a_checkpoint_vllm_refuses_is_one_line_with_vllms_reason(tmp_path: Path, hubc) -> None:
    broken = build_tiny_llama(tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["BogusForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    run = Hubc("bench", str(broken), *SMALL)
    hubc.append(run)
    code, stdout, stderr = run.finish(timeout=300)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "Model architectures ['BogusForCausalLM'] are not supported" in errors[0]
    assert "Traceback" not in stderr and stdout == ""
    assert leftovers([], paths=(broken,)) == []
