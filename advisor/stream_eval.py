"""Streamed evaluation (`score_streaming`): base and variant run layer by layer over every evaluation window, their
weights read from the safetensors shards (advisor.shards), the hidden states of each window carried from layer to
layer, and the head and the loss are computed in chunks of the vocabulary with running log-sum-exps, so KL over the
full vocabulary is exact without two whole models, or one window's full distribution, in memory. On a GPU
(advisor.device) each layer runs there on the carried states, which stay there, and so do the head's chunks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
from tqdm import tqdm

from advisor.device import HOST, move, work_device
from advisor.errors import DamagedWeightsError
from advisor.shards import ShardReader, assign, load_layer, load_outer, meta_names, skeleton
from advisor.stream import release

VOCAB_CHUNK = 16384
"""Vocabulary entries per chunk of the head (rows × chunk × 4 bytes per model at a time)."""


class _Stop(Exception):
    pass


class _Streamed:
    """One model of a streamed evaluation: its skeleton, shards, and each window's carried hidden states and
    per-layer arguments."""

    def __init__(self, path: Path, quantized: bool, device: torch.device | None = None) -> None:
        from advisor.model import decoder_layers

        self.path, self.quantized = path, quantized
        self.device = work_device(device)  # None: the host, where the skeleton is
        self._moved: dict = {}  # masks and rotary tables shared by the layers, moved once
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
            missing = meta_names(layer)
            if missing:
                raise DamagedWeightsError(f"{self.path}: tensors missing from the checkpoint: {prefix}{missing[0]}",
                                          hint="the checkpoint is incomplete: export it again")
        else:
            load_layer(layer, prefix, self.reader)
        if self.device is not None:
            layer.to(self.device)
        for j, h in enumerate(self.hidden):
            args, kwargs = move(self.arguments[i][j], self.device, self._moved)
            self.hidden[j] = layer_output(layer(move(h, self.device), *args, **kwargs))
        release(layer)

    def head_inputs(self, j: int, ids: list[int]) -> torch.Tensor:
        """Window j's input to the head (the final norm, on the host, applied to its carried hidden states), on the
        device the head runs on."""
        x = self._through_stubs(ids, lambda i, args, kwargs: self.hidden[j].to(HOST))[0, :-1].float()
        return move(x, self.device)

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        head = self.model.get_output_embeddings()
        text = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        weight, bias = head.weight.float(), None if head.bias is None else head.bias.float()
        return move(weight, self.device), move(bias, self.device), getattr(text, "final_logit_softcapping", None)


class _Running:
    """Running statistics of one model's next-token distributions over vocabulary chunks (per row): log-sum-exp,
    top-1 and the target's logit."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.max = torch.full((rows,), -math.inf, dtype=torch.float64, device=device)
        self.sum = torch.zeros(rows, dtype=torch.float64, device=device)
        self.top1 = torch.zeros(rows, dtype=torch.long, device=device)
        self.target = torch.zeros(rows, dtype=torch.float64, device=device)

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

    device = xb.device
    targets = torch.tensor(window[1:], device=device)
    rows = len(targets)
    base, var = _Running(rows, device), _Running(rows, device)
    kl_sum = torch.zeros(rows, dtype=torch.float64, device=device)  # Σ exp(b - max_b) · (b - v)
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
    if device != HOST:
        base_scores, var_scores = (TokenScores(*(move(getattr(s, f.name), HOST) for f in fields(s)))
                                   for s in (base_scores, var_scores))
    return var_scores, base_scores


@torch.inference_mode()
def score_streaming(base_path: Path, variant_path: Path, texts: list, chunk: int = VOCAB_CHUNK,
                    layer_seconds: list[float] | None = None, device: torch.device | None = None) -> list:
    """Score the variant checkpoint against its base on every text's windows (advisor.evaluate.EvalText), both
    streamed layer by layer; returns, per text, (variant's TokenScores with KL and top-1 agreement, base's), the
    numbers advisor.evaluate.score gives with both models in memory. `layer_seconds` receives the seconds each
    decoder layer took (both models, every window). `device` (a GPU) runs the layers and the head there."""
    from advisor.evaluate import TokenScores

    windows = [w for t in texts for w in t.windows]
    models = [_Streamed(base_path, quantized=False, device=device),
              _Streamed(variant_path, quantized=True, device=device)]
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
