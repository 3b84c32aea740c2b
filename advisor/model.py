"""Read a model folder's structure and weights. Module names and shapes come from the model itself (built on the
meta device from its config), never from a list written for one architecture."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from advisor.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class LinearInfo:
    """One linear layer of the model: its module name and shape."""

    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class ModelStructure:
    """What compression needs to know about a model before touching its weights."""

    model_type: str
    architecture: str
    linears: tuple[LinearInfo, ...]
    """Every linear layer hubc may quantize (the output head excluded)."""
    skipped: tuple[str, ...]
    """Linear layers left dense: the output head (shares the embedding when tied)."""
    num_parameters: int
    tied_embeddings: bool
    context_length: int | None = None
    """Longest sequence the model's positions cover (config `max_position_embeddings` or its older names)."""


def load_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as exc:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        raise UnsupportedArchitectureError(
            f"transformers does not know model type '{model_type}'",
            hint="hubc handles causal LMs transformers can load (llama, qwen2/3, mistral, gemma, phi3, ...)",
        ) from exc


def inspect_structure(path: Path) -> ModelStructure:
    """Build the model on the meta device (no weights read) and list its linear layers."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(path)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise UnsupportedArchitectureError(
            f"'{config.model_type}' is not a causal language model transformers can build ({str(exc).splitlines()[0]})",
            hint="hubc compresses decoder-only text models",
        ) from exc
    head = model.get_output_embeddings()
    linears, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if module is head:
            skipped.append(name)
            continue
        linears.append(LinearInfo(name, module.in_features, module.out_features, module.bias is not None))
    if not linears:
        raise UnsupportedArchitectureError(f"'{config.model_type}' has no nn.Linear layers hubc can quantize")
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelStructure(
        model_type=config.model_type,
        architecture=archs[0],
        linears=tuple(linears),
        skipped=tuple(skipped),
        num_parameters=sum(p.numel() for p in model.parameters()),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        context_length=_context_length(config),
    )


def _context_length(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(path: Path, dtype=None):
    """Load a model folder for compression or evaluation (float32 by default: evaluation reference precision)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.eval()
    return model
