"""Where layer-by-layer work computes (`--device auto|cpu|cuda`).

Sequential quantization (GPTQ, learned rounding, round to nearest: advisor.quantize.sequential and
advisor.quantize.autoround) and the streamed evaluation (advisor.stream_eval) work one decoder layer at a time. On a
GPU the layer being worked on, its calibration inputs and its Hessians are moved to the device, computed there in
bf16 autocast (what GPUs serve in), and the layer goes back to the host (or is written and released, streaming)
before the next one is read: the rest of the model, and everything written, stays on the host, so the GPU's memory
bounds one layer, not the model. Pruning, factorization and healing choose and train across layers and run on the
host.

`resolve` is called before any model is read, so a request the machine cannot honour is a one-line error up front.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager

import torch

from advisor.errors import AdvisorError

CHOICES = ("auto", "cpu", "cuda")
HOST = torch.device("cpu")


def resolve(requested: str | None) -> torch.device:
    """The torch device of a `--device` value: `auto` (or None) is the first CUDA GPU when torch sees one, else the
    CPU; `cuda` / `cuda:N` must exist."""
    value = (requested or "auto").strip().lower()
    if value == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else HOST
    if value == "cpu":
        return HOST
    if not re.fullmatch(r"cuda(:\d+)?", value):
        raise AdvisorError(f"unknown device {requested!r}", hint=f"use one of {', '.join(CHOICES)} (or cuda:N)")
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        raise AdvisorError(f"--device {value}: no CUDA GPU is visible here ({build})",
                           hint="use --device cpu, or --device auto to use a GPU only where there is one")
    device = torch.device(value)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise AdvisorError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA GPU(s)",
                           hint=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def describe(device: torch.device) -> str:
    """The device in words, for the summary and report.json."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def on_gpu(device: torch.device | None) -> bool:
    return device is not None and device.type != "cpu"


def work_device(device: torch.device | None) -> torch.device | None:
    """Where layer-by-layer work moves its tensors: the GPU, or None where it stays on the host (no moves)."""
    return device if on_gpu(device) else None


def autocast(device: torch.device | None, enabled: bool) -> AbstractContextManager:
    """bf16 autocast on `device` (the host when None), or nothing when not `enabled`."""
    return torch.autocast((device or HOST).type, dtype=torch.bfloat16, enabled=enabled)


def map_tensors(tree, fn, memo: dict | None = None):
    """`fn` applied to every tensor in nested arguments (tuples, lists, dicts: masks, rotary tables, positions),
    the rest kept; with `memo` (a dict kept across calls) a tensor met twice (one mask or rotary table passed to
    every layer) is mapped once and shared, as the original was."""
    if torch.is_tensor(tree):
        if memo is None:
            return fn(tree)
        if id(tree) not in memo:
            memo[id(tree)] = (tree, fn(tree))  # the original kept alive: its id stays its own
        return memo[id(tree)][1]
    if isinstance(tree, tuple):
        return tuple(map_tensors(t, fn, memo) for t in tree)
    if isinstance(tree, list):
        return [map_tensors(t, fn, memo) for t in tree]
    if isinstance(tree, dict):
        return {k: map_tensors(v, fn, memo) for k, v in tree.items()}
    return tree


def move(tree, device: torch.device | None, memo: dict | None = None):
    """Nested arguments on `device` (map_tensors; moved once each with `memo`). None: unchanged."""
    if device is None:
        return tree
    return map_tensors(tree, lambda t: t if t.device == device else t.to(device), memo)
