"""`hubc` as a user runs it: fast help, one-line errors that write nothing, and the optimize → push path against a
fake Hub driven by the real huggingface_hub client."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from hubplugin.cli import main

SMALL_EVAL = ["--no-serve", "--seq-len", "64", "--eval-windows", "2"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    # Progress chatter ("» step") may precede it; the error itself is exactly one line, and the last.
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output


def test_help_does_not_import_torch_or_vllm():
    code = (
        "import sys\nfrom hubplugin.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "optimize" in out and "targets" in out


def test_targets_lists_the_catalog_as_json():
    result = run("targets", "--format", "json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert {"cpu", "t4", "a10g", "l4", "a100-80gb", "h100", "h200"} <= set(data)
    assert data["a10g"]["default_scheme"] == "w4a16"


def test_unknown_target_lists_the_valid_ones(tmp_path):
    result = run("optimize", "demo", "--target", "tpu-v9", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "unknown target 'tpu-v9'", "a10g", "h100")
    assert not (tmp_path / "o").exists()


def test_scheme_the_target_cannot_serve(tiny_llama_dir, tmp_path):
    result = run("optimize", str(tiny_llama_dir), "--target", "cpu", "--scheme", "w8a16", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "w8a16", "w8a8-int8")
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_model(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    result = run("optimize", str(folder), "--target", "cpu", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "no config.json")
    assert not (tmp_path / "o").exists()


def test_existing_output_folder_is_left_alone(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("optimize", str(tiny_llama_dir), "--target", "cpu", "--out", str(out))
    assert_one_line_error(result, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unknown_repo_id(fake_hub, tmp_path):
    result = run("optimize", "org/does-not-exist", "--target", "cpu", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "org/does-not-exist")
    assert not (tmp_path / "o").exists()


def test_repo_that_needs_a_token(fake_hub, tiny_llama_dir, tmp_path):
    fake_hub.add_repo("org/gated", tiny_llama_dir, gated=True)
    result = run("optimize", "org/gated", "--target", "cpu", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "HF_TOKEN")
    assert not (tmp_path / "o").exists()


def test_push_without_token_fails_before_any_work(fake_hub, tiny_llama_dir, tmp_path):
    fake_hub.add_repo("org/tiny", tiny_llama_dir)
    result = run("optimize", "org/tiny", "--target", "cpu", "--push", "org/tiny-w8", "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "token")
    assert not (tmp_path / "o").exists()
    assert not any(r.method == "POST" for r in fake_hub.requests)


@pytest.mark.slow
def test_optimize_downloads_compresses_and_pushes_one_commit(fake_hub, tiny_llama_dir, tmp_path, monkeypatch):
    sha = fake_hub.add_repo("org/tiny", tiny_llama_dir)
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    out = tmp_path / "variant"
    result = run("optimize", "org/tiny", "--target", "cpu", "--push", "org/tiny-w8-cpu", "--out", str(out),
                 "--format", "json", *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source"]["revision"] == sha  # the exact commit that was compressed is recorded
    assert {"README.md", "config.json", "model.safetensors", "recipe.yaml", "report.json"} <= {
        p.name for p in out.iterdir()
    }
    pushed = fake_hub.files("org/tiny-w8-cpu")
    assert len([c for c in fake_hub.commits("org/tiny-w8-cpu") if c.message.startswith("hubc")]) == 1
    card = pushed["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "org/tiny" and meta["base_model_relation"] == "quantized"
    for tr in report["quality"]:  # this run's numbers, not anyone else's
        assert f"{tr['variant']['perplexity']:.3f}" in card
        assert f"{tr['base']['perplexity']:.3f}" in card
    assert json.loads(pushed["config.json"])["quantization_config"]["format"] == "int-quantized"
    assert report["push_url"].endswith("org/tiny-w8-cpu")


def test_quality_gate_flags_the_variant_and_push_refuses_it(fake_hub, trained_tiny_llama_dir, tmp_path, monkeypatch):
    """A variant over --max-ppl-increase is flagged in summary, card and report; --push keeps it local and commits
    nothing, `hubc push` refuses it too, and both accept it with --accept-quality-loss."""
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    out = tmp_path / "o"
    lossy = ["--target", "a10g", "--scheme", "w4a16", "--method", "rtn", "--dense-budget", "0",
             "--max-ppl-increase", "0.001", "--out", str(out), *SMALL_EVAL]
    result = run("optimize", str(trained_tiny_llama_dir), *lossy, "--push", "org/tiny-w4")
    assert_one_line_error(result, "not pushed to org/tiny-w4", "quality gate", "--accept-quality-loss")
    assert "quality gate failed" in result.stdout and "--method gptq" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["gate"]["passed"] is False and report["gate"]["threshold"] == 0.001
    assert report["push_url"] is None and "quality gate" in report["push_refused"]
    card = (out / "README.md").read_text()
    assert "**fails**" in card and "Warning:** quality gate failed" in card
    assert "org/tiny-w4" not in fake_hub.repos or not fake_hub.commits("org/tiny-w4")

    refused = run("push", str(out), "org/tiny-w4")
    assert_one_line_error(refused, "not pushed", "--accept-quality-loss")
    accepted = run("push", str(out), "org/tiny-w4", "--accept-quality-loss")
    assert accepted.exit_code == 0, accepted.output
    assert "**fails**" in fake_hub.files("org/tiny-w4")["README.md"].decode()  # the card keeps saying so

    again = run("optimize", str(trained_tiny_llama_dir), *lossy, "--overwrite", "--push", "org/tiny-w4-b",
                "--accept-quality-loss")
    assert again.exit_code == 0, again.output
    assert "quality gate failed" in fake_hub.files("org/tiny-w4-b")["README.md"].decode()


@pytest.mark.slow
def test_push_that_fails_midway_leaves_no_repo(fake_hub, tiny_llama_dir, tmp_path, monkeypatch):
    fake_hub.add_repo("org/tiny", tiny_llama_dir)
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    fake_hub.fail_next_commit = True
    result = run("optimize", "org/tiny", "--target", "cpu", "--push", "org/tiny-w8-cpu", "--out",
                 str(tmp_path / "variant"), *SMALL_EVAL)
    assert_one_line_error(result, "org/tiny-w8-cpu", "hubc push")
    assert "org/tiny-w8-cpu" not in fake_hub.repos


def test_overwrite_replaces_only_a_complete_checkpoint(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = run("optimize", str(tiny_llama_dir), "--target", "cpu", "--out", str(out), "--overwrite", *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert "old.txt" not in names and {"README.md", "config.json", "recipe.yaml", "report.json"} <= names
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # no staging folder left behind


def test_mixed_precision_recipe_file_is_applied_and_recorded(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(yaml.safe_dump({
        "scheme": "w8a8-int8", "target": "cpu",
        "overrides": {"re:.*mlp\\.down_proj": "dense", "model.layers.0.self_attn.o_proj": "dense"},
    }))
    out = tmp_path / "o"
    result = run("optimize", str(tiny_llama_dir), "--target", "cpu", "--recipe", str(recipe), "--out", str(out),
                 "--format", "json", *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qcfg["ignore"]) == {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                                   "model.layers.0.self_attn.o_proj"}
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert written["version"] == 2 and written["actions"]["model.layers.0.self_attn.o_proj"] == "dense"
    assert json.loads(result.stdout)["quantized_modules"] == 14 - 3


def test_dense_budget_keeps_the_costliest_layers_dense_and_says_so(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    result = run("optimize", str(tiny_llama_dir), "--target", "cpu", "--dense-budget", "0.2", "--out", str(out),
                 *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    kept = json.loads((out / "report.json").read_text())["transforms"]["kept_dense"]
    assert kept
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert written["dense_budget"] == 0.2 and all(written["actions"][n] == "dense" for n in kept)
    assert set(kept) <= set(json.loads((out / "config.json").read_text())["quantization_config"]["ignore"])
    card = (out / "README.md").read_text()
    assert "kept dense" in card and all(n in card for n in kept)
    assert "kept dense" in result.stdout


def test_gpu_default_keeps_the_costliest_weights_at_8_bits(tiny_llama_dir, tmp_path):
    """`--target a10g` with no other flag: W4A16 by GPTQ, the costliest 30% of the weights at w8a16, one config group
    per scheme, the bf16 checkpoint sized against the bf16 base, and the card saying all of it."""
    out = tmp_path / "o"
    result = run("optimize", str(tiny_llama_dir), "--target", "a10g", "--out", str(out), *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    recipe = report["recipe"]
    assert (recipe["scheme"], recipe["method"], recipe["budget_scheme"]) == ("w4a16", "gptq", "w8a16")
    kept = report["transforms"]["kept_dense"]
    assert kept and all(recipe["actions"][n] == "w8a16" for n in kept)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    bits = sorted(g["weights"]["num_bits"] for g in qcfg["config_groups"].values())
    assert bits == [4, 8] and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert report["checkpoint_dtype"] == "bfloat16" and report["size_original"] > report["size_before"]
    card = (out / "README.md").read_text()
    assert "kept at w8a16" in card and "(bfloat16)" in card and "Quality gate" in card
    assert "kept at w8a16" in result.stdout


@pytest.mark.parametrize("content,extra,fragments", [
    ({"scheme": "w8a8-int8", "target": "cpu"}, ["--scheme", "fp8"], ["--recipe", "--scheme"]),
    ({"scheme": "w8a8-int8", "target": "cpu", "overrides": {"model.layers.0.self_attn.k_proj": "dense"}}, [],
     ["q_proj/k_proj/v_proj", "same scheme"]),
    ({"scheme": "w8a8-int8", "target": "cpu", "module_path": "os.system"}, [], ["unknown recipe keys: module_path"]),
    ({"target": "cpu"}, [], ["the recipe has no `scheme`"]),
    ({"scheme": "w8a8-int8", "target": "cpu", "version": 2, "overrides": {}}, [], ["`overrides` is version 1's"]),
    ({"scheme": "w8a8-int8", "target": "cpu", "actions": {"model.layers.0": "prune-everything"}}, [],
     ["unknown recipe action 'prune-everything'"]),
    ({"scheme": "w8a8-int8", "target": "cpu", "calibration": {"text": "wikitext2-valid", "windows": 0}}, [],
     ["calibration `windows` must be a positive"]),
])
def test_bad_recipe_files_fail_in_one_line_before_work(tiny_llama_dir, tmp_path, content, extra, fragments):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(content))
    result = run("optimize", str(tiny_llama_dir), "--target", "cpu", "--recipe", str(recipe),
                 "--out", str(tmp_path / "o"), *extra, *SMALL_EVAL)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "o").exists()


def test_push_puts_stored_bench_measurements_into_the_card(fake_hub, tiny_llama_dir, tmp_path, monkeypatch):
    from serving.store import LATENCY, Measurement, ResultsStore, describe

    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    out = tmp_path / "variant"
    assert run("optimize", str(tiny_llama_dir), "--target", "cpu", "--out", str(out), *SMALL_EVAL).exit_code == 0
    before = (out / "README.md").read_text()
    metrics = {"ttft_ms_p50": 41.5, "ttft_ms_p95": 52.25, "tpot_ms_p50": 17.125, "tpot_ms_p95": 19.5,
               "itl_ms_p50": 17.0, "itl_ms_p95": 21.0, "output_throughput_tok_s_p50": 58.4,
               "output_throughput_tok_s_p95": 55.1, "request_throughput_rps_p50": 1.8,
               "request_throughput_rps_p95": 1.7, "peak_memory_mib": 1234.0}
    record = Measurement(kind=LATENCY, checkpoint=describe(out), metrics=metrics, hardware="Some CPU, 2 threads, AVX2",
                         engine_version="0.32.0", traffic="in=128,out=32,concurrency=1",
                         settings={"server": {"dtype": "bfloat16"}, "benchmark": {"num_prompts": 8, "rounds": 3}})
    ResultsStore().add(record)
    for _ in range(2):  # pushing again replaces the section, never duplicates it
        result = run("push", str(out), "org/tiny-bench")
        assert result.exit_code == 0, result.output
    card = fake_hub.files("org/tiny-bench")["README.md"].decode()
    row = [line for line in card.splitlines() if line.startswith("| in=128,out=32,concurrency=1")]
    assert len(row) == 1
    for cell in ("Some CPU, 2 threads, AVX2", "0.32.0", "41.5 / 52.2", "17.1 / 19.5", "58.4 / 55.1", "1234",
                 "dtype bfloat16", "8 prompts", "3 rounds"):
        assert cell in row[0], (cell, row[0])
    assert card.replace(card[card.index("<!-- hubc:bench -->"):card.index("<!-- /hubc:bench -->")], "") == \
        before.replace(before[before.index("<!-- hubc:bench -->"):before.index("<!-- /hubc:bench -->")], "")


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


@pytest.mark.parametrize("option, value", [("--eval-windows", "0"), ("--seq-len", "1"), ("--group-size", "-64")])
def test_optimize_refuses_empty_evaluation_or_groups_before_any_work(tmp_path, option, value):
    result = CliRunner().invoke(main, ["optimize", "demo", "--target", "cpu", "--out", str(tmp_path / "o"),
                                       option, value])
    assert result.exit_code == 2 and option in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


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
    from serving.store import LATENCY, Measurement, ResultsStore, describe, hardware

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


def test_sigterm_mid_run_leaves_no_partial_checkpoint(tiny_llama_dir, tmp_path):
    """A job runner stopping hubc (SIGTERM) gets the same clean unwinding as Ctrl-C: no output folder, no staging
    folder, exit code 143."""
    import os
    import signal
    import time

    out = tmp_path / "o"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hubplugin.cli", "optimize", str(tiny_llama_dir), "--target", "cpu",
                             "--out", str(out), "--no-serve", "--eval-windows", "64", "--seq-len", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".o.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated"
    assert not out.exists() and not list(tmp_path.glob(".o*"))


def test_evaluation_windows_longer_than_the_models_context_fail_before_any_work(tiny_llama_dir, tmp_path):
    result = run("optimize", str(tiny_llama_dir), "--target", "cpu", "--out", str(tmp_path / "o"), "--seq-len", "1024")
    assert_one_line_error(result, "--seq-len 1024", "context (512 tokens)")
    assert not (tmp_path / "o").exists()


def test_asymmetric_activations_are_exported_carded_and_refused_where_they_do_not_apply(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    result = run("optimize", str(tiny_llama_dir), "--target", "cpu", "--out", str(out), "--activations", "asymmetric",
                 "--no-serve", *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["input_activations"]["symmetric"] for g in groups.values()} == {False}
    assert yaml.safe_load((out / "recipe.yaml").read_text())["activations"] == "asymmetric"
    assert "a zero point per token" in (out / "README.md").read_text()

    for scheme, fragment in (("fp8", "no zero point"), ("w8a16", "w8a16 has none")):
        bad = run("optimize", str(tiny_llama_dir), "--target", "a10g", "--scheme", scheme, "--out",
                  str(tmp_path / scheme), "--activations", "asymmetric")
        assert_one_line_error(bad, fragment)
        assert not (tmp_path / scheme).exists()


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
