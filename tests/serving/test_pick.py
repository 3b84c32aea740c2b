"""`pick` names the known-best checkpoint when stored measurements fix the answer (no server is started: the fake
checkpoints could not be served), and measures what the store lacks on real vLLM servers first."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import build_tiny_llama, perturbed_copy  # tests/ is on sys.path (conftest.py)
from safetensors.numpy import save_file

from advisor.targets import forced_serve_env
from hubplugin.cli import main
from serving.bench import BenchConfig, Traffic
from serving.pick import SLO, Candidate, PickConfig, PickError, QualityConfig, base_ref, pick, rank
from serving.server import installed_vllm_version
from serving.store import LATENCY, QUALITY, Measurement, ResultsStore, describe, hardware

TRAFFIC = "in=64,out=16,concurrency=4"
WINDOWS_SHA = "0123456789abcdef"
# label: (TPOT p50 ms, spread, served perplexity, weights bytes). Base perplexity 10.0, SLO: TPOT <= 25 ms, +5%.
CHECKPOINTS = {
    "base": (20.0, 0.01, 10.0, 4000),
    "fast-but-bad": (10.0, 0.01, 12.0, 1000),  # +20%: misses the quality budget
    "good": (14.0, 0.03, 10.3, 2000),  # +3%
    "good-but-larger": (14.2, 0.01, 10.2, 3000),  # +2%, as fast as `good` within its 3% spread: size decides
    "slow": (30.0, 0.01, 10.1, 1500),  # misses the TPOT SLO
}


def served_hardware() -> str:
    """This machine as hubc's vLLM servers run on it (oneDNN capped where $HUBC_CPU_ISA takes it for a narrower
    CPU): what `pick` looks stored records up under."""
    return hardware(env=forced_serve_env())


def fake_checkpoint(folder: Path, size: int, base: Path | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1024}))
    # Never loaded: only the store (its size) and hubc's damaged-file checks (a valid header) look at it.
    save_file({"weight": np.zeros(size, np.uint8)}, str(folder / "model.safetensors"))
    if base is not None:
        report = {
            "source": {"path": str(base), "hub_id": "org/base"},
            "target": "cpu",
            "recipe": {"scheme": "x"},
        }
        (folder / "report.json").write_text(json.dumps(report))
    return folder


@pytest.fixture
def stored(tmp_path: Path) -> tuple[ResultsStore, dict[str, Path]]:
    """Fake checkpoints whose latency and served perplexity are in the store, as `bench`/`pick` write them."""
    store = ResultsStore()
    folders: dict[str, Path] = {}
    version = installed_vllm_version() or ""
    for label, (tpot, spread, ppl, size) in CHECKPOINTS.items():
        base = folders.get("base")
        folders[label] = folder = fake_checkpoint(tmp_path / label, size, base=base)
        info = describe(folder)
        tok_s = 4000 / tpot
        metrics = {"tpot_ms_p50": tpot, "tpot_ms_p95": tpot * 1.2, "ttft_ms_p50": 5 * tpot, "ttft_ms_p95": 6 * tpot,
                   "output_throughput_tok_s": tok_s, "peak_memory_mib": 900.0, "tpot_ms_p50_spread": spread}
        if label == "base":  # as stores written before throughput p50/p95 were kept: only the rounds have them
            metrics["rounds"] = [{"output_throughput_tok_s": tok_s + d, "request_throughput_rps": (tok_s + d) / 8}
                                 for d in (10.0, -10.0)]
        elif label != "slow":  # as `bench` writes them now ("slow": neither, like a hand-written record)
            metrics |= {"output_throughput_tok_s_p50": tok_s, "output_throughput_tok_s_p95": 0.9 * tok_s,
                        "request_throughput_rps_p50": tok_s / 8, "request_throughput_rps_p95": 0.9 * tok_s / 8}
        store.add(Measurement(
            kind=LATENCY, checkpoint=info, traffic=TRAFFIC, hardware=served_hardware(), engine_version=version,
            metrics=metrics, settings={"server": {"dtype": "bfloat16"}},
        ))  # fmt: skip
        store.add(Measurement(
            kind=QUALITY, checkpoint=info, hardware=served_hardware(), engine_version=version,
            metrics={"perplexity": ppl, "tokens": 1022},
            settings={"text": "wikitext2-test", "seq_len": 512, "windows": 2, "windows_sha": WINDOWS_SHA,
                      "dtype": "bfloat16"},
        ))  # fmt: skip
    return store, folders


def test_pick_returns_the_known_best_from_stored_measurements(stored, tmp_path: Path) -> None:
    store, folders = stored
    config = PickConfig(
        slo=SLO(max_tpot_ms=25.0, max_ppl_increase=0.05),
        bench=BenchConfig(traffic=Traffic.parse(TRAFFIC)),
        plot=tmp_path / "pareto.png",
    )
    candidates = [describe(p) for label, p in folders.items() if label != "base"]
    started = time.monotonic()
    result = pick(candidates, describe(folders["base"]), config, store=store)

    assert time.monotonic() - started < 30  # nothing was served: the fake checkpoints would fail to load
    assert result.choice is not None and result.choice.label == "good"
    assert [c.label for c in result.candidates] == ["good", "good-but-larger", "base", "fast-but-bad", "slow"]
    assert [c.rank for c in result.candidates] == [1, 2, 3, None, None]
    assert all(c.measured_now == [] for c in result.candidates)
    by_label = {c.label: c for c in result.candidates}
    assert by_label["good"].ppl_increase == pytest.approx(0.03)
    assert by_label["good"].throughput_tok_s == pytest.approx(4000 / 14)
    assert by_label["good"].throughput_tok_s_p95 == pytest.approx(0.9 * 4000 / 14)
    # An older record: p50/p95 from its two rounds (210 and 190 tok/s); one without rounds has no p95.
    assert by_label["base"].throughput_tok_s == pytest.approx(200.0)
    assert by_label["base"].throughput_tok_s_p95 == pytest.approx(191.0)
    assert by_label["slow"].throughput_tok_s == pytest.approx(4000 / 30)
    assert by_label["slow"].throughput_tok_s_p95 is None
    assert {label for label, c in by_label.items() if c.pareto} == {
        "fast-but-bad",
        "good",
        "good-but-larger",
        "base",
    }
    assert "good has the lowest TPOT p50 (14.0 ms)" in result.reason
    assert "good-but-larger is as fast within the measurement noise" in result.reason
    assert result.plot is not None and result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A stricter quality budget changes the answer to the best-quality fast one; none at all gives no choice.
    strict = pick(
        candidates,
        describe(folders["base"]),
        PickConfig(slo=SLO(max_tpot_ms=25.0, max_ppl_increase=0.025), bench=config.bench),
        store=store,
    )
    assert strict.choice is not None and strict.choice.label == "good-but-larger"
    none = pick(
        candidates,
        describe(folders["base"]),
        PickConfig(slo=SLO(max_tpot_ms=5.0, max_ppl_increase=0.05), bench=config.bench),
        store=store,
    )
    assert none.choice is None and none.reason.startswith("no checkpoint meets TPOT p50 <= 5 ms")


def test_hubc_pick_cli_finds_the_base_from_report_json(stored, tmp_path: Path, monkeypatch) -> None:
    _, folders = stored
    monkeypatch.chdir(tmp_path)
    args = ["pick", *(str(p) for label, p in folders.items() if label != "base"), "--max-tpot-ms", "25",
            "--max-ppl-increase", "5%", "--traffic", TRAFFIC]  # fmt: skip
    human = CliRunner().invoke(main, args, catch_exceptions=False)
    assert human.exit_code == 0, human.output
    assert "best: good has the lowest TPOT p50" in human.stdout
    assert "tok/s p50/p95" in human.stdout
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in human.stdout.splitlines() if line.startswith("│")]
    tok_s = {row[1]: row[5] for row in cells}  # rank, checkpoint, TPOT, TPOT spread, TTFT, tok/s p50/p95, ...
    assert {row[1]: row[3] for row in cells}["good"] == "3.0%"  # the stored spread, as measured
    assert tok_s["good"] == "285.7 / 257.1"  # 4000 / 14, and 90% of it
    assert tok_s["slow"] == "133.3 / —"  # a record with neither p95 nor rounds
    assert (tmp_path / "hubc-pick-pareto.png").is_file()

    as_json = CliRunner().invoke(main, [*args, "--format", "json", "--plot", "p.png"], catch_exceptions=False)
    data = json.loads(as_json.stdout)
    assert data["choice"] == "good" and data["choice_path"] == str(folders["good"].resolve())
    assert [c["label"] for c in data["candidates"]][:3] == ["good", "good-but-larger", "base"]
    assert data["candidates"][0]["throughput_tok_s_p95"] == pytest.approx(0.9 * 4000 / 14)

    missed = CliRunner().invoke(
        main, [*args[:-4], "--max-tpot-ms", "1", "--max-ppl-increase", "5", *args[-2:]]
    )
    assert missed.exit_code == 1 and "no choice: no checkpoint meets" in missed.stdout


def test_hubc_pick_pulls_repo_ids_through_the_hub(stored, fake_hub, tmp_path: Path, monkeypatch) -> None:
    store, folders = stored
    sha = fake_hub.add_repo("org/good", folders["good"])  # config.json, safetensors and hubc's report.json
    from hubplugin.hub import download

    snapshot = download("org/good")  # as the CLI will: the same cached files, so the same fingerprint
    remote = describe(snapshot.path, model_id="org/good", revision=sha, name="org/good")
    for record in store.records(checkpoint=folders["good"]):
        record.checkpoint, record.id = remote, None
        store.add(record)
    monkeypatch.chdir(tmp_path)
    others = [str(p) for label, p in folders.items() if label not in ("base", "good")]
    args = ["pick", "org/good", *others, "--max-tpot-ms", "25", "--max-ppl-increase", "5", "--traffic", TRAFFIC,
            "--format", "json"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    data = json.loads(result.stdout)
    assert data["choice"] == "org/good"
    chosen = data["candidates"][0]["checkpoint"]
    assert (chosen["model_id"], chosen["revision"], chosen["path"]) == ("org/good", sha, str(snapshot.path))
    assert all(c["measured_now"] == [] for c in data["candidates"])


def test_a_tie_within_the_noise_goes_to_the_smaller_checkpoint(tmp_path: Path) -> None:
    def candidate(label: str, tpot: float, size: int, spread: float) -> Candidate:
        info = describe(fake_checkpoint(tmp_path / label, size))
        return Candidate(checkpoint=info, role="variant", tpot_ms_p50=tpot, tpot_ms_p95=tpot, ttft_ms_p50=1.0,
                         ttft_ms_p95=1.0, throughput_tok_s=1.0, peak_memory_mib=1.0, tpot_spread=spread,
                         perplexity=10.0, ppl_increase=0.01, latency_id=None, quality_id=None)  # fmt: skip

    big, small = candidate("big", 10.0, 5000, 0.10), candidate("small", 10.5, 2000, 0.02)
    choice, reason = rank([big, small], SLO(max_tpot_ms=20.0, max_ppl_increase=0.05))
    assert choice is small and [c.rank for c in (small, big)] == [1, 2]
    assert reason.startswith("small is as fast as big within the measurement noise (TPOT p50 10.5 vs 10.0 ms")
    # Outside the noise the faster one wins whatever its size.
    big.tpot_spread = small.tpot_spread = 0.01
    choice, reason = rank([big, small], SLO(max_tpot_ms=20.0, max_ppl_increase=0.05))
    assert choice is big and reason.startswith(
        "big has the lowest TPOT p50 (10.0 ms) of the 2 of 2 checkpoints"
    )
    assert "rounds varied by up to 10.0%" in rank([candidate("b2", 10.0, 5000, 0.10), candidate("s2", 10.5, 2000,
                                                  0.02)], SLO())[1]  # fmt: skip


def test_a_tie_says_which_spreads_were_measured_and_when_the_floor_decided(tmp_path: Path) -> None:
    """An unknown spread (one round) is said to be unknown, never printed as a measured 0% or as the floor."""

    def candidate(label: str, tpot: float, size: int, spread: float | None) -> Candidate:
        info = describe(fake_checkpoint(tmp_path / label, size))
        return Candidate(checkpoint=info, role="variant", tpot_ms_p50=tpot, tpot_ms_p95=tpot, ttft_ms_p50=1.0,
                         ttft_ms_p95=1.0, throughput_tok_s=1.0, peak_memory_mib=1.0, tpot_spread=spread,
                         perplexity=10.0, ppl_increase=0.01, latency_id=None, quality_id=None)  # fmt: skip

    big, small = candidate("big", 10.0, 5000, None), candidate("small", 10.1, 2000, 0.005)
    choice, reason = rank([big, small], SLO())
    assert choice is small
    assert "rounds varied by up to 0.5%" in reason and "the spread of big is unknown (one round)" in reason
    assert "differences under 2% count as a tie" in reason and "up to 2%" not in reason


def test_base_ref_needs_one_base(tmp_path: Path) -> None:
    base = fake_checkpoint(tmp_path / "base", 10)
    a = describe(fake_checkpoint(tmp_path / "a", 10, base=base))
    assert base_ref([a]) == str(base)
    assert base_ref([describe(fake_checkpoint(tmp_path / "plain", 10))]) is None
    other = fake_checkpoint(tmp_path / "other-base", 10)
    b = describe(fake_checkpoint(tmp_path / "b", 10, base=other))
    with pytest.raises(PickError, match="different base models"):
        base_ref([a, b])


@pytest.mark.vllm
def test_pick_measures_what_the_store_lacks(tmp_path: Path) -> None:
    base = build_tiny_llama(tmp_path / "tiny-base")
    variant = perturbed_copy(base, tmp_path / "tiny-noisy", scale=0.5)
    store = ResultsStore()
    config = PickConfig(
        slo=SLO(max_tpot_ms=10_000.0, max_ppl_increase=10.0),
        bench=BenchConfig(traffic=Traffic(32, 8, 1), num_prompts=4, warmups=1, min_rounds=1, max_rounds=1,
                          log_dir=tmp_path / "logs"),
        quality=QualityConfig(seq_len=64, windows=2),
    )  # fmt: skip
    messages: list[str] = []
    result = pick([describe(variant)], describe(base), config, store=store, progress=messages.append)

    assert {c.label: sorted(c.measured_now) for c in result.candidates} == {
        "tiny-base": [LATENCY, QUALITY],
        "tiny-noisy": [LATENCY, QUALITY],
    }
    assert len(store.records(kind=LATENCY)) == 2 and len(store.records(kind=QUALITY)) == 2
    assert sum("starting vLLM" in m for m in messages) == 2  # quality was measured on the benchmark's servers
    noisy = next(c for c in result.candidates if c.label == "tiny-noisy")
    assert noisy.ppl_increase is not None and noisy.ppl_increase > 0.01
    assert all(c.tpot_ms_p50 >= 0 and c.ttft_ms_p50 > 0 and c.throughput_tok_s > 0 for c in result.candidates)
    assert result.choice is not None
    for record in store.records():
        assert record.hardware == served_hardware() and record.engine_version
    latency = store.records(kind=LATENCY)[0]
    assert latency.traffic == "in=32,out=8,concurrency=1"
    assert latency.settings["benchmark"]["tool"] == "vllm bench serve"
    assert latency.settings["server"]["dtype"] == "bfloat16"

    # Everything is stored now: the same question is answered from the store, without a server.
    messages.clear()
    again = pick([describe(variant)], describe(base), config, store=store, progress=messages.append)
    assert messages == [] and all(c.measured_now == [] for c in again.candidates)
    assert again.choice is not None and again.choice.label == result.choice.label
