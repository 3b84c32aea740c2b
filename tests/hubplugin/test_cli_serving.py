"""The serving commands as a user runs them: `hubc pick`, `hubc predict`, and what they see of the latency `hubc
optimize` measured."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_cli import assert_one_line_error, run

from hubplugin.cli import main


@pytest.mark.parametrize("slo, fragment", [
    (["--max-tpot-ms", "-3", "--max-ppl-increase", "5"], "--max-tpot-ms"),
    (["--max-tpot-ms", "30", "--max-ppl-increase", "-100%"], "above -100"),
    (["--max-tpot-ms", "30", "--max-ppl-increase", "nan"], "above -100"),
    (["--max-tpot-ms", "30", "--max-ppl-increase", "five"], "not a percentage"),
])
def test_pick_refuses_an_impossible_slo_before_any_work(tiny_llama_dir, slo, fragment):
    result = CliRunner().invoke(main, ["pick", str(tiny_llama_dir), *slo])
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert "Traceback" not in result.output


def _latency_checkpoint(folder, scheme=None):
    """A tiny Llama-shaped checkpoint for `hubc predict` (zero weights: only its files' shapes are read), dense or
    compressed-tensors w4a16 or w8a8-int8."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 256,
              "tie_word_embeddings": True}
    tensors = {"model.embed_tokens.weight": np.zeros((256, 64), np.float32), "model.norm.weight": np.zeros(64, np.float32)}
    for i in range(2):  # every tensor config.json implies, so hubc's check of the weight files passes
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = np.zeros(64, np.float32)
        for name, (out, inp) in {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
                                 "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
                                 "mlp.down_proj": (64, 128)}.items():
            prefix = f"model.layers.{i}.{name}"
            if scheme == "w4a16":
                tensors[f"{prefix}.weight_packed"] = np.zeros((out, inp // 8), np.int32)
                tensors[f"{prefix}.weight_scale"] = np.zeros((out, inp // 32), np.float32)
                tensors[f"{prefix}.weight_shape"] = np.array([out, inp], np.int64)
            elif scheme == "w8a8-int8":
                tensors[f"{prefix}.weight"] = np.zeros((out, inp), np.int8)
                tensors[f"{prefix}.weight_scale"] = np.zeros((out, 1), np.float32)
            else:
                tensors[f"{prefix}.weight"] = np.zeros((out, inp), np.float32)
    if scheme == "w4a16":
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}},
        }
    if scheme == "w8a8-int8":
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                      "dynamic": True}}},
        }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_predict_on_a_gpu_without_measurements_uses_the_roofline(tmp_path):
    dense, w4 = _latency_checkpoint(tmp_path / "dense"), _latency_checkpoint(tmp_path / "w4", "w4a16")
    result = run("predict", str(dense), str(w4), "--target", "a10g", "--traffic", "in=512,out=128,concurrency=1",
                 "--store", str(tmp_path / "results.sqlite"), "--format", "json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)["predictions"]
    assert [p["label"] for p in predictions] == ["dense", "w4"] and predictions[1]["formats"] == "w4a16"
    for p in predictions:
        assert p["kind"] == "prediction" and p["basis"] == "roofline" and p["measurements"] == 0
        assert p["dtype"] == "bfloat16" and p["traffic"] == "in=512,out=128,concurrency=1"
    assert predictions[1]["tpot_ms_p50"] < predictions[0]["tpot_ms_p50"]


def test_predict_on_cpu_without_measurements_says_to_run_bench(tmp_path):
    dense = _latency_checkpoint(tmp_path / "dense")
    result = run("predict", str(dense), "--target", "cpu", "--store", str(tmp_path / "results.sqlite"))
    assert_one_line_error(result, "target 'cpu'", "measurements only", "hubc bench")


def test_predict_shows_measured_next_to_predicted(tmp_path):
    from helpers import cpu_served_hardware as hardware

    from serving.store import LATENCY, Measurement, ResultsStore, describe

    # W8A8-int8: the quantized scheme every CPU variant serves (4-bit needs AVX-512).
    dense, w4 = _latency_checkpoint(tmp_path / "dense"), _latency_checkpoint(tmp_path / "w4", "w8a8-int8")
    rewritten = _latency_checkpoint(tmp_path / "rewritten")
    store = ResultsStore(tmp_path / "results.sqlite")
    runs = [(dense, "in=128,out=32,concurrency=1", 50.0, 20.0, hardware()),
            (dense, "in=512,out=128,concurrency=8", 400.0, 24.0, hardware()),
            (w4, "in=128,out=32,concurrency=1", 60.0, 25.0, hardware()),
            (w4, "in=512,out=128,concurrency=8", 500.0, 30.0, hardware()),
            (dense, "in=128,out=32,concurrency=1", 5.0, 2.0, "NVIDIA H100 80GB HBM3"),  # another machine's
            (rewritten, "in=128,out=32,concurrency=1", 50.0, 20.0, hardware())]
    for folder, traffic, ttft, tpot, hw in runs:
        store.add(Measurement(kind=LATENCY, checkpoint=describe(folder), traffic=traffic, hardware=hw,
                              engine_version="0.32.0", settings={"server": {"dtype": "bfloat16"}},
                              metrics={"ttft_ms_p50": ttft, "tpot_ms_p50": tpot}))
    (rewritten / "config.json").write_text((rewritten / "config.json").read_text() + " ")
    args = ["predict", str(dense), str(w4), "--target", "cpu", "--traffic", "in=512,out=128,concurrency=8",
            "--store", str(store.path)]
    result = run(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    assert "1 stored measurement(s) left out" in result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    for p, (ttft, tpot) in zip(predictions, [(400.0, 24.0), (500.0, 30.0)], strict=True):
        assert p["kind"] == "prediction" and p["basis"] == "measurements" and p["measurements"] == 4
        assert p["loo_count"] == 4 and p["loo_tpot_error"] is not None
        assert (p["measured"]["ttft_ms"], p["measured"]["tpot_ms"]) == (ttft, tpot)
        assert p["measured"]["predicted_tpot_ms"] is not None  # held out: fitted on the other three
        assert p["tpot_ms_p50"] == pytest.approx(tpot, rel=0.2)
    human = run(*args)
    assert human.exit_code == 0, human.output
    assert "predictions (not measurements) from 4 stored `vllm bench serve` measurements" in human.stdout
    assert "leave-one-out error" in human.stdout and "24.0 ms" in human.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--target", "tpu-v9"], ["unknown target 'tpu-v9'", "h100"]),
    (["--target", "a10g", "--traffic", "in=512,batch=4"], ["--traffic", "bad traffic item"]),
])
def test_predict_refuses_bad_input_in_one_line(tmp_path, args, fragments):
    dense = _latency_checkpoint(tmp_path / "dense")
    result = run("predict", str(dense), *args, "--store", str(tmp_path / "results.sqlite"))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_predict_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes").mkdir()
    result = run("predict", str(tmp_path / "notes"), "--target", "a10g", "--store", str(tmp_path / "results.sqlite"))
    assert_one_line_error(result, "no config.json")


@pytest.mark.vllm
@pytest.mark.slow
def test_latency_measured_by_optimize_is_used_by_pick_and_predict(tiny_llama_dir, tmp_path):
    """`hubc optimize` measures latency as `hubc bench` does (vllm bench serve, interleaved rounds) and stores it
    with the served perplexity: `hubc pick` and `hubc predict` then use those numbers without measuring again."""
    out = tmp_path / "variant"
    result = run("optimize", str(tiny_llama_dir), "--target", "cpu", "--out", str(out), "--seq-len", "64",
                 "--eval-windows", "2", "--eval-text", "wikitext2-test", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    latency = report["latency"]
    assert latency["settings"]["tool"] == "vllm bench serve" and latency["settings"]["rounds"] >= 2
    dtype = latency["settings"]["dtype"]
    for role in ("base", "variant"):
        assert latency[role]["measurement_id"] is not None and latency[role]["tpot_ms_p50"] > 0
    assert "interleaved rounds of `vllm bench serve`" in (out / "README.md").read_text()

    traffic = ["--traffic", "in=128,out=32,concurrency=1", "--dtype", dtype]
    picked = run("pick", str(out), "--max-tpot-ms", "100000", "--max-ppl-increase", "1000", *traffic,
                 "--eval-text", "wikitext2-test", "--eval-windows", "2", "--seq-len", "64",
                 "--plot", str(tmp_path / "pareto.png"), "--format", "json")
    assert picked.exit_code == 0, picked.output
    candidates = {c["role"]: c for c in json.loads(picked.stdout)["candidates"]}
    for role in ("base", "variant"):
        c = candidates[role]
        assert c["measured_now"] == [], c  # everything came from the store: nothing was served again
        assert c["latency_id"] == latency[role]["measurement_id"]
        assert c["tpot_ms_p50"] == pytest.approx(latency[role]["tpot_ms_p50"])
        assert c["tpot_spread"] == pytest.approx(latency[role]["tpot_ms_p50_spread"])
    served = next(tr["served_variant"] for tr in report["quality"] if tr["text"] == "wikitext2-test")
    assert candidates["variant"]["perplexity"] == pytest.approx(served["perplexity"])

    predicted = run("predict", str(out), "--target", "cpu", *traffic, "--format", "json")
    assert predicted.exit_code == 0, predicted.output
    (p,) = json.loads(predicted.stdout)["predictions"]
    assert p["basis"] == "measurements" and p["measurements"] == 2
    assert p["measured"]["tpot_ms"] == pytest.approx(latency["variant"]["tpot_ms_p50"])
    assert p["measured"]["ttft_ms"] == pytest.approx(latency["variant"]["ttft_ms_p50"])


def test_a_malformed_report_json_is_reported_in_one_line(tmp_path):
    folder = _latency_checkpoint(tmp_path / "dense")
    (folder / "report.json").write_text("{not json")
    result = run("predict", str(folder), "--target", "a10g", "--store", str(tmp_path / "results.sqlite"))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{folder / 'report.json'} cannot be read" in warnings[0], result.stderr
