"""Sequential, layer-by-layer calibration: decoder layer i+1 is calibrated on the outputs of the already-quantized
layer i, and only one layer's inputs and Hessians are held at a time.

The decoder stack is found from the model itself (the ModuleList as long as `num_hidden_layers`), and each layer is
called with exactly the arguments the model passes it (captured on the first layer), so rotary embeddings, masks and
architecture-specific keywords need no per-architecture code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from advisor.device import HOST, autocast, map_tensors, move, work_device
from advisor.model import decoder_layers, group_by_input
from advisor.quantize.rtn import QuantizedWeight


class _Stop(Exception):
    """Raised from a hook to end a forward pass once what it needed has been seen."""


def native_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), where a decoder layer's forward pass
    runs about 2.4× faster in bf16 than in fp32 (measured on the demo model's layers, Zen 5)."""
    from advisor.targets import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@torch.inference_mode()
def layer_arguments(model, layers, windows: list[list[int]]) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """The hidden states entering the first decoder layer, per window, and what the model passes every layer
    besides them, per layer and window: (the positional arguments after the hidden states, the keywords). Masks and
    positions differ between the layers of some architectures (Gemma 2/3's sliding-window and global layers, the
    latter with their own rotary base). One pass per window with every layer's forward replaced by the identity:
    no layer runs (a streamed model's are on the meta device), and the pass stops before the head."""
    hidden: list[torch.Tensor] = []
    per_layer: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def stub(i):
        def forward(*args, **kwargs):
            if i == 0:
                hidden.append(args[0])
            per_layer[i].append((tuple(args[1:]), kwargs))
            return args[0]
        return forward

    def stop(module, args):
        raise _Stop

    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    handle = model.get_output_embeddings().register_forward_pre_hook(stop)
    try:
        for w in windows:
            try:
                model(torch.tensor([w]), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for layer in layers:
            del layer.forward  # back to the class's forward
    return hidden, per_layer


def layer_output(result):
    return result[0] if isinstance(result, tuple) else result


def stages(layer, names: dict[str, torch.nn.Module], sample: tuple[tuple, dict]) -> list[list[str]]:
    """The layer's linears in execution order, grouped into stages of linears reading the same input tensor
    (q/k/v, then o, then gate/up, then down in a Llama layer), traced from one forward pass."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: order.append((n, a[0]))) for n, m in names.items()]
    try:
        with torch.inference_mode():
            layer(*sample[0], **sample[1])
    finally:
        for h in handles:
            h.remove()
    grouped = group_by_input(order)
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


def quantize_sequential(
    model,
    wanted: set[str] | dict,
    windows: list[list[int]],
    quantize: Callable[[str, torch.Tensor, torch.Tensor], QuantizedWeight],
    act_args: dict | None = None,
    bf16: bool | None = None,
    device: torch.device | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize the `wanted` linears of every decoder layer with `quantize(name, weight, hessian)`; linears outside
    the decoder stack are left to the caller. The whole model in memory: see quantize_layers."""
    results: dict[str, QuantizedWeight] = {}
    for _, _, done in quantize_layers(model, wanted, windows, quantize, act_args, bf16, device=device):
        results.update(done)
    return results


def quantize_layers(
    model,
    wanted: set[str] | dict,
    windows: list[list[int]],
    quantize: Callable[[str, torch.Tensor, torch.Tensor], QuantizedWeight],
    act_args: dict | None = None,
    bf16: bool | None = None,
    load: Callable[[int, torch.nn.Module], None] | None = None,
    device: torch.device | None = None,
) -> Iterator[tuple[int, torch.nn.Module, dict[str, QuantizedWeight]]]:
    """Quantize the decoder layers one after the other, yielding (index, layer, its quantized linears) as each is
    done, its outputs on every window already computed: the caller may then write the layer out and release it
    (advisor.stream). `load(index, layer)` is called before a layer is first used (streaming reads its weights
    there); without it every layer must hold its weights already.

    True-sequential: within a layer, each stage (linears sharing one input) is calibrated on the outputs of the
    stages already quantized, and every quantized weight is written back (dequantized, with its activations
    quantized when `act_args` names a scheme for them), so later stages and layers see the quantized model.

    `bf16` (None: where the CPU has native bf16) runs the calibration forward passes in bfloat16 autocast, the
    precision GPUs serve in; each window's XᵀX is then a bf16 product, accumulated in fp32.

    `device` (a GPU: advisor.device) computes each layer there, in bf16: the layer, its inputs and Hessians are
    moved to it, and the layer and its quantized weights are back on the host when yielded; the carried hidden
    states stay on the device."""
    device = work_device(device)
    bf16 = True if device is not None else native_bf16() if bf16 is None else bf16
    prefix, layers = decoder_layers(model)
    hidden, arguments = layer_arguments(model, layers, windows)
    act_args = act_args or {}
    moved: dict = {}  # masks and rotary tables shared by the layers, moved once
    for i, layer in enumerate(tqdm(layers, desc="quantizing layer by layer", unit="layer", leave=False)):
        if load is not None:
            load(i, layer)
        if device is not None:
            layer.to(device)
            hidden = move(hidden, device)
        results: dict[str, QuantizedWeight] = {}
        inputs = [((h,) + move(args, device, moved), move(kwargs, device, moved))
                  for h, (args, kwargs) in zip(hidden, arguments[i], strict=True)]
        with torch.inference_mode():
            hidden = _quantize_layer(layer, f"{prefix}.{i}.", wanted, inputs, quantize, act_args, bf16, results)
        del inputs
        if device is not None:
            layer.to(HOST)
            results = {n: qw.to(HOST) for n, qw in results.items()}
        yield i, layer, results


def _quantize_layer(layer, prefix: str, wanted, inputs, quantize, act_args: dict, bf16: bool,
                    results: dict[str, QuantizedWeight]) -> list[torch.Tensor]:
    """Quantize one decoder layer's wanted linears into `results`; returns its output hidden states per window."""
    names = {f"{prefix}{n}": m for n, m in layer.named_modules()
             if isinstance(m, torch.nn.Linear) and f"{prefix}{n}" in wanted}
    act_handles = []
    short = {n: n[len(prefix):] for n in names}  # names inside the layer
    memo = _SettledOutputs(layer, set(short.values()))
    device = inputs[0][0][0].device
    try:
        for stage in stages(layer, names, inputs[0]):
            with autocast(device, bf16):
                hessians = _stage_hessians(layer, {n: names[n] for n in stage}, inputs, memo)
            for name in stage:
                module = names[name]
                qw = quantize(name, module.weight, hessians.pop(name))
                module.weight.data.copy_(qw.dequantize().to(module.weight.dtype))
                results[name] = qw
            act_handles += quantize_activations_of({n: names[n] for n in stage}, act_args)
            memo.settle({short[n] for n in names if n in results})
        outputs = []
        with autocast(device, bf16):
            for j, (args, kwargs) in enumerate(inputs):
                memo.window = j
                outputs.append(layer_output(layer(*args, **kwargs)).float())
        return outputs
    finally:
        memo.close()
        for h in act_handles:
            h.remove()


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return a is b or (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                          and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def clone_tree(tree, memo: dict | None = None):
    """Copies of the tensors in nested arguments (advisor.device.map_tensors: with `memo`, a tensor met twice is
    copied once and shared); outside inference mode the copies are ordinary tensors autograd can use."""
    return map_tensors(tree, lambda t: t.detach().clone(), memo)


class _SettledOutputs:
    """Reuse, within one layer, the outputs of modules whose linears are all quantized already (q/k/v once their
    stage is done, the attention block once o_proj is): for the same window and identical arguments their output
    cannot change, so the later stages' passes and the final pass skip recomputing them. Generic over
    architectures: any submodule holding linears qualifies, and a cached output is only returned for arguments
    equal to the ones it was computed from."""

    def __init__(self, layer: torch.nn.Module, wanted: set[str]) -> None:
        self.window: int | None = None
        self._pending = {}
        for name, child in layer.named_modules():
            inside = {n for n, m in child.named_modules(prefix=name) if isinstance(m, torch.nn.Linear)}
            if name and inside:
                self._pending[name] = (child, inside & wanted)
        self._wrapped: list[torch.nn.Module] = []
        self._cache: dict[tuple[str, int], tuple] = {}

    def settle(self, done: set[str]) -> None:
        for name, (child, linears) in list(self._pending.items()):
            if linears <= done:
                del self._pending[name]
                child.forward = self._cached(name, child.forward)
                self._wrapped.append(child)
                # A hit on this module never calls the ones inside it: their cached outputs are dead memory
                # (per window, the size of their activations; large on wide models).
                self._cache = {k: v for k, v in self._cache.items() if not k[0].startswith(name + ".")}

    def _cached(self, name: str, forward):
        def call(*args, **kwargs):
            key = (name, self.window)
            hit = self._cache.get(key)
            if self.window is not None and hit is not None and _same(hit[0], (args, kwargs)):
                return clone_tree(hit[1])
            out = forward(*args, **kwargs)
            if self.window is not None:
                self._cache[key] = ((args, kwargs), out)
            return out
        return call

    def close(self) -> None:
        for child in self._wrapped:
            del child.forward  # back to the class's forward
        self._wrapped.clear()
        self._cache.clear()


def _stage_hessians(layer, modules: dict[str, torch.nn.Module], inputs, memo: _SettledOutputs | None = None,
                    ) -> dict[str, torch.Tensor]:
    """H = 2/n · XᵀX of each module's inputs over all calibration windows; each forward pass stops once every
    module of the stage has seen its input. Modules reading the same tensor (q/k/v, gate/up) share one product."""
    hessians = {n: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for n, m in modules.items()}
    counts = dict.fromkeys(modules, 0)
    seen: set[str] = set()
    last: list = [None, None]  # the input tensor last multiplied, and its XᵀX

    def accumulate(name):
        def hook(module, hook_args):
            if hook_args[0] is not last[0]:
                # Under bf16 autocast the inputs are products of bf16 matmuls already, so the bf16 product is
                # exact up to its output rounding (2^-9 relative per window, averaged over the windows summed in
                # fp32); half the time of the fp32 product. GPTQ raises its dampening where this leaves the sum
                # short of positive definite.
                x = hook_args[0].reshape(-1, hook_args[0].shape[-1])
                kind = x.device.type
                x = x.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else x.float()
                with torch.autocast(kind, enabled=False):
                    last[0], last[1] = hook_args[0], torch.mm(x.T, x)
            hessians[name] += last[1]
            counts[name] += hook_args[0].numel() // hook_args[0].shape[-1]
            seen.add(name)
            if len(seen) == len(modules):
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(accumulate(n)) for n, m in modules.items()]
    try:
        for j, (args, kwargs) in enumerate(inputs):
            seen.clear()
            if memo is not None:
                memo.window = j
            try:
                layer(*args, **kwargs)
            except _Stop:
                pass
            last[0] = last[1] = None
    finally:
        for h in handles:
            h.remove()
    return {n: h * (2.0 / max(counts[n], 1)) for n, h in hessians.items()}
