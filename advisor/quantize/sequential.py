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


class _Stop(Exception):
    """Raised from a hook to end a forward pass once what it needed has been seen."""


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
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for w in windows:
            try:
                model(torch.tensor([w]), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def layer_output(result):
    return result[0] if isinstance(result, tuple) else result


def stages(layer, names: dict[str, torch.nn.Module], sample: tuple[tuple, dict]) -> list[list[str]]:
    """The layer's linears in execution order, grouped into stages of linears reading the same input tensor
    (q/k/v, then o, then gate/up, then down in a Llama layer), traced from one forward pass."""
    # The input tensors themselves are kept (not their id()): a freed tensor's id can be reused by the next one,
    # which would merge o_proj's stage with gate/up's.
    order: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: order.append((n, a[0]))) for n, m in names.items()]
    try:
        with torch.inference_mode():
            layer(*sample[0], **sample[1])
    finally:
        for h in handles:
            h.remove()
    grouped: list[list[str]] = []
    last_input = None
    for name, x in order:
        if any(name in g for g in grouped):
            continue  # a linear called twice keeps its first position
        if grouped and x is last_input:
            grouped[-1].append(name)
        else:
            grouped.append([name])
        last_input = x
    unseen = [n for n in names if not any(n in g for g in grouped)]  # e.g. experts this sample did not route to
    return grouped + ([unseen] if unseen else [])


def quantize_activations_of(modules: dict[str, torch.nn.Module], act_args: dict, straight_through: bool = False):
    """Forward pre-hooks making each module see its input quantized per token, as the W8A8/FP8 kernels do; returns
    the handles. `straight_through` lets gradients pass the rounding unchanged (for learning)."""
    from advisor.quantize.rtn import fake_quantize_activations

    def hook(args_):
        def fn(module, hook_args):
            x = hook_args[0]
            q = fake_quantize_activations(x, args_)
            return ((x + (q - x).detach()) if straight_through else q,) + tuple(hook_args[1:])
        return fn

    return [m.register_forward_pre_hook(hook(act_args[n])) for n, m in modules.items() if act_args.get(n) is not None]


@torch.inference_mode()
def quantize_sequential(
    model,
    wanted: set[str] | dict,
    windows: list[list[int]],
    quantize: Callable[[str, torch.Tensor, torch.Tensor], QuantizedWeight],
    act_args: dict | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize the `wanted` linears of every decoder layer with `quantize(name, weight, hessian)`; linears outside
    the decoder stack are left to the caller.

    True-sequential: within a layer, each stage (linears sharing one input) is calibrated on the outputs of the
    stages already quantized, and every quantized weight is written back (dequantized, with its activations
    quantized when `act_args` names a scheme for them), so later stages and layers see the quantized model."""
    prefix, layers = decoder_layers(model)
    inputs = layer_inputs(model, layers, windows)
    act_args = act_args or {}
    results: dict[str, QuantizedWeight] = {}
    for i, layer in enumerate(tqdm(layers, desc="quantizing layer by layer", unit="layer", leave=False)):
        names = {f"{prefix}.{i}.{n}": m for n, m in layer.named_modules()
                 if isinstance(m, torch.nn.Linear) and f"{prefix}.{i}.{n}" in wanted}
        act_handles = []
        try:
            for stage in stages(layer, names, inputs[0]):
                hessians = _stage_hessians(layer, {n: names[n] for n in stage}, inputs)
                for name in stage:
                    module = names[name]
                    qw = quantize(name, module.weight, hessians[name])
                    module.weight.data.copy_(qw.dequantize().to(module.weight.dtype))
                    results[name] = qw
                act_handles += quantize_activations_of({n: names[n] for n in stage}, act_args)
            inputs = [((layer_output(layer(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
        finally:
            for h in act_handles:
                h.remove()
    return results


def _stage_hessians(layer, modules: dict[str, torch.nn.Module], inputs) -> dict[str, torch.Tensor]:
    """H = 2/n · XᵀX of each module's inputs over all calibration windows; each forward pass stops once every
    module of the stage has seen its input. Modules reading the same tensor (q/k/v, gate/up) share one product."""
    hessians = {n: torch.zeros(m.in_features, m.in_features) for n, m in modules.items()}
    counts = dict.fromkeys(modules, 0)
    seen: set[str] = set()
    last: list = [None, None]  # the input tensor last multiplied, and its XᵀX

    def accumulate(name):
        def hook(module, hook_args):
            if hook_args[0] is not last[0]:
                x = hook_args[0].reshape(-1, hook_args[0].shape[-1]).float()
                last[0], last[1] = hook_args[0], x.T @ x
            hessians[name] += last[1]
            counts[name] += hook_args[0].numel() // hook_args[0].shape[-1]
            seen.add(name)
            if len(seen) == len(modules):
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(accumulate(n)) for n, m in modules.items()]
    try:
        for args, kwargs in inputs:
            seen.clear()
            try:
                layer(*args, **kwargs)
            except _Stop:
                pass
            last[0] = last[1] = None
    finally:
        for h in handles:
            h.remove()
    return {n: h * (2.0 / max(counts[n], 1)) for n, h in hessians.items()}
