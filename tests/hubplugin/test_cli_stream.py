"""`hubc optimize --stream`: the same checkpoint, recipe and numbers as in memory (a GPU target's defaults: GPTQ and
the dense budget), the path named in the summary, refusals in one line before any work, and a run killed mid-way
leaves neither a checkpoint nor a staging folder behind."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from hubplugin.cli import main

# The GPU target's defaults: W4A16 GPTQ, 30% of the weights kept at W8A16 by the dense budget.
SMALL = ["--target", "a10g", "--no-serve", "--seq-len", "64", "--eval-windows", "2"]


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_streamed_run_matches_the_in_memory_one_and_says_so(tiny_llama_dir, tmp_path):
    streamed = run("optimize", str(tiny_llama_dir), *SMALL, "--stream", "--out", str(tmp_path / "s"))
    assert streamed.exit_code == 0, streamed.output
    assert "compressed and evaluated layer by layer, weights streamed from the safetensors shards (--stream)" \
        in streamed.stdout
    memory = run("optimize", str(tiny_llama_dir), *SMALL, "--no-stream", "--out", str(tmp_path / "m"))
    assert memory.exit_code == 0, memory.output
    assert "compressed and evaluated in memory (--no-stream)" in memory.stdout
    assert filecmp.cmp(tmp_path / "s" / "model.safetensors", tmp_path / "m" / "model.safetensors", shallow=False)
    reports = [json.loads((tmp_path / f / "report.json").read_text()) for f in "sm"]
    assert reports[0]["transforms"]["kept_dense"].keys() == reports[1]["transforms"]["kept_dense"].keys() != set()
    assert reports[0]["recipe"] == reports[1]["recipe"]
    assert [r["path"] for r in reports] == ["streamed layer by layer", "in memory"]
    cards = [(tmp_path / f / "README.md").read_text() for f in "sm"]
    assert "compressed and evaluated layer by layer, weights streamed from the safetensors shards" in cards[0]
    assert "weights streamed" not in cards[1]
    for a, b in zip(reports[0]["quality"], reports[1]["quality"], strict=True):
        for side in ("base", "variant"):
            assert a[side]["perplexity"] == pytest.approx(b[side]["perplexity"], rel=1e-3)
        assert a["variant"]["kl"] == pytest.approx(b["variant"]["kl"], rel=1e-3, abs=1e-6)


def test_cpu_defaults_smoothed_stream_as_in_memory(tiny_llama_dir, tmp_path):
    """The CPU target's defaults (W8A8-int8 with smoothing) stream: same checkpoint and smoothing report."""
    cpu = ["--target", "cpu", *SMALL[2:]]
    streamed = run("optimize", str(tiny_llama_dir), *cpu, "--stream", "--out", str(tmp_path / "s"))
    assert streamed.exit_code == 0, streamed.output
    memory = run("optimize", str(tiny_llama_dir), *cpu, "--no-stream", "--out", str(tmp_path / "m"))
    assert memory.exit_code == 0, memory.output
    assert filecmp.cmp(tmp_path / "s" / "model.safetensors", tmp_path / "m" / "model.safetensors", shallow=False)
    reports = [json.loads((tmp_path / f / "report.json").read_text()) for f in "sm"]
    assert reports[0]["recipe"]["smoothing"] == "search"
    transforms = [{k: v for k, v in r["transforms"].items() if k != "layer_seconds"} for r in reports]
    assert transforms[0] == transforms[1] and transforms[0]["smoothing_groups"] > 0


def test_stream_refuses_what_does_not_stream_in_one_line_before_any_work(tiny_llama_dir, tmp_path):
    result = run("optimize", str(tiny_llama_dir), *SMALL, "--factorize", "0.2", "--stream",
                 "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: --stream: pruning, factorization")
    assert not list(tmp_path.iterdir())


def _start_and_wait_for_streaming(folder, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hubplugin.cli", "optimize", str(folder), *SMALL[:-2],
                             "--eval-windows", "64", "--stream", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:  # progress lines; the run is past its checks and writing into its staging folder
        if "one layer at a time" in line:
            break
    assert proc.poll() is None
    return proc


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_run_killed_mid_way_leaves_no_checkpoint_and_no_staging_folder(tiny_llama_dir, tmp_path, how):
    """SIGTERM unwinds (the staging folder is removed at once); SIGKILL cannot be caught, and the next run for the
    same output folder removes the staging folder the dead run left."""
    out = tmp_path / "o"
    proc = _start_and_wait_for_streaming(tiny_llama_dir, out)
    proc.send_signal(getattr(signal, how))
    proc.communicate(timeout=60)
    assert proc.returncode == (143 if how == "SIGTERM" else -signal.SIGKILL)
    assert not out.exists()
    if how == "SIGTERM":
        assert not list(tmp_path.iterdir())
        return
    assert [p.name.startswith(".o.partial-") for p in tmp_path.iterdir()] == [True]
    again = run("optimize", str(tiny_llama_dir), *SMALL, "--stream", "--out", str(out))
    assert again.exit_code == 0, again.output
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
