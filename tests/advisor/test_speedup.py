"""A decode-time goal (`hubc optimize --speedup X`): the latency model's terms become milliseconds per removed weight
and per removed decoder layer, the structure search ranks removals by estimated loss per millisecond, and a goal
the model cannot reach, or a CPU with nothing measured, is refused before any work.

Latency records are synthetic (`serving.store.Measurement`s in the per-test results store, as `hubc bench` and
`hubc optimize` store them); nothing is served.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import build_tiny_llama, cpu_served_hardware
from test_latency import store_runs, write_checkpoint

from advisor.checkpoint_features import LatencyModelError, checkpoint_features
from advisor.latency import LatencyModel, NoMeasurementsError, speedup_plan
from advisor.measurement import Traffic
from advisor.model import load_model, structure_of
from advisor.structure_search import SAVED_MS, choose
from advisor.targets import get_target
from hubplugin.cli import main
from serving.store import LATENCY, ResultsStore

LOAD = Traffic(128, 32, 1)  # what `hubc optimize` measures and plans at


def cpu_timing(features, load):
    """A CPU-like decode step: a fixed cost, a cost per byte and a larger one per decoder layer."""
    return 10.0 + 1e-6 * sum(features.prefill_flops(load).values()), \
        2.0 + 1e-5 * sum(features.weight_bytes.values()) + 4.0 * features.layers


def test_a_step_that_pays_per_layer_is_met_by_removing_a_layer_and_one_that_does_not_by_width(
        trained_tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    from advisor.evaluate import make_windows, read_text

    model = load_model(trained_tiny_llama_dir)
    windows = make_windows(AutoTokenizer.from_pretrained(trained_tiny_llama_dir), read_text("wikitext2-valid")[1], 64, 4)
    structure = structure_of(model)
    params = {li.name: sum(x.in_features * x.out_features for x in structure.linears if x.name.startswith(li.name + "."))
              for li in structure.layers}
    per_layer = next(iter(params.values()))
    # Per layer, a decode step pays 100x what all the layer's weights cost: one layer removed meets the goal.
    cache: dict = {}
    deep = choose(model, structure, {"latency": {"save_ms": 50.0, "ms_per_param": 1e-3 / per_layer,
                                                 "ms_per_layer": 100.0}}, windows, cache)
    assert list(deep.values()) == ["remove-layer"] and cache[SAVED_MS] >= 50.0
    # Nothing per layer: the goal is a share of the weights, met across the width (cheaper per weight than a layer).
    cache = {}
    wide = choose(model, structure, {"latency": {"save_ms": 0.1, "ms_per_param": 1.0 / per_layer,
                                                 "ms_per_layer": 0.0}}, windows, cache)
    assert wide and all(isinstance(a, dict) and "prune" in a for a in wide.values())
    assert cache[SAVED_MS] >= 0.1


def test_the_plan_reads_the_fitted_terms_and_refuses_what_half_the_decoder_cannot_save(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "results.sqlite")
    base = write_checkpoint(tmp_path / "base", layers=6, mlp=256)
    for folder in (base, write_checkpoint(tmp_path / "width", layers=6, mlp=128),
                   write_checkpoint(tmp_path / "depth", layers=4, mlp=256)):
        store_runs(store, folder, [LOAD, Traffic(512, 64, 4)], hardware="cpu-box", dtype="float32", timing=cpu_timing)
    model = LatencyModel.fit(store.records(kind=LATENCY, hardware="cpu-box"), "cpu", "float32")
    features = checkpoint_features(base, "float32")
    linear = 6 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 256)
    plan = speedup_plan(model, features, LOAD, 1.3, linear, "dense", 4.0)
    assert plan.basis == "measurements" and plan.measurements == 6
    assert plan.base_ms == pytest.approx(cpu_timing(features, LOAD)[1], rel=1e-3)
    assert plan.start_ms == pytest.approx(plan.base_ms, rel=1e-6)  # dense stays dense
    assert plan.goal_ms == pytest.approx(plan.base_ms / 1.3)
    assert plan.ms_per_layer == pytest.approx(4.0, rel=1e-2)
    assert plan.ms_per_param == pytest.approx(4.0 * 1e-5, rel=1e-2)
    assert plan.save_ms == pytest.approx(plan.base_ms - plan.goal_ms)
    assert not plan.notes
    # One checkpoint at one traffic: nothing tells a layer from its bytes, and the plan says so.
    alone = ResultsStore(tmp_path / "alone.sqlite")
    store_runs(alone, base, [LOAD], hardware="cpu-box", dtype="float32", timing=cpu_timing)
    bytes_only = speedup_plan(LatencyModel.fit(alone.records(kind=LATENCY, hardware="cpu-box"), "cpu", "float32"),
                              features, LOAD, 1.1, linear, "dense", 4.0)
    assert bytes_only.ms_per_layer == 0 and "cannot tell a cost per decoder layer" in bytes_only.notes[0]
    with pytest.raises(LatencyModelError, match="more than half the decoder") as refused:
        speedup_plan(model, features, LOAD, 4.0, linear, "dense", 4.0)
    assert "--speedup" in refused.value.hint
    with pytest.raises(NoMeasurementsError, match="no w8a8-int8 checkpoint measured"):
        speedup_plan(model, features, LOAD, 1.3, linear, "w8a8-int8", 1.03)


def _store_for(folder: Path, target) -> None:
    """Records of `folder` and of two checkpoints of its shape, one a layer shallower and one narrower (so the fit can
    tell a cost per layer from a cost per byte), under the hardware `hubc optimize` looks up."""
    serve = target.schemes["dense"].serve_dtype or target.serve_dtype
    config = json.loads((folder / "config.json").read_text())
    shape = {"hidden": config["hidden_size"], "heads": config["num_attention_heads"],
             "kv_heads": config["num_key_value_heads"], "head_dim": config["head_dim"], "vocab": config["vocab_size"]}
    layers, mlp = config["num_hidden_layers"], config["intermediate_size"]
    store = ResultsStore()
    for f in (folder, write_checkpoint(folder.parent / "shallower", layers=layers - 1, mlp=mlp, **shape),
              write_checkpoint(folder.parent / "narrower", layers=layers, mlp=mlp // 2, **shape)):
        store_runs(store, f, [LOAD, Traffic(512, 64, 4)], hardware=cpu_served_hardware(), dtype=serve,
                   timing=cpu_timing)


def test_optimize_speedup_plans_from_this_cpus_measurements_and_reports_the_plan(tmp_path: Path) -> None:
    folder = build_tiny_llama(tmp_path / "tiny")
    _store_for(folder, get_target("cpu"))
    out = tmp_path / "fast"
    result = CliRunner().invoke(main, ["optimize", str(folder), "--target", "cpu", "--scheme", "dense", "--speedup",
                                       "1.3", "--heal-minutes", "0", "--out", str(out), "--no-serve", "--seq-len",
                                       "64", "--eval-windows", "2", "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    speed = report["speedup"]
    assert speed["speedup"] == 1.3 and speed["basis"] == "measurements" and speed["measurements"] == 6
    assert speed["ms_per_layer"] == pytest.approx(4.0, rel=0.05)
    # A step pays 4 ms per layer: the variant has one layer fewer and is predicted, from its own files, to meet it.
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert speed["predicted_speedup"] >= 1.3
    assert "Speed-up asked: 1.3x" in (out / "README.md").read_text()


def test_speedup_on_a_cpu_with_nothing_measured_says_to_run_bench_and_writes_nothing(tmp_path: Path) -> None:
    folder = build_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "fast"
    result = CliRunner().invoke(main, ["optimize", str(folder), "--target", "cpu", "--scheme", "dense", "--speedup",
                                       "1.3", "--out", str(out), "--no-serve"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error") and "hubc bench" in error and "Traceback" not in result.output
    assert not out.exists()
    refused = CliRunner().invoke(main, ["optimize", str(folder), "--target", "cpu", "--speedup", "1.3", "--prune",
                                        "0.2", "--no-serve"], catch_exceptions=False)
    assert refused.exit_code == 2 and "--speedup" in refused.stderr


def test_on_a_gpu_target_without_measurements_the_roofline_plans_and_a_faster_scheme_may_be_enough(tmp_path: Path):
    folder = build_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "w8"
    result = CliRunner().invoke(main, ["optimize", str(folder), "--target", "a10g", "--scheme", "w8a16", "--speedup",
                                       "1.2", "--heal-minutes", "0", "--out", str(out), "--no-serve", "--seq-len",
                                       "64", "--eval-windows", "2", "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    speed = json.loads(result.stdout)["speedup"]
    assert speed["basis"] == "roofline" and speed["measurements"] == 0
    # 8-bit weights read half the bytes of bf16 ones: the roofline meets 1.2x without removing anything.
    assert speed["save_ms"] == 0 and speed["predicted_speedup"] >= 1.2
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert "structure removed nothing" in (out / "README.md").read_text()


def test_a_recipe_file_asking_for_a_speedup_is_planned_like_the_flag(tmp_path: Path) -> None:
    folder = build_tiny_llama(tmp_path / "tiny")
    recipe = tmp_path / "fast.yaml"
    recipe.write_text("scheme: w8a16\ntarget: a10g\nstructure: {speedup: 1.2}\n"
                      "calibration: {text: wikitext2-valid, windows: 2, seq_len: 64}\n")
    out = tmp_path / "w8"
    result = CliRunner().invoke(main, ["optimize", str(folder), "--target", "a10g", "--recipe", str(recipe), "--out",
                                       str(out), "--no-serve", "--seq-len", "64", "--eval-windows", "2", "--format",
                                       "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    speed = json.loads(result.stdout)["speedup"]
    assert speed["speedup"] == 1.2 and speed["basis"] == "roofline" and speed["predicted_speedup"] >= 1.2
