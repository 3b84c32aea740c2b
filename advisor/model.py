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
class LayerInfo:
    """One decoder layer: what structural actions (pruning heads or channels, removing the layer) act on."""

    name: str
    """Module name (e.g. `model.layers.7`)."""
    index: int
    attention_heads: int
    kv_heads: int
    """Key/value heads; query heads come in `attention_heads // kv_heads` per KV group."""
    head_dim: int
    mlp_width: int | None
    """Intermediate size of the MLP (None where the layer has no dense MLP, e.g. mixture of experts)."""
    linears: tuple[str, ...]


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
    layers: tuple[LayerInfo, ...] = ()
    """The decoder layers, in order."""
    layers_path: str = ""
    """Module name of the decoder layers' ModuleList (e.g. `model.layers`)."""
    fused: tuple[tuple[str, ...], ...] = ()
    """Linears that read one input tensor and that vLLM runs as one fused layer (q/k/v, gate/up), in call order:
    they must share one scheme. Found by tracing a forward pass, so every architecture's own names are used."""

    def layer(self, name: str) -> LayerInfo | None:
        return next((li for li in self.layers if li.name == name), None)

    def unit_of(self, linear: str) -> tuple[str, ...]:
        """The fused unit holding `linear` (itself alone when vLLM runs it unfused)."""
        return next((u for u in self.fused if linear in u), (linear,))


# Architectures hubc has compressed and vLLM served (tests/advisor/test_architectures.py builds each from a config),
# and hubc's own architectures for per-layer shapes and factorized linears (advisor.architecture), which a later run
# may compress again. Others are refused before any work: their layer structure, norms and vLLM loaders are not
# checked.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                         "hubc_llama", "hubc_mistral", "hubc_qwen2", "hubc_qwen3")


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one decoder layer that structural actions change."""

    attention_heads: int
    kv_heads: int
    mlp_width: int | None


def layer_shape(layer, config) -> LayerShape:
    """One decoder layer's query heads, KV heads and MLP width, read from its modules (pruning makes them differ
    between layers) where it names them as Llama does (self_attn.q_proj / k_proj, mlp.down_proj, factorized ones
    included); from the config otherwise (Phi-3's fused qkv_proj, mixtures of experts)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    width = getattr(text, "intermediate_size", None)
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    q, k = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
    if hasattr(q, "out_features") and hasattr(k, "out_features"):
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    down = getattr(mlp, "down_proj", None)
    if hasattr(down, "in_features"):
        width = down.in_features
    return LayerShape(heads, kv_heads, width)


def load_config(path: Path):
    from transformers import AutoConfig

    from advisor.architecture import register

    register()
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
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"hubc does not handle '{config.model_type}' models",
            hint=f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise UnsupportedArchitectureError(
            f"'{config.model_type}' is not a causal language model transformers can build ({str(exc).splitlines()[0]})",
            hint="hubc compresses decoder-only text models",
        ) from exc
    return structure_of(model)


def structure_of(model) -> ModelStructure:
    """The structure of a built model (on the meta device or with weights; a compressed one included)."""
    import torch

    config = model.config
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
    layers_path, layer_list = decoder_layers(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    names = {li.name for li in linears}
    shapes = [layer_shape(layer, config) for layer in layer_list]
    layers = tuple(
        LayerInfo(name=f"{layers_path}.{i}", index=i, attention_heads=shape.attention_heads, kv_heads=shape.kv_heads,
                  head_dim=head_dim, mlp_width=shape.mlp_width,
                  linears=tuple(f"{layers_path}.{i}.{n}" for n, m in layer.named_modules()
                                if f"{layers_path}.{i}.{n}" in names))
        for i, (layer, shape) in enumerate(zip(layer_list, shapes, strict=True)))
    return ModelStructure(
        model_type=config.model_type,
        architecture=archs[0],
        linears=tuple(linears),
        skipped=tuple(skipped),
        num_parameters=sum(p.numel() for p in model.parameters()),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        context_length=_context_length(config),
        layers=layers,
        layers_path=layers_path,
        fused=_fused_units(model, [li.name for li in linears]),
    )


def decoder_layers(model):
    """(module name, ModuleList) of the decoder stack: the ModuleList as long as `num_hidden_layers`."""
    import torch

    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(text, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise UnsupportedArchitectureError(
        f"cannot find the {n} decoder layers of {type(model).__name__}",
        hint="hubc compresses decoder-only models whose layers form one ModuleList",
    )


def _fused_units(model, names: list[str]) -> tuple[tuple[str, ...], ...]:
    """Linears of one layer reading the same input tensor, traced in one forward pass of a tiny input on a copy of
    the model's skeleton on the meta device (no weights read, milliseconds). vLLM fuses exactly these (its
    packed_modules_mapping: q/k/v → qkv_proj, gate/up → gate_up_proj; Phi-3's checkpoints are stored fused)."""
    import torch
    from transformers import AutoModelForCausalLM

    from advisor.architecture import register

    register()  # a hubc architecture's skeleton is built by its registered class
    with torch.device("meta"):
        # Eager attention: sdpa's mask shortcut reads mask values, which meta tensors do not have.
        skeleton = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager")
    modules = dict(skeleton.named_modules())
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [modules[n].register_forward_pre_hook(lambda mod, a, n=n: seen.append((n, a[0])) and None)
               for n in names if n in modules]
    try:
        with torch.inference_mode():
            ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
            # An explicit mask: without one, transformers looks for packed sequences in the positions (.item()).
            skeleton(ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except Exception as exc:
        raise UnsupportedArchitectureError(
            f"cannot trace {type(model).__name__}'s layers ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
            hint="hubc needs models transformers can run on the meta device") from exc
    finally:
        for h in handles:
            h.remove()
    return tuple(tuple(u) for u in group_by_input(seen) if len(u) > 1)


def group_by_input(calls: list[tuple[str, object]]) -> list[list[str]]:
    """Linears grouped by the input they read: `calls` is (name, input tensor) in call order, and consecutive calls
    on the same tensor object form one group; a linear called twice keeps its first place. The tensors themselves
    are compared (not their id()): a freed tensor's id is reused by the next one, which would merge o_proj's group
    with gate/up's."""
    grouped: list[list[str]] = []
    last_input = None
    for name, x in calls:
        if any(name in g for g in grouped):
            continue
        if grouped and x is last_input:
            grouped[-1].append(name)
        else:
            grouped.append([name])
        last_input = x
    return grouped


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

    from advisor.architecture import register

    register()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.eval()
    return model
