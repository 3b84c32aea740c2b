"""`hubc optimize` with structure: pruning and factorization chosen on calibration text, healed by distillation,
exported as a checkpoint transformers (with hubc registered) and vLLM load, and refused in one line where it cannot
work."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from hubplugin.cli import main
from tests.tiny_models import build_tiny_model

SMALL_EVAL = ["--seq-len", "64", "--eval-windows", "2", "--format", "json"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_line_error(result, *fragments: str) -> str:
    """hubc's own errors are one `error: ...` line; an option's bad value is click's usage error (one `Error:`
    line naming the option)."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.strip().splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output
    return errors[0]


@pytest.mark.vllm
@pytest.mark.slow
def test_pruned_healed_variant_is_smaller_loads_back_and_is_served(trained_tiny_llama_dir, tmp_path):
    out = tmp_path / "pruned"
    result = run("optimize", str(trained_tiny_llama_dir), "--target", "cpu", "--scheme", "dense",
                 "--prune", "mlp=0.25,heads=0.25", "--heal-minutes", "0.1", "--out", str(out), *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # A quarter of the MLP channels and heads are gone from the decoder's linear weights.
    linear = report["linear_parameters"]
    assert linear["variant"] <= 0.8 * linear["base"]
    assert report["size_after"] < report["size_before"]
    heal = report["transforms"]["heal"]
    assert heal["steps"] > 0 and set(heal["held_out"]) == {"wikitext2-test", "licenses"}
    for text in heal["held_out"].values():
        assert {"base", "before", "after"} <= set(text)
    # The checkpoint is what the summary says: per-layer widths from its config, loadable once hubc registers them.
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoModelForCausalLM

    from advisor.architecture import register

    register()
    model = AutoModelForCausalLM.from_pretrained(out)
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert linears == linear["variant"]
    # Served by vLLM (hubc's plugin builds the per-layer shapes), its perplexity next to the evaluated one.
    assert report["served"], report["not_served_reason"]
    for tr in report["quality"]:
        assert tr["served_variant"]["perplexity"] == pytest.approx(tr["variant"]["perplexity"], rel=0.05)
    card = (out / "README.md").read_text()
    assert "## Structure" in card and "distillation" in card
    assert f"{heal['steps']} steps" in card


@pytest.mark.slow
def test_factorized_int8_variant_is_exported_and_evaluated(trained_tiny_llama_dir, tmp_path):
    out = tmp_path / "factorized"
    result = run("optimize", str(trained_tiny_llama_dir), "--target", "cpu", "--scheme", "w8a8-int8",
                 "--method", "rtn", "--factorize", "0.3", "--heal-minutes", "0", "--no-serve", "--out", str(out),
                 *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["linear_parameters"]["variant"] < report["linear_parameters"]["base"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hubc_llama" and config["hubc_low_rank"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "heal" not in report["transforms"] or not report["transforms"]["heal"]
    for tr in report["quality"]:  # evaluated from the exported low-rank int8 checkpoint
        assert 0 < tr["variant"]["perplexity"] < 10 * tr["base"]["perplexity"]


@pytest.mark.parametrize("args, fragments", [
    (["--heal-minutes", "5"], ["heal"]),
    (["--prune", "mlp=1.5"], ["mlp"]),
    (["--prune", "everything"], ["--prune"]),
])
def test_bad_structure_options_fail_in_one_line_before_work(tiny_llama_dir, tmp_path, args, fragments):
    out = tmp_path / "out"
    result = run("optimize", str(tiny_llama_dir), "--target", "cpu", "--no-serve", "--out", str(out), *args)
    one_line_error(result, *fragments)
    assert not out.exists()


def test_pruning_an_architecture_with_fused_projections_is_refused_before_work(tmp_path):
    source = build_tiny_model(tmp_path / "phi3", "phi3")
    out = tmp_path / "out"
    result = run("optimize", str(source), "--target", "cpu", "--scheme", "dense", "--prune", "mlp=0.25",
                 "--no-serve", "--out", str(out))
    one_line_error(result, "phi3")
    assert not out.exists()


def test_a_structural_variant_failing_the_gate_is_told_to_prune_less_or_heal_longer():
    from types import SimpleNamespace

    from advisor.recipe import Recipe
    from hubplugin.gate import gate_message

    gate = {"threshold": 0.05, "passed": False, "worst": {"text": "licenses", "engine": "hubc", "increase": 0.4},
            "failures": [{"text": "licenses", "engine": "hubc", "increase": 0.4}]}
    result = SimpleNamespace(recipe=Recipe(scheme="dense", target="cpu"), gate=gate,
                             transforms={"heal": {"steps": 30}}, linear_parameters={"base": 100, "variant": 80})
    message = gate_message(result)
    assert "removed 20% of the decoder's linear weights" in message and "healed 30 steps" in message
    assert "--method" not in message and "--dense-budget" not in message  # nothing is quantized


@pytest.mark.parametrize("prune", ["mlp=0.25", "mlp=0.25,allocation=uniform"])
def test_pruned_widths_are_whole_quantization_groups(trained_tiny_llama_dir, tmp_path, prune):
    """W4A16 quantizes MLP inputs in groups of 64 here (the tiny model's widths allow it): pruning keeps whole groups,
    so the pruned down_proj still quantizes and exports."""
    out = tmp_path / "pruned-w4"
    result = run("optimize", str(trained_tiny_llama_dir), "--target", "a10g", "--scheme", "w4a16", "--method", "rtn",
                 "--prune", prune, "--heal-minutes", "0", "--out", str(out), *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    group = max(g["weights"].get("group_size") or 0 for g in config["quantization_config"]["config_groups"].values())
    assert group == 64
    widths = [layer["intermediate_size"] for layer in config.get("hubc_layers", [])] or [config["intermediate_size"]]
    assert all(w % group == 0 for w in widths), (widths, group)
    linear = json.loads(result.stdout)["linear_parameters"]
    assert linear["variant"] < linear["base"]
