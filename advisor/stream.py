"""Big models, one decoder layer at a time: compression and evaluation whose memory does not grow with depth.

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
- Evaluation (`score_streaming`): base and variant run layer by layer over every evaluation window, the hidden
  states of each window carried from layer to layer, and the head and the loss are computed in chunks of the
  vocabulary with running log-sum-exps, so KL over the full vocabulary is exact without two whole models, or one
  window's full distribution, in memory.

Rounding with `rtn`, `gptq` or `autoround` streams, and so do smoothing and the dense budget (its backward pass runs
from the last layer to the first, each layer read again). Structural actions choose and train across layers: those
run in memory (`streaming_refusal` says why; optimize falls back).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from advisor.errors import AdvisorError, DamagedWeightsError

STREAM_SHARD_BYTES = 512 * 1024**2
"""Largest shard the streaming writer buffers before writing it (the in-memory writer's is 4 GB): the buffer is
part of the peak memory, and a checkpoint smaller than one shard is held whole until the end, so the shard size
bounds how much the peak can differ between a shallow model and a deep one."""
VOCAB_CHUNK = 16384
"""Vocabulary entries per chunk of the head (rows × chunk × 4 bytes per model at a time)."""
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


def choose_path(requested: bool | None, plan, available: int | None = None) -> PathChoice:
    """`requested`: True (--stream), False (--no-stream) or None (automatic: stream when the model's bf16 weights,
    held IN_MEMORY_FACTOR times over by the in-memory path, would take more than RAM_SHARE of the available memory).
    An explicit --stream the plan cannot take is an error; an automatic one falls back to memory, saying why."""
    import psutil

    size = bf16_bytes(plan.structure)
    available = psutil.virtual_memory().available if available is None else available
    refusal = streaming_refusal(plan)
    if requested is False:
        return PathChoice(False, "in memory (--no-stream)")
    if requested:
        if refusal:
            raise AdvisorError(f"--stream: {refusal}", hint="drop --stream, or drop structural actions")
        return PathChoice(True, "layer by layer, weights streamed from the safetensors shards (--stream)")
    big = IN_MEMORY_FACTOR * size > RAM_SHARE * available
    what = f"bf16 weights {size / 2**30:.1f} GiB, {available / 2**30:.1f} GiB of memory available"
    if not big:
        return PathChoice(False, f"in memory ({what})")
    if refusal:
        return PathChoice(False, f"in memory although the model is large for it ({what}): {refusal}")
    return PathChoice(True, f"layer by layer, weights streamed from the safetensors shards ({what})")


# --- reading -------------------------------------------------------------------------------------------------------

class ShardReader:
    """The tensors of a safetensors checkpoint folder (one file or shards with an index), read on demand."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: folder / f for name, f in weight_map.items()}
        else:
            self.file_of = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as handle:
                    self.file_of.update(dict.fromkeys(handle.keys(), f))
        if not self.file_of:
            raise DamagedWeightsError(f"{folder} holds no safetensors weights", hint="give a model folder")

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.file_of if n.startswith(prefix)]

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (floating-point ones cast to `dtype`), each file opened once and closed after: no
        mapping of the shards outlives the call, so their pages leave this process's memory."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.file_of:
                raise DamagedWeightsError(f"{self.folder}: tensor {n} is missing",
                                          hint="the checkpoint is incomplete: download or export it again")
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for f, wanted in by_file.items():
            with safe_open(str(f), framework="pt") as handle:
                for n in wanted:
                    t = handle.get_tensor(n)
                    out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone()
        return out


def skeleton(path: Path, dtype: torch.dtype = torch.float32):
    """The model of a checkpoint folder with its parameters on the meta device (no memory) and its buffers real,
    its quantization config left aside (advisor.export.read_config); returns (model, quantization groups)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from advisor.export import read_config

    config, groups = read_config(path)
    config.name_or_path = str(path)  # as from_pretrained records it (config.json's `_name_or_path`)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), groups


def assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Set `module`'s parameters and buffers named `prefix + name` in `tensors` (replacing meta ones)."""
    for full, tensor in tensors.items():
        name = full[len(prefix):]
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor


def _meta_names(module: torch.nn.Module) -> list[str]:
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def load_outer(model, reader: ShardReader, layers_prefix: str, dtype: torch.dtype = torch.float32) -> None:
    """Read every tensor outside the decoder stack (embeddings, final norm, head); a head tied to the embedding is
    tied again."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    names = [n for n in _meta_names(model) if not n.startswith(layers_prefix + ".")]
    if tied:
        names = [n for n in names if not (head_name and n == f"{head_name}.weight")]
    assign(model, reader.read(names, dtype))
    if tied:
        model.tie_weights()


def load_layer(layer: torch.nn.Module, prefix: str, reader: ShardReader, dtype: torch.dtype = torch.float32) -> None:
    """Read one decoder layer's weights (`prefix` is its module name and a dot)."""
    assign(layer, reader.read([prefix + n for n in _meta_names(layer)], dtype), prefix)


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


# --- writing -------------------------------------------------------------------------------------------------------

class ShardWriter:
    """Writes tensors as they come into shards of at most `max_bytes` (a tensor larger than that gets a shard of its
    own), named as transformers names them, with `model.safetensors.index.json` when there are several; a single
    shard is `model.safetensors`, as advisor.export.write_checkpoint writes it."""

    def __init__(self, out: Path, max_bytes: int = STREAM_SHARD_BYTES) -> None:
        self.out, self.max_bytes = out, max_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._files: list[tuple[Path, list[str]]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self._buffer and self._buffered + size > self.max_bytes:
                self._flush()
            self._buffer[name] = tensor.detach().contiguous()
            self._buffered += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".shard-{len(self._files):05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._buffer)))
        self._buffer, self._buffered = {}, 0

    def close(self) -> int:
        """Write what is left, name the shards and write the index; returns the bytes written."""
        if self._buffer or not self._files:
            self._flush()
        n = len(self._files)
        total, weight_map = 0, {}
        for i, (path, names) in enumerate(self._files):
            final = self.out / ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            path.rename(final)
            total += final.stat().st_size
            weight_map.update(dict.fromkeys(names, final.name))
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return total


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

def compress_streaming(path: Path, plan, calibration, out: Path, dtype: torch.dtype | None = None,
                       step: Callable[[str, str], None] = lambda name, message: None,
                       max_shard_bytes: int = STREAM_SHARD_BYTES):
    """Compress the model in folder `path` under `plan` one decoder layer at a time and write the checkpoint into
    `out` (existing, empty) shard by shard; returns (advisor.export.ExportResult, advisor.compress.CompressReport,
    the plan as applied: the dense budget's choices included).
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
                                                   load=load):
            write(i, layer, quantized)
    elif recipe.method == "autoround":
        from advisor.quantize.autoround import autoround_layers, report_info, round_config

        config, errors = round_config(recipe), []
        for i, layer, quantized, error in autoround_layers(model, {n: targets[n] for n in inside},
                                                           calibration.windows, config, load=load):
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


# --- evaluation ----------------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


class _Streamed:
    """One model of a streamed evaluation: its skeleton, shards, and each window's carried hidden states and
    per-layer arguments."""

    def __init__(self, path: Path, quantized: bool) -> None:
        from advisor.model import decoder_layers

        self.path, self.quantized = path, quantized
        self.model, self.groups = skeleton(path)
        self.reader = ShardReader(path)
        self.prefix, self.layers = decoder_layers(self.model)
        load_outer(self.model, self.reader, self.prefix)
        self.hidden: list[torch.Tensor] = []
        self.arguments: list[list[tuple[tuple, dict]]] = []  # per layer, per window: (args after the hidden, kwargs)

    def _through_stubs(self, ids: list[int], replace: Callable[[int, tuple, dict], torch.Tensor]):
        """Run the model with every decoder layer's forward replaced by `replace(i, args, kwargs)`, up to the head's
        input (returned); zeros stand for the embeddings (the stubs ignore them; the embedding is released)."""
        head = self.model.get_output_embeddings()
        seen = []

        def grab(module, args):
            seen.append(args[0])
            raise _Stop

        for i, layer in enumerate(self.layers):
            layer.forward = lambda *a, i=i, **k: replace(i, a, k)
        handle = head.register_forward_pre_hook(grab)
        embeds = torch.zeros(1, len(ids), self.model.config.get_text_config().hidden_size)
        try:
            self.model(inputs_embeds=embeds, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
            for layer in self.layers:
                del layer.forward
        return seen[0]

    def enter(self, windows: list[list[int]]) -> None:
        """Embed the windows and record what the model passes each decoder layer (masks and positions may differ
        by layer: sliding-window layers)."""
        from advisor.quantize.sequential import layer_arguments

        self.hidden, self.arguments = layer_arguments(self.model, self.layers, windows)
        embedding, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if embedding.weight is not head.weight:
            release(embedding)  # the windows are embedded; the head reads its inputs from the carried states

    def run_layer(self, i: int) -> None:
        from advisor.export import dequantize_into
        from advisor.quantize.sequential import layer_output

        layer, prefix = self.layers[i], f"{self.prefix}.{i}."
        if self.quantized:
            state = self.reader.read(self.reader.names(prefix))
            dequantize_into(self.model, state, self.groups, self.path)
            layer = self.layers[i]
            assign(layer, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, prefix)
            missing = _meta_names(layer)
            if missing:
                raise DamagedWeightsError(f"{self.path}: tensors missing from the checkpoint: {prefix}{missing[0]}",
                                          hint="the checkpoint is incomplete: export it again")
        else:
            load_layer(layer, prefix, self.reader)
        for j, h in enumerate(self.hidden):
            args, kwargs = self.arguments[i][j]
            self.hidden[j] = layer_output(layer(h, *args, **kwargs))
        release(layer)

    def head_inputs(self, j: int, ids: list[int]) -> torch.Tensor:
        """Window j's input to the head (the final norm applied to its carried hidden states)."""
        return self._through_stubs(ids, lambda i, args, kwargs: self.hidden[j])[0, :-1].float()

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        head = self.model.get_output_embeddings()
        text = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        return head.weight.float(), None if head.bias is None else head.bias.float(), \
            getattr(text, "final_logit_softcapping", None)


class _Running:
    """Running statistics of one model's next-token distributions over vocabulary chunks (per row): log-sum-exp,
    top-1 and the target's logit."""

    def __init__(self, rows: int) -> None:
        self.max = torch.full((rows,), -math.inf, dtype=torch.float64)
        self.sum = torch.zeros(rows, dtype=torch.float64)
        self.top1 = torch.zeros(rows, dtype=torch.long)
        self.target = torch.zeros(rows, dtype=torch.float64)

    def add(self, logits: torch.Tensor, start: int, targets: torch.Tensor) -> torch.Tensor:
        """Fold a chunk in; returns the factor earlier sums were rescaled by (for sums kept alongside)."""
        values, index = logits.max(-1)
        values = values.double()
        better = values > self.max  # strictly: the first maximum wins, as argmax's
        new_max = torch.maximum(self.max, values)
        rescale = torch.exp(self.max - new_max)
        self.sum = self.sum * rescale + torch.exp(logits.double() - new_max[:, None]).sum(-1)
        self.top1 = torch.where(better, index + start, self.top1)
        self.max = new_max
        inside = (targets >= start) & (targets < start + logits.shape[1])
        rows = inside.nonzero()[:, 0]
        self.target[rows] = logits[rows, targets[rows] - start].double()
        return rescale

    @property
    def lse(self) -> torch.Tensor:
        return self.max + torch.log(self.sum)


def _logits(x: torch.Tensor, weight: torch.Tensor, bias, cap: float | None, start: int, end: int) -> torch.Tensor:
    out = torch.nn.functional.linear(x, weight[start:end], None if bias is None else bias[start:end])
    return out if not cap else torch.tanh(out / cap) * cap


def _window_scores(xb, xv, base_head, var_head, window: list[int], chunk: int):
    """Both models' TokenScores on one window from their head inputs, the head applied chunk by chunk."""
    from advisor.evaluate import TokenScores

    targets = torch.tensor(window[1:])
    rows = len(targets)
    base, var = _Running(rows), _Running(rows)
    kl_sum = torch.zeros(rows, dtype=torch.float64)  # Σ exp(b - max_b) · (b - v)
    vocab = base_head[0].shape[0]
    for start in range(0, vocab, chunk):
        end = min(start + chunk, vocab)
        b = _logits(xb, *base_head, start, end)
        v = _logits(xv, *var_head, start, end)
        rescale = base.add(b, start, targets)
        var.add(v, start, targets)
        kl_sum = kl_sum * rescale + (torch.exp(b.double() - base.max[:, None]) * (b - v).double()).sum(-1)
    b_lse, v_lse = base.lse, var.lse
    kl = kl_sum / base.sum - b_lse + v_lse
    base_scores = TokenScores(targets, (base.target - b_lse).float(), base.top1, (base.max - b_lse).float())
    var_scores = TokenScores(targets, (var.target - v_lse).float(), var.top1, (var.max - v_lse).float(),
                             kl.float(), base.top1 == var.top1)
    return var_scores, base_scores


@torch.inference_mode()
def score_streaming(base_path: Path, variant_path: Path, texts: list, chunk: int = VOCAB_CHUNK,
                    layer_seconds: list[float] | None = None) -> list:
    """Score the variant checkpoint against its base on every text's windows (advisor.evaluate.EvalText), both
    streamed layer by layer; returns, per text, (variant's TokenScores with KL and top-1 agreement, base's), the
    numbers advisor.evaluate.score gives with both models in memory. `layer_seconds` receives the seconds each
    decoder layer took (both models, every window)."""
    from advisor.evaluate import TokenScores

    windows = [w for t in texts for w in t.windows]
    models = [_Streamed(base_path, quantized=False), _Streamed(variant_path, quantized=True)]
    for m in models:
        m.enter(windows)
    for i in tqdm(range(len(models[0].layers)), desc="evaluating base and variant layer by layer", unit="layer",
                  leave=False):
        started = time.monotonic()
        for m in models:
            m.run_layer(i)
        if layer_seconds is not None:
            layer_seconds.append(round(time.monotonic() - started, 2))
    base, variant = models
    heads = base.head(), variant.head()
    parts = []
    for j, w in enumerate(windows):
        parts.append(_window_scores(base.head_inputs(j, w), variant.head_inputs(j, w), *heads, w, chunk))
    out, at = [], 0
    for t in texts:
        mine = parts[at: at + len(t.windows)]
        at += len(t.windows)
        out.append((TokenScores.cat([p[0] for p in mine]), TokenScores.cat([p[1] for p in mine])))
    return out
