"""`--device`: which device a request resolves to, the refusal of a GPU that is not there, and the device code path
(layer, inputs and Hessians moved to the device, results brought back) computing what the host path computes."""

from __future__ import annotations

import filecmp

import pytest
import torch
from test_stream import plan_for

from advisor import device as dev
from advisor.calibrate import Calibration
from advisor.errors import AdvisorError
from advisor.stream import choose_path, compress_streaming
from advisor.stream_eval import score_streaming

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")


@no_cuda
def test_auto_is_the_host_without_a_gpu_and_cuda_is_refused_in_one_line():
    assert dev.resolve("auto") == torch.device("cpu")
    assert dev.resolve(None) == torch.device("cpu")
    assert dev.resolve("CPU") == torch.device("cpu")
    with pytest.raises(AdvisorError, match="no CUDA GPU is visible") as err:
        dev.resolve("cuda")
    assert "--device cpu" in err.value.hint and "\n" not in str(err.value)
    with pytest.raises(AdvisorError, match="no CUDA GPU"):
        dev.resolve("cuda:1")


def test_unknown_devices_and_missing_gpu_indices_are_refused(monkeypatch):
    with pytest.raises(AdvisorError, match="unknown device 'tpu'"):
        dev.resolve("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve("auto") == torch.device("cuda")
    assert dev.resolve("cuda:1") == torch.device("cuda:1")
    with pytest.raises(AdvisorError, match="has 2 CUDA GPU") as err:
        dev.resolve("cuda:2")
    assert "cuda:0 to cuda:1" in err.value.hint


def test_shared_arguments_are_moved_once():
    mask = torch.ones(2, 2)
    memo: dict = {}
    first = dev.move(((mask, 3), {"m": mask, "none": None}), torch.device("meta"), memo)
    second = dev.move([mask], torch.device("meta"), memo)
    assert first[0][0].device.type == "meta" and first[0][1] == 3 and first[1]["none"] is None
    assert first[0][0] is first[1]["m"] is second[0]  # one copy, as the original was one tensor
    assert dev.move(mask, None) is mask


@pytest.fixture
def device_path(monkeypatch):
    """The device code path taken on the host: every `on_gpu` answers yes for a device given, so the layer, its
    inputs and its Hessians take the moves a GPU run takes (here to the CPU), in bf16 as on a GPU."""
    for module in ("advisor.device", "advisor.quantize.autoround"):
        monkeypatch.setattr(f"{module}.on_gpu", lambda d: d is not None)
    return torch.device("cpu")


@pytest.mark.parametrize("method", ["gptq", "autoround"])
def test_device_path_writes_the_host_paths_checkpoint(tiny_llama_dir, tmp_path, monkeypatch, device_path, method):
    """Streamed GPTQ and learned rounding through the device path write, byte for byte, what the host path writes
    with bf16 calibration (a GPU always calibrates in bf16); the path says where it ran."""
    from transformers import AutoTokenizer

    plan = plan_for(tiny_llama_dir, "w4a16", method)
    calibration = Calibration.of(plan.recipe, AutoTokenizer.from_pretrained(tiny_llama_dir))
    on_device, host = tmp_path / "device", tmp_path / "host"
    on_device.mkdir()
    host.mkdir()
    compress_streaming(tiny_llama_dir, plan, calibration, on_device, dtype=torch.bfloat16, device=device_path)
    monkeypatch.setattr("advisor.quantize.sequential.native_bf16", lambda: True)
    monkeypatch.setattr("advisor.quantize.autoround.native_bf16", lambda: True)
    compress_streaming(tiny_llama_dir, plan, calibration, host, dtype=torch.bfloat16)
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(on_device / name, host / name, shallow=False), name
    chosen = choose_path(None, plan, available=2**40, device=device_path)
    assert chosen.stream and "layer by layer on cpu" in chosen.reason  # a GPU run streams whatever the model's size


def test_device_path_evaluates_what_the_host_path_does(tiny_llama_dir, tmp_path, device_path):
    from transformers import AutoTokenizer

    from advisor import evaluate as ev

    plan = plan_for(tiny_llama_dir, "w4a16", "gptq")
    calibration = Calibration.of(plan.recipe, AutoTokenizer.from_pretrained(tiny_llama_dir))
    variant = tmp_path / "variant"
    variant.mkdir()
    compress_streaming(tiny_llama_dir, plan, calibration, variant, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = [ev.EvalText("licenses", ev.make_windows(tokenizer, ev.read_text("licenses")[1], 64, 2))]
    ((var_d, base_d),) = score_streaming(tiny_llama_dir, variant, texts, chunk=300, device=device_path)
    ((var_h, base_h),) = score_streaming(tiny_llama_dir, variant, texts, chunk=300)
    for got, want in ((var_d, var_h), (base_d, base_h)):
        assert torch.equal(got.top1, want.top1) and torch.equal(got.target_logprob, want.target_logprob)
    assert torch.equal(var_d.kl, var_h.kl) and torch.equal(var_d.agrees, var_h.agrees)


@no_cuda
def test_optimize_refuses_a_missing_gpu_before_any_work(tiny_llama_dir, tmp_path):
    from click.testing import CliRunner

    from hubplugin.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["optimize", str(tiny_llama_dir), "--target", "a10g", "--scheme", "w4a16",
                                       "--no-serve", "--device", "cuda", "--out", str(out)])
    assert result.exit_code != 0
    assert "no CUDA GPU is visible" in result.output and "Traceback" not in result.output
    assert not out.exists()
