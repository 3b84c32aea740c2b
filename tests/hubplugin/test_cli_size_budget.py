"""`hubc optimize --max-size`: the scheme, dense budget and pruning that fit a size budget, from a size estimate that
is the size hubc writes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from advisor.errors import ShapeError
from advisor.model import inspect_structure
from advisor.schemes import get_scheme
from advisor.size_budget import estimate, fit, parse_size
from advisor.targets import get_target
from advisor.validate import choose_group_size
from hubplugin.cli import main
from tests.tiny_models import build_tiny_model

SMALL_EVAL = ["--seq-len", "64", "--eval-windows", "2", "--format", "json"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A Qwen3-shaped model whose decoder linears outweigh its embeddings (as in real models), ~5 MB in bf16."""
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "qwen3", "qwen3", hidden_size=256,
                            intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2)


def w4_scheme(structure):
    return get_scheme("w4a16").with_group_size(choose_group_size(structure))


def test_sizes_read_as_people_write_them():
    assert parse_size("120MB") == 120_000_000
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("800MiB") == 800 * 2**20
    assert parse_size("4096") == 4096
    for bad in ("lots", "-5MB", "12 parsecs", ""):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize("target, scheme, extra", [
    ("cpu", "w8a8-int8", ["--smoothing", "none"]),
    ("a10g", "w4a16", []),
    ("cpu", "dense", []),
])
def test_the_estimate_is_the_size_written(wide, tmp_path, target, scheme, extra):
    out = tmp_path / "out"
    result = run("optimize", str(wide), "--target", target, "--scheme", scheme, "--method", "rtn", "--dense-budget",
                 "0", "--no-serve", "--out", str(out), *extra, *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)["size_after"]
    t = get_target(target)
    structure = inspect_structure(wide)
    s = None if scheme == "dense" else get_scheme(scheme).with_group_size(choose_group_size(structure))
    predicted = estimate(structure, s, t.checkpoint_dtype).total
    assert abs(predicted - written) <= 0.01 * written, (predicted, written)


def test_a_budget_takes_fewer_bits_before_it_prunes(wide):
    structure, target = inspect_structure(wide), get_target("a10g")
    w8 = estimate(structure, get_scheme("w8a16"), "bfloat16").total
    w4 = estimate(structure, w4_scheme(structure), "bfloat16").total
    roomy = fit(structure, target, int(w8 * 1.01))
    assert roomy.scheme == "w8a16" and roomy.prune == 0 and roomy.estimate <= w8 * 1.01
    between = fit(structure, target, int((w8 + w4) / 2))
    assert between.scheme == "w4a16" and between.prune == 0
    assert between.dense_budget > 0 and between.budget_scheme == "w8a16"  # the room left keeps layers at 8 bits
    tight = fit(structure, target, int(w4 * 0.95))
    assert tight.scheme == "w4a16" and tight.dense_budget == 0 and 0 < tight.prune <= 0.5
    assert tight.estimate <= w4 * 0.95
    kept = fit(structure, target, int(w8 * 1.01), scheme="w4a16")  # the user's scheme is kept
    assert kept.scheme == "w4a16" and kept.prune == 0


def test_a_budget_nothing_reaches_names_the_smallest_that_fits(wide):
    structure, target = inspect_structure(wide), get_target("a10g")
    with pytest.raises(ShapeError) as err:
        fit(structure, target, 100_000)
    smallest = int(estimate(structure, w4_scheme(structure), "bfloat16").total * 0.4)
    assert "no recipe fits" in str(err.value) and "w4a16" in str(err.value)
    reachable = parse_size(err.value.hint.split("at least ")[1].split(",")[0].replace(" ", ""))
    assert smallest < reachable < 2 * smallest


@pytest.mark.slow
def test_a_size_budget_prunes_what_quantization_cannot_reach(wide, tmp_path):
    structure = inspect_structure(wide)
    budget = int(estimate(structure, w4_scheme(structure), "bfloat16").total * 0.9)
    out = tmp_path / "budget"
    result = run("optimize", str(wide), "--target", "a10g", "--max-size", str(budget), "--method", "rtn",
                 "--heal-minutes", "0", "--out", str(out), *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recipe"]["scheme"] == "w4a16"
    assert report["size_budget"]["prune"] > 0
    assert report["transforms"]["structure_request"] == {"params": report["size_budget"]["prune"]}
    assert report["size_after"] <= budget
    assert report["linear_parameters"]["variant"] < report["linear_parameters"]["base"]
    assert "Size budget" in (out / "README.md").read_text()
    assert not [f for f in report["flags"] if "--max-size" in f]


@pytest.mark.parametrize("args, fragment", [
    (["--max-size", "lots"], "--max-size"),
    (["--max-size", "10KB"], "no recipe fits"),
    (["--max-size", "1GB", "--prune", "0.2"], "--max-size"),
])
def test_bad_budgets_fail_in_one_line_before_work(wide, tmp_path, args, fragment):
    out = tmp_path / "out"
    result = run("optimize", str(wide), "--target", "cpu", "--no-serve", "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.strip().splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_the_default_output_folder_is_named_for_the_scheme_the_budget_chose(wide, tmp_path, monkeypatch):
    """An earlier run's folder for the target's default scheme is not this run's output, and is left alone."""
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "qwen3-w4a16-a10g"
    earlier.mkdir()
    roomy = estimate(inspect_structure(wide), get_scheme("w8a16"), "bfloat16").total * 1.01
    result = run("optimize", str(wide), "--target", "a10g", "--max-size", str(int(roomy)), "--method", "rtn",
                 *SMALL_EVAL)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["recipe"]["scheme"] == "w8a16"
    assert (tmp_path / "qwen3-w8a16-a10g" / "config.json").exists() and not any(earlier.iterdir())
