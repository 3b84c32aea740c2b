"""The results store: records round-trip with their provenance, queries filter, a rewritten checkpoint loses its old
numbers, a newer schema is refused, and hubc's report.json supplies model id, sha, recipe and target."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from serving.store import (
    LATENCY,
    QUALITY,
    SCHEMA_VERSION,
    Measurement,
    ResultsStore,
    StoreError,
    default_path,
    describe,
    fingerprint,
    hardware,
)


def fake_checkpoint(folder: Path, weights: bytes = b"\0" * 64, report: dict | None = None) -> Path:
    """A folder with the files the store looks at (config.json, safetensors); no real weights are needed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1024}))
    (folder / "model.safetensors").write_bytes(weights)
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report))
    return folder


REPORT = {
    "source": {
        "ref": "org/base",
        "kind": "hub",
        "path": "/nowhere/base",
        "hub_id": "org/base",
        "revision": "a" * 40,
    },
    "target": "cpu",
    "recipe": {"scheme": "w8a8-int8", "method": "rtn", "version": 1},
}


def latency_record(path: Path, tpot: float, traffic: str = "in=32,out=8,concurrency=1") -> Measurement:
    return Measurement(
        kind=LATENCY,
        checkpoint=describe(path),
        metrics={"tpot_ms_p50": tpot, "ttft_ms_p50": 3 * tpot},
        hardware=hardware(),
        engine_version="0.32.0",
        settings={"server": {"dtype": "bfloat16"}},
        traffic=traffic,
    )


def test_default_path_follows_hubc_cache(tmp_path: Path) -> None:
    assert os.environ["HUBC_CACHE"]  # set per test by the autouse fixture in tests/conftest.py
    assert default_path() == Path(os.environ["HUBC_CACHE"]) / "results.sqlite"
    store = ResultsStore()
    assert store.path == default_path() and store.path.is_file()


def test_records_round_trip_with_provenance(tmp_path: Path) -> None:
    variant = fake_checkpoint(tmp_path / "variant", report=REPORT)
    other = fake_checkpoint(tmp_path / "other", weights=b"\1" * 32)
    store = ResultsStore(tmp_path / "results.sqlite")

    first = store.add(latency_record(variant, 10.0))
    store.add(latency_record(variant, 12.0, traffic="in=512,out=128,concurrency=8"))
    store.add(latency_record(other, 20.0))
    store.add(
        Measurement(kind=QUALITY, checkpoint=describe(other), metrics={"perplexity": 25.5}, hardware="elsewhere",
                    engine_version="0.32.0", settings={"text": "wikitext2-test"})
    )  # fmt: skip

    assert first.id is not None and first.created_at
    got = store.records(kind=LATENCY, checkpoint=variant, traffic="in=32,out=8,concurrency=1")
    assert [r.metrics["tpot_ms_p50"] for r in got] == [10.0]
    record = got[0]
    assert record.checkpoint.path == str(variant.resolve())
    assert record.checkpoint.model_id == "org/base" and record.checkpoint.revision == "a" * 40
    assert record.checkpoint.base_model_id == "org/base"
    assert record.checkpoint.recipe == REPORT["recipe"] and record.checkpoint.target == "cpu"
    assert record.checkpoint.size_bytes == 64
    assert record.hardware == hardware() and record.engine == "vllm" and record.engine_version == "0.32.0"
    assert record.settings == {"server": {"dtype": "bfloat16"}}

    assert len(store.records(checkpoint=variant)) == 2
    assert len(store.records(kind=LATENCY)) == 3
    assert len(store.records(hardware=hardware())) == 3
    assert [r.kind for r in store.records(hardware="elsewhere")] == [QUALITY]
    assert [r.metrics["tpot_ms_p50"] for r in store.records(traffic="in=32,out=8,concurrency=1")] == [
        10.0,
        20.0,
    ]
    # Another process (or another ResultsStore object) sees the same rows.
    assert len(ResultsStore(store.path).records()) == 4


def test_rewritten_checkpoint_does_not_get_old_numbers(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    store = ResultsStore(tmp_path / "results.sqlite")
    store.add(latency_record(folder, 10.0))
    before = fingerprint(folder)
    time.sleep(0.01)
    (folder / "model.safetensors").write_bytes(b"\2" * 64)  # same size, new content and mtime
    assert fingerprint(folder) != before
    assert store.records(checkpoint=folder) == []
    assert len(store.records(fingerprint=before)) == 1


def test_explicit_hub_identity_wins_over_report(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "snap", report=REPORT)
    info = describe(folder, model_id="org/variant", revision="b" * 40)
    assert (info.model_id, info.revision, info.base_model_id) == ("org/variant", "b" * 40, "org/base")
    plain = describe(fake_checkpoint(tmp_path / "plain"))
    assert (plain.model_id, plain.revision, plain.recipe, plain.target) == (None, None, None, None)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    ResultsStore(path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match="schema version"):
        ResultsStore(path)


def test_a_store_of_another_layout_is_refused_before_any_measurement(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE measurements (id INTEGER PRIMARY KEY, kind TEXT)")
    with pytest.raises(StoreError, match="lacks the columns"):
        ResultsStore(path)
    path.write_text("not a database")
    with pytest.raises(StoreError, match="is not a database"):
        ResultsStore(path)


def test_hardware_names_cpu_threads_and_isa() -> None:
    name = hardware()
    assert f"{len(os.sched_getaffinity(0))} threads" in name
    flags = Path("/proc/cpuinfo").read_text()
    assert ("AVX-512" in name) == (" avx512f" in flags)
