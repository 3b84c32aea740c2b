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
    # 4-bit rounding alone moves a memorised tiny model's perplexity by chance (down, too, with other kernels):
    # without its last decoder layer it surely rises.
    lossy = ["--target", "a10g", "--scheme", "w4a16", "--method", "rtn", "--dense-budget", "0", "--remove-layer", "1",
             "--heal-minutes", "0", "--max-ppl-increase", "0.001", "--out", str(out), *SMALL_EVAL]
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
     ["calibration `windows` must be a whole number ≥ 1"]),
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


@pytest.mark.parametrize("option, value", [("--eval-windows", "0"), ("--seq-len", "1"), ("--group-size", "-64"),
                                           # nan passes every bound of a plain float range: it would turn the
                                           # quality gate or the healing budget silently off
                                           ("--max-ppl-increase", "nan"), ("--heal-minutes", "nan"),
                                           ("--speedup", "inf"), ("--factorize", "nan")])
def test_optimize_refuses_empty_evaluation_or_groups_before_any_work(tmp_path, option, value):
    result = CliRunner().invoke(main, ["optimize", "demo", "--target", "cpu", "--out", str(tmp_path / "o"),
                                       option, value])
    assert result.exit_code == 2 and option in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


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


def test_calibration_text_is_the_users_file_named_in_the_card_and_never_an_eval_text(tiny_llama_dir, tmp_path):
    """--calibration-text: GPTQ calibrates on the user's file (a different checkpoint from the default text's), the
    recipe records it and the card's method names the file, not its local path; the evaluation text itself, or a missing
    file, is refused in one line before any work."""
    from advisor.evaluate import read_text

    text = read_text("licenses")[1]
    mine, held_out = tmp_path / "mine.txt", tmp_path / "held-out.txt"
    mine.write_text(text[: len(text) // 2])
    held_out.write_text(text[len(text) // 2:])
    common = ["--target", "a10g", "--scheme", "w4a16", "--method", "gptq", "--eval-text", str(held_out),
              *SMALL_EVAL]
    out, default = tmp_path / "o", tmp_path / "default"
    result = run("optimize", str(tiny_llama_dir), "--calibration-text", str(mine), "--out", str(out), *common)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "recipe.yaml").read_text())["calibration"]["text"] == str(mine)
    card = (out / "README.md").read_text()
    assert "calibrated on 8192 tokens of mine.txt," in card
    assert run("optimize", str(tiny_llama_dir), "--out", str(default), *common).exit_code == 0
    assert (out / "model.safetensors").read_bytes() != (default / "model.safetensors").read_bytes()
    mixed = tmp_path / "mixed"
    result = run("optimize", str(tiny_llama_dir), "--calibration-text", str(mine), "--calibration-text",
                 "wikitext2-valid", "--out", str(mixed), *common)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((mixed / "recipe.yaml").read_text())["calibration"]["text"] == [str(mine), "wikitext2-valid"]
    assert "tokens of mine.txt + wikitext2-valid," in (mixed / "README.md").read_text()

    copy = tmp_path / "copy.txt"
    copy.write_text(held_out.read_text())
    refused = tmp_path / "refused"
    assert_one_line_error(run("optimize", str(tiny_llama_dir), "--calibration-text", str(copy), "--out",
                              str(refused), *common), f"{copy} is the evaluation text {held_out}:")
    assert_one_line_error(run("optimize", str(tiny_llama_dir), "--calibration-text", str(tmp_path / "nope.txt"),
                              "--out", str(refused), *common), "cannot read text")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    assert_one_line_error(run("optimize", str(tiny_llama_dir), "--calibration-text", str(short), "--out",
                              str(refused), *common), "calibration text short.txt is shorter than one window")
    assert not refused.exists()
