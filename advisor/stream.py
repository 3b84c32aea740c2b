"""Big models, one decoder layer at a time: compression and evaluation whose memory does not grow with depth. This
module chooses the path (`choose_path`, `streaming_refusal`), gives layers' memory back (`release`), and compresses
(`compress_streaming`, with the dense budget's costs: `quantization_costs_streaming`); the shards are read and
written by advisor.shards, and the evaluation is advisor.stream_eval's.

The model is built as a skeleton (parameters on the meta device, buffers real: rotary frequencies are computed, not
stored); the tensors outside the decoder stack (embeddings, final norm, head) are read, and each decoder layer's
weights are read from the safetensors shards when the layer's turn comes (`safe_open`), used and released.

- Compression (`compress_streaming`): layer i is calibrated on the outputs of the compressed layer i-1 by the same
  code the in-memory path runs (advisor.quantize.sequential.quantize_layers), quantized, its tensors handed to a
  shard writer and the layer released. Smoothing searches each layer's factors as the layer is first read, on its
  full-precision inputs carried alongside (advisor.compress.LayerSmoothing, the in-memory path's code), and folds
  them again whenever the layer is read anew. The checkpoint is written shard by shard (a size limit per shard and
  `model.safetensors.index.json`, as the Hub's large checkpoints are), with the tensors and names of
  advisor.export.write_checkpoint.
- Evaluation (`score_streaming`, advisor.stream_eval): base and variant run layer by layer over every evaluation
  window, the hidden states of each window carried from layer to layer, and the head and the loss are computed in
  chunks of the vocabulary with running log-sum-exps, so KL over the full vocabulary is exact without two whole
  models, or one window's full distribution, in memory.

Rounding with `rtn`, `gptq` or `autoround` streams, and so do smoothing and the dense budget (its backward pass runs
from the last layer to the first, each layer read again). Structural actions choose and train across layers: those
run in memory (`streaming_refusal` says why; optimize falls back).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from advisor.errors import AdvisorError
from advisor.shards import STREAM_SHARD_BYTES, ShardReader, ShardWriter, load_layer, load_outer, skeleton

STREAMED_METHODS = ("rtn", "gptq", "autoround")
"""Rounding methods that work one decoder layer at a time (their in-memory code is the streamed code)."""
IN_MEMORY_FACTOR = 4
"""The in-memory path holds a model's weights about four times over in bf16 terms: base and variant side by side,
in float32, while it evaluates."""
RAM_SHARE = 0.75
"""Share of the available memory the in-memory path may plan to use before streaming is chosen."""


# --- choosing the path ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PathChoice:
    """How one run compresses and evaluates: layer by layer from the shards, or with whole models in memory."""

    stream: bool
    reason: str
    """One line saying why, for the summary and report.json."""

    @property
    def name(self) -> str:
        return "streamed layer by layer" if self.stream else "in memory"


def streaming_refusal(plan) -> str | None:
    """Why `plan` cannot stream (one line), or None when it can."""
    recipe = plan.recipe
    if plan.structural or recipe.structure or recipe.heal:
        return ("pruning, factorization, layer removal and healing choose and train across layers: they run with "
                "the whole model in memory")
    if (recipe.calibration or {}).get("self_generated"):
        return "self-generated calibration text is sampled from the whole model: it runs with the model in memory"
    if recipe.method not in STREAMED_METHODS:
        return (f"streaming rounds with {', '.join(STREAMED_METHODS)}; {recipe.method} runs with the whole model "
                "in memory")
    return None


def bf16_bytes(structure) -> int:
    """Bytes of a model's weights in bf16."""
    return 2 * structure.num_parameters


def choose_path(requested: bool | None, plan, available: int | None = None,
                device: torch.device | None = None) -> PathChoice:
    """`requested`: True (--stream), False (--no-stream) or None (automatic: stream when the model's bf16 weights,
    held IN_MEMORY_FACTOR times over by the in-memory path, would take more than RAM_SHARE of the available memory,
    or whenever the plan can stream and `device` is a GPU, where layers compute one at a time and the in-memory
    evaluation would run on the host). An explicit --stream the plan cannot take is an error; an automatic one falls
    back to memory, saying why."""
    import psutil

    from advisor.device import describe, on_gpu

    size = bf16_bytes(plan.structure)
    available = psutil.virtual_memory().available if available is None else available
    refusal = streaming_refusal(plan)
    where = f" on {describe(device)}" if on_gpu(device) else ""
    quantized_there = f"; quantization{where}" if where else ""  # the in-memory path quantizes on the GPU too
    if requested is False:
        return PathChoice(False, "in memory (--no-stream)" + quantized_there)
    if requested:
        if refusal:
            raise AdvisorError(f"--stream: {refusal}", hint="drop --stream, or drop structural actions")
        return PathChoice(True, f"layer by layer{where}, weights streamed from the safetensors shards (--stream)")
    big = IN_MEMORY_FACTOR * size > RAM_SHARE * available
    what = f"bf16 weights {size / 2**30:.1f} GiB, {available / 2**30:.1f} GiB of memory available"
    if where and not refusal:
        return PathChoice(True, f"layer by layer{where}, weights streamed from the safetensors shards ({what})")
    if not big:
        return PathChoice(False, f"in memory ({what})" + quantized_there)
    if refusal:
        return PathChoice(False, f"in memory although the model is large for it ({what}): {refusal}")
    return PathChoice(True, f"layer by layer, weights streamed from the safetensors shards ({what})")


# --- releasing memory ----------------------------------------------------------------------------------------------

def release(layer: torch.nn.Module) -> None:
    """Give a layer's memory back: its parameters and buffers go to the meta device, and the C heap returns what it
    holds free to the system (glibc keeps freed tensors of a few MB on its heap, where the next layer's tensors
    fragment it: measured on the 1B shape, +33 MB of resident memory per layer without the trim, none with it)."""
    layer.to("meta")
    trim_heap()


def trim_heap() -> None:
    """Return the C heap's free memory to the system (glibc's malloc_trim; nothing elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- the dense budget's costs ---------------------------------------------------------------------------------------

def quantization_costs_streaming(model, reader: ShardReader, schemes: dict, windows: list[list[int]],
                                 pair_sum: int | None,
                                 load: Callable[[int, torch.nn.Module], None] | None = None) -> dict:
    """advisor.sensitivity.quantization_costs, one decoder layer at a time: a forward pass stores every layer's
    input hidden states (on disk, one file per layer), the loss's gradient is taken at the head, and the backward
    pass goes from the last layer to the first, each layer read again and run forward then backward on its stored
    inputs with advisor.sensitivity.CostHooks on its linears. The model's skeleton must hold its embeddings and
    head (load_outer). `load(index, layer)` reads a layer (default: its weights from `reader`, as stored)."""
    import tempfile

    from advisor.model import decoder_layers
    from advisor.quantize.sequential import clone_tree, layer_arguments, layer_output
    from advisor.sensitivity import CostHooks, costs_of

    prefix, layers = decoder_layers(model)
    if load is None:
        def load(i, layer):
            load_layer(layer, f"{prefix}.{i}.", reader)
    wanted = {n: s for n, s in schemes.items() if s is not None}
    totals = dict.fromkeys(wanted, 0.0)
    params: dict[str, int] = {}
    memo: dict = {}
    hidden, arguments = layer_arguments(model, layers, windows)
    # Copies made outside inference mode: autograd cannot use tensors captured under it.
    hidden, arguments = clone_tree(hidden, memo), clone_tree(arguments, memo)
    del memo
    with tempfile.TemporaryDirectory(prefix="hubc-costs-") as tmp:
        stored = Path(tmp)
        with torch.no_grad():
            for i, layer in enumerate(tqdm(layers, desc="quantization cost: forward", unit="layer", leave=False)):
                torch.save(hidden, stored / f"{i}.pt")
                load(i, layer)
                hidden = [layer_output(layer(h, *a, **k)) for h, (a, k) in zip(hidden, arguments[i], strict=True)]
                release(layer)
        grads = [_head_gradient(model, layers, h, w) for h, w in zip(hidden, windows, strict=True)]
        del hidden
        for i in tqdm(reversed(range(len(layers))), total=len(layers), desc="quantization cost: backward",
                      unit="layer", leave=False):
            layer, inside = layers[i], f"{prefix}.{i}."
            load(i, layer)
            modules = {n: model.get_submodule(n) for n in wanted if n.startswith(inside)}
            params.update({n: m.weight.numel() for n, m in modules.items()})
            hooks = CostHooks(modules, wanted, pair_sum, totals)
            try:
                inputs = torch.load(stored / f"{i}.pt")
                for j, (a, k) in enumerate(arguments[i]):
                    with torch.enable_grad():
                        h = inputs[j].requires_grad_(True)
                        layer_output(layer(h, *a, **k)).backward(grads[j])
                    grads[j] = h.grad
            finally:
                hooks.remove()
                release(layer)
    return costs_of(totals, sum(len(w) - 1 for w in windows), params)


def _head_gradient(model, layers, hidden: torch.Tensor, window: list[int]) -> torch.Tensor:
    """The gradient of the window's summed next-token loss with respect to the last decoder layer's output."""
    h = hidden.detach().requires_grad_(True)
    for layer in layers:
        layer.forward = lambda *a, **k: h
    try:
        with torch.enable_grad():
            embeds = torch.zeros(1, len(window), h.shape[-1])
            logits = model(inputs_embeds=embeds, use_cache=False).logits[0, :-1].float()
            torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").backward()
    finally:
        for layer in layers:
            del layer.forward
    return h.grad


# --- compression ---------------------------------------------------------------------------------------------------

def _checkpoint_tensors(state: dict[str, torch.Tensor], quantized: dict, plan, dtype: torch.dtype | None) -> dict:
    """Tensors as write_checkpoint stores them: quantized linears' codes and scales in place of their weights, every
    other floating-point tensor in the checkpoint's dtype."""
    from advisor.export import compressed_tensors_of

    replaced = {f"{n}.weight" for n in quantized}
    out = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
           for k, v in state.items() if k not in replaced}
    for name, qw in quantized.items():
        out.update({f"{name}.{suffix}": t for suffix, t in compressed_tensors_of(qw, plan.linears[name], dtype).items()})
    return out


def compress_streaming(path: Path, plan, calibration, out: Path, dtype: torch.dtype | None = None,
                       step: Callable[[str, str], None] = lambda name, message: None,
                       max_shard_bytes: int = STREAM_SHARD_BYTES, device: torch.device | None = None):
    """Compress the model in folder `path` under `plan` one decoder layer at a time and write the checkpoint into
    `out` (existing, empty) shard by shard; returns (advisor.export.ExportResult, advisor.compress.CompressReport,
    the plan as applied: the dense budget's choices included). `device` (a GPU: advisor.device) computes GPTQ and
    learned rounding there, one layer at a time; smoothing's search and the dense budget's costs run on the host.
    The plan must stream (streaming_refusal); the checkpoint holds what write_checkpoint writes for the same plan."""
    from advisor.compress import CompressReport, check_codes
    from advisor.export import ExportResult, write_config
    from advisor.model import decoder_layers
    from advisor.quantize.rtn import quantize_weight

    refusal = streaming_refusal(plan)
    if refusal:
        raise AdvisorError(f"cannot stream this recipe: {refusal}", hint="run it in memory (--no-stream)")
    recipe = plan.recipe
    calibrates = recipe.smoothing != "none" or recipe.method != "rtn" or recipe.dense_budget > 0
    if calibrates and calibration is None:
        raise AdvisorError("this recipe calibrates (smoothing, a calibrated method or a dense budget) but was given "
                           "no calibration text", hint="give the recipe a `calibration` block")
    report = CompressReport(calibration_tokens=calibration.tokens if calibration and calibrates else 0)
    step("load", "reading the model's skeleton, embeddings and head (layers are read one at a time)")
    model, _ = skeleton(path)
    reader = ShardReader(path)
    prefix, layers = decoder_layers(model)
    load_outer(model, reader, prefix)
    smoothing = None
    if recipe.smoothing != "none":
        from advisor.compress import LayerSmoothing, smoothing_kind

        step("smoothing", f"{smoothing_kind(plan)}: per-channel scales searched on each layer as it is first read")
        smoothing = LayerSmoothing(model, plan, calibration.windows)

    def load(i: int, layer) -> None:
        load_layer(layer, f"{prefix}.{i}.", reader)
        if smoothing is not None:
            smoothing(i, layer)

    if recipe.dense_budget > 0:
        from advisor.compress import DENSE_BUDGET_WINDOWS, cost_pair_sum, with_dense_choice

        step("dense budget", f"measuring each layer's quantization cost, layer by layer (up to "
                             f"{recipe.dense_budget:.1%} of the weights kept {recipe.budget_kept})")
        costs = quantization_costs_streaming(model, reader, plan.linears, calibration.windows[:DENSE_BUDGET_WINDOWS],
                                             cost_pair_sum(recipe), load)
        plan = with_dense_choice(plan, costs, report)
    targets = plan.quant_targets
    writer = ShardWriter(out, max_shard_bytes)
    inside = {n for n in targets if n.startswith(prefix + ".")}
    outer_quantized = {n: quantize_weight(model.get_submodule(n).weight, t.weights, t.pair_sum)
                       for n, t in targets.items() if n not in inside}
    head = model.get_output_embeddings()
    skip = set()
    if plan.structure.tied_embeddings and head is not None:
        skip = {f"{n}.weight" for n, m in model.named_modules() if m is head}  # stored once, as the embedding
    outer = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix + ".") and k not in skip}
    check_codes(targets, outer_quantized)
    writer.add(_checkpoint_tensors(outer, outer_quantized, plan, dtype))
    del outer
    embedding = model.get_input_embeddings()
    if not plan.structure.tied_embeddings and head is not None and head is not embedding:
        release(head)  # written; the layers never read it
    report.layer_seconds = []
    started = [time.monotonic()]

    def write(i: int, layer, quantized: dict) -> None:
        check_codes(targets, quantized)
        state = {f"{prefix}.{i}.{k}": v for k, v in layer.state_dict().items()}
        writer.add(_checkpoint_tensors(state, quantized, plan, dtype))
        release(layer)
        if i == 0 and not plan.structure.tied_embeddings:
            release(embedding)  # every window has been embedded: the layers' inputs are carried from here
        report.layer_seconds.append(round(time.monotonic() - started[0], 2))
        started[0] = time.monotonic()

    step("quantization", f"quantizing with {recipe.scheme} ({recipe.method}), one layer at a time from the shards")
    if recipe.method == "gptq":
        from advisor.quantize.gptq import layer_quantizer
        from advisor.quantize.sequential import quantize_layers

        for i, layer, quantized in quantize_layers(model, inside, calibration.windows, layer_quantizer(targets),
                                                   act_args={n: t.activations for n, t in targets.items()},
                                                   load=load, device=device):
            write(i, layer, quantized)
    elif recipe.method == "autoround":
        from advisor.quantize.autoround import autoround_layers, report_info, round_config

        config, errors = round_config(recipe), []
        for i, layer, quantized, error in autoround_layers(model, {n: targets[n] for n in inside},
                                                           calibration.windows, config, load=load, device=device):
            errors.append(error)
            write(i, layer, quantized)
        info = report_info(errors, config)
        report.block_error, report.iterations = info["block_error"], info["iterations"]
    else:
        for i, layer in enumerate(tqdm(layers, desc="rounding layer by layer", unit="layer", leave=False)):
            load(i, layer)
            names = [n for n in inside if n.startswith(f"{prefix}.{i}.")]
            write(i, layer, {n: quantize_weight(model.get_submodule(n).weight, targets[n].weights,
                                                targets[n].pair_sum) for n in names})
    if smoothing is not None:
        smoothing.fill(report)
    step("export", "writing the last shard and the index")
    total = writer.close()
    write_config(model.config, plan, out, dtype)
    return ExportResult(out, total, sum(c is not None for c in plan.linears.values())), report, plan
