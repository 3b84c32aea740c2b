"""Sequential, layer-by-layer calibration: decoder layer i+1 is calibrated on the outputs of the already-quantized
layer i, and only one layer's inputs and Hessians are held at a time.

The decoder stack is found from the model itself (the ModuleList as long as `num_hidden_layers`), and each layer is
called with exactly the arguments the model passes it (captured on the first layer), so rotary embeddings, masks and
architecture-specific keywords need no per-architecture code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from advisor.errors import UnsupportedArchitectureError
from advisor.quantize.rtn import QuantizedWeight


class _Captured(Exception):
    pass


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise UnsupportedArchitectureError(
        f"cannot find the {n} decoder layers of {type(model).__name__}",
        hint="calibrated methods need a ModuleList of decoder layers; use --method rtn",
    )


@torch.inference_mode()
def layer_inputs(model, layers, windows: list[list[int]]) -> list[tuple[tuple, dict]]:
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for w in windows:
            try:
                model(torch.tensor([w]), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def layer_output(result):
    return result[0] if isinstance(result, tuple) else result


@torch.inference_mode()
def quantize_sequential(
    model,
    wanted: set[str] | dict,
    windows: list[list[int]],
    quantize: Callable[[str, torch.Tensor, torch.Tensor], QuantizedWeight],
) -> dict[str, QuantizedWeight]:
    """Quantize the `wanted` linears of every decoder layer with `quantize(name, weight, hessian)`; linears outside
    the decoder stack are left to the caller. Each quantized weight is written back (dequantized) so later layers
    see the quantized model's activations."""
    prefix, layers = decoder_layers(model)
    inputs = layer_inputs(model, layers, windows)
    results: dict[str, QuantizedWeight] = {}
    for i, layer in enumerate(tqdm(layers, desc="quantizing layer by layer", unit="layer", leave=False)):
        names = {f"{prefix}.{i}.{n}": m for n, m in layer.named_modules()
                 if isinstance(m, torch.nn.Linear) and f"{prefix}.{i}.{n}" in wanted}
        hessians = {n: torch.zeros(m.in_features, m.in_features) for n, m in names.items()}
        counts = dict.fromkeys(names, 0)

        def accumulate(name, hessians=hessians, counts=counts):
            def hook(module, hook_args):
                x = hook_args[0].reshape(-1, hook_args[0].shape[-1]).float()
                hessians[name].addmm_(x.T, x)
                counts[name] += x.shape[0]
            return hook

        handles = [m.register_forward_pre_hook(accumulate(n)) for n, m in names.items()]
        try:
            for args, kwargs in inputs:
                layer(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for name, module in names.items():
            h = hessians[name] * (2.0 / max(counts[name], 1))
            qw = quantize(name, module.weight, h)
            module.weight.data.copy_(qw.dequantize().to(module.weight.dtype))
            results[name] = qw
        inputs = [((layer_output(layer(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
    return results
