"""The architecture a reshaped model is saved as: what turns a model whose structural actions pruned or factorized
its modules in place into a checkpoint transformers and vLLM load.

- Every decoder layer with the same shapes and nothing factorized: the model keeps its own architecture, and its
  config states the new sizes (`intermediate_size`, `num_attention_heads`, `num_key_value_heads`, `head_dim` written
  out). vLLM and transformers load it natively.
- Per-layer shapes or factorized linears, for the Llama-family decoders (RESHAPE_TYPES): a hubc architecture, model
  type `hubc_<base>` and architecture `Hubc<Base>ForCausalLM`. Its config is the base config plus
    `hubc_layers`: one `{intermediate_size, num_attention_heads, num_key_value_heads}` per decoder layer, and
    `hubc_low_rank`: `{full module name: rank}` of the linears stored as advisor.lowrank.LowRankLinear (their
    factors are the linears `<name>.v` and `<name>.u`).
  Its global `intermediate_size` and head counts are the largest layer's, so a reader of the global config gets an
  upper bound. `register()` lets transformers build it in this process (never remote code); serving/vllm_plugin.py
  registers the vLLM classes of serving/vllm_hubc.py, which use the same parameter names.
"""

from __future__ import annotations

import copy

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from advisor.errors import ShapeError
from advisor.lowrank import LowRankLinear

PREFIX = "hubc_"
RESHAPE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Base model types the hubc architecture covers: per-layer widths and heads, factorized linears."""
UNIFORM_ONLY_TYPES = ("gemma", "gemma2", "gemma3_text")
"""Model types reshaped only uniformly (one MLP width and one head count for every layer): they keep their own
architecture, which vLLM serves natively; hubc has no per-layer variant of them."""
LAYER_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")
"""What `hubc_layers` states for each decoder layer."""


def base_type(model_type: str) -> str:
    """The model type a hubc type extends (`hubc_qwen2` → `qwen2`); other types unchanged."""
    return model_type.removeprefix(PREFIX)


def supports_reshape(model_type: str, uniform: bool = False) -> bool:
    """Whether a model of `model_type` (a hubc type included) can be pruned or factorized: per layer for
    RESHAPE_TYPES, and uniformly (`uniform=True`) for UNIFORM_ONLY_TYPES as well."""
    base = base_type(model_type)
    return base in RESHAPE_TYPES or (uniform and base in UNIFORM_ONLY_TYPES)


def check_reshape(model_type: str, uniform: bool = False) -> None:
    """Raise ShapeError, naming what works, unless `supports_reshape(model_type, uniform)`."""
    if supports_reshape(model_type, uniform):
        return
    base = base_type(model_type)
    works = (f"per-layer pruning and factorization work on {', '.join(RESHAPE_TYPES)}; "
             f"{', '.join(UNIFORM_ONLY_TYPES)} take one MLP width and head count for every layer; "
             "remove-layer works on every architecture")
    if base == "phi3":
        raise ShapeError("hubc does not prune or factorize phi3 models: they store q/k/v and gate/up fused "
                         "(qkv_proj, gate_up_proj)", hint=works)
    what = "per-layer shapes or factorized linears" if base in UNIFORM_ONLY_TYPES else "pruned or factorized shapes"
    raise ShapeError(f"hubc cannot give '{model_type}' models {what}", hint=works)


class LayerConfig:
    """One decoder layer's view of a hubc config: its own sizes (`overrides`), every other attribute read from the
    model's config at the time it is read, so later changes (the attention implementation) reach every layer."""

    def __init__(self, config, overrides: dict) -> None:
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy/pickle probe dunders before __init__ ran: never forward them
            raise AttributeError(name)
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_config"), name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"a decoder layer's config is read-only (set {name} on the model's config)")

    def __deepcopy__(self, memo):
        # The model's config is copied once (memo) and shared again by every layer of the copy.
        return LayerConfig(copy.deepcopy(object.__getattribute__(self, "_config"), memo),
                           object.__getattribute__(self, "_overrides"))

    def __reduce__(self):
        return LayerConfig, (object.__getattribute__(self, "_config"), object.__getattribute__(self, "_overrides"))


class HubcShapes:
    """What every hubc config adds to its base config: per-layer sizes and factorized linears, validated on load."""

    def validate_architecture(self) -> None:
        """Part of transformers' strict validation: `hubc_layers` covers every layer with sizes the attention takes,
        and `hubc_low_rank` names linears of the decoder layers (the base check, hidden size a multiple of the head
        count, does not hold once heads are pruned: head_dim is stated)."""
        layers, n = self.hubc_layers, self.num_hidden_layers
        if layers is None:  # the class's defaults (transformers builds one to diff against): global sizes
            layers = [{k: getattr(self, k) for k in LAYER_KEYS}] * n
        if not isinstance(layers, list) or len(layers) != n:
            raise ValueError(f"{self.model_type}: hubc_layers must list {n} decoder layers (num_hidden_layers), "
                             f"got {len(layers) if isinstance(layers, list) else layers!r}")
        for i, shape in enumerate(layers):
            if not isinstance(shape, dict) or sorted(shape) != sorted(LAYER_KEYS) \
                    or not all(isinstance(v, int) and v > 0 for v in shape.values()):
                raise ValueError(f"{self.model_type}: hubc_layers[{i}] must map {', '.join(LAYER_KEYS)} to positive "
                                 f"integers, got {shape!r}")
            if shape["num_attention_heads"] % shape["num_key_value_heads"]:
                raise ValueError(f"{self.model_type}: layer {i} has {shape['num_attention_heads']} query heads, not a "
                                 f"multiple of its {shape['num_key_value_heads']} KV heads")
        for name, rank in (self.hubc_low_rank or {}).items():
            parts = name.split(".")
            if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() or int(parts[2]) >= n \
                    or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"{self.model_type}: hubc_low_rank entry {name!r}: {rank!r} must name a linear of "
                                 f"model.layers.0-{n - 1} and a positive rank")

    def layer_config(self, index: int) -> LayerConfig:
        """The config decoder layer `index` is built from (the global sizes where `hubc_layers` is unset)."""
        return LayerConfig(self, self.hubc_layers[index] if self.hubc_layers is not None else {})

    def layer_ranks(self, index: int) -> dict[str, int]:
        """Factorized linears of decoder layer `index`, by name relative to the layer (e.g. `mlp.down_proj`)."""
        head = f"model.layers.{index}."
        return {n.removeprefix(head): r for n, r in (self.hubc_low_rank or {}).items() if n.startswith(head)}


@strict
class HubcLlamaConfig(HubcShapes, LlamaConfig):
    model_type = "hubc_llama"
    hubc_layers: list[dict] | None = None
    hubc_low_rank: dict[str, int] | None = None


@strict
class HubcMistralConfig(HubcShapes, MistralConfig):
    model_type = "hubc_mistral"
    hubc_layers: list[dict] | None = None
    hubc_low_rank: dict[str, int] | None = None


@strict
class HubcQwen2Config(HubcShapes, Qwen2Config):
    model_type = "hubc_qwen2"
    hubc_layers: list[dict] | None = None
    hubc_low_rank: dict[str, int] | None = None


@strict
class HubcQwen3Config(HubcShapes, Qwen3Config):
    model_type = "hubc_qwen3"
    hubc_layers: list[dict] | None = None
    hubc_low_rank: dict[str, int] | None = None


class HubcLayers:
    """What every hubc model adds to its base class: once the base built every layer at the global (largest) sizes,
    each decoder layer is rebuilt at its own sizes and the factorized linears are put in, with the parameter names
    the checkpoint and vLLM use."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        layers = self.model.layers
        for i in range(len(layers)):
            layers[i] = type(layers[i])(config.layer_config(i), i)
        for name, rank in (config.hubc_low_rank or {}).items():
            dense = self.get_submodule(name)
            if not isinstance(dense, torch.nn.Linear):
                raise TypeError(f"{config.model_type}: hubc_low_rank names {name}, which is a "
                                 f"{type(dense).__name__}, not a linear layer")
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent), child,
                    LowRankLinear(dense.in_features, dense.out_features, rank, bias=dense.bias is not None,
                                  device=dense.weight.device, dtype=dense.weight.dtype))
        self.post_init()


class HubcLlamaForCausalLM(HubcLayers, LlamaForCausalLM):
    config_class = HubcLlamaConfig


class HubcMistralForCausalLM(HubcLayers, MistralForCausalLM):
    config_class = HubcMistralConfig


class HubcQwen2ForCausalLM(HubcLayers, Qwen2ForCausalLM):
    config_class = HubcQwen2Config


class HubcQwen3ForCausalLM(HubcLayers, Qwen3ForCausalLM):
    config_class = HubcQwen3Config


HUBC_CLASSES = {
    "llama": (HubcLlamaConfig, HubcLlamaForCausalLM),
    "mistral": (HubcMistralConfig, HubcMistralForCausalLM),
    "qwen2": (HubcQwen2Config, HubcQwen2ForCausalLM),
    "qwen3": (HubcQwen3Config, HubcQwen3ForCausalLM),
}
"""Base model type → the hubc config and model classes extending it."""
HUBC_ARCHITECTURES = {PREFIX + base: model.__name__ for base, (_, model) in HUBC_CLASSES.items()}
"""hubc model type → the architecture name its checkpoints' config.json states (and vLLM resolves)."""


def register() -> None:
    """Make transformers' Auto classes build the hubc architectures in this process. Idempotent; called wherever hubc
    reads a config or builds a model, and by hubc's vLLM plugin."""
    for config_class, model_class in HUBC_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


def adopt(model):
    """The model, rebuilt from a config that states its modules' actual shapes (read per decoder layer: MLP width,
    query and KV heads, factorized linears), with its weights loaded strictly: what its checkpoint will load as.

    Uniform shapes and nothing factorized keep the model's own architecture; otherwise the model becomes the hubc
    architecture of its base type (ShapeError for architectures it does not cover). Same dtype, eval mode."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from advisor.model import decoder_layers

    register()
    config = model.config
    base = base_type(config.model_type)
    check_reshape(base, uniform=True)
    prefix, layers = decoder_layers(model)
    head_dim = _head_dim(config)
    shapes = [_checked_shape(layer, config, head_dim, f"{prefix}.{i}") for i, layer in enumerate(layers)]
    ranks = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            if not name.startswith(f"{prefix}.") or prefix != "model.layers":
                raise ShapeError(f"{name} is factorized outside the decoder layers",
                                 hint="factorize the linears of model.layers.N only")
            ranks[name] = module.rank
    settings = {k: v for k, v in config.to_dict().items()
                if k not in ("model_type", "architectures", "hubc_layers", "hubc_low_rank")}
    settings["head_dim"] = head_dim
    new = _native_config(base, shapes[0], settings) if len(set(shapes)) == 1 and not ranks else None
    if new is not None:
        same = config.model_type == base and getattr(config, "architectures", None)
        new.architectures = list(same) if same else [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base]]
    else:
        check_reshape(base)
        new = _hubc_config(base, shapes, ranks, settings)
    new._name_or_path = config._name_or_path
    fresh = AutoModelForCausalLM.from_config(new, dtype=next(model.parameters()).dtype,
                                             attn_implementation=config._attn_implementation)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.eval()


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _checked_shape(layer, config, head_dim: int, name: str) -> tuple[int, int, int]:
    """(MLP width, query heads, KV heads) of one decoder layer, checked for consistency between its modules."""
    from advisor.model import layer_shape

    shape = layer_shape(layer, config)
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    sizes = {
        "q_proj outputs": getattr(getattr(attn, "q_proj", None), "out_features", head_dim),
        "k_proj outputs": getattr(getattr(attn, "k_proj", None), "out_features", head_dim),
        "v_proj outputs": getattr(getattr(attn, "v_proj", None), "out_features", head_dim),
    }
    for what, size in sizes.items():
        if size % head_dim:
            raise ShapeError(f"{name}: {what} {size} features, not whole heads of {head_dim}",
                             hint="prune attention by whole heads (head_dim is unchanged)")
    if sizes["v_proj outputs"] != sizes["k_proj outputs"] or shape.attention_heads % shape.kv_heads:
        raise ShapeError(f"{name}: {shape.attention_heads} query heads, {shape.kv_heads} key heads and "
                         f"{sizes['v_proj outputs'] // head_dim} value heads do not form KV groups",
                         hint="prune whole KV groups, or query heads evenly within each group")
    o_in = getattr(getattr(attn, "o_proj", None), "in_features", shape.attention_heads * head_dim)
    widths = {getattr(getattr(mlp, n, None), "out_features", shape.mlp_width) for n in ("gate_proj", "up_proj")}
    if o_in != shape.attention_heads * head_dim or widths != {shape.mlp_width}:
        raise ShapeError(f"{name}: its linears disagree (o_proj reads {o_in}, q_proj gives "
                         f"{shape.attention_heads * head_dim}; MLP widths {sorted(widths)} vs down_proj "
                         f"{shape.mlp_width})", hint="prune every linear that shares the pruned dimension")
    return shape.mlp_width, shape.attention_heads, shape.kv_heads


def _native_config(base: str, shape: tuple[int, int, int], settings: dict):
    """The base architecture's config with uniform sizes, or None where the base architecture cannot state them."""
    from huggingface_hub.errors import StrictDataclassClassValidationError
    from transformers import CONFIG_MAPPING

    width, heads, kv_heads = shape
    if base == "qwen2" and heads * settings["head_dim"] != settings["hidden_size"]:
        # vLLM's Qwen2 derives head_dim as hidden_size // heads and ignores a stated one.
        return None
    try:
        return CONFIG_MAPPING[base].from_dict({**settings, "intermediate_size": width, "num_attention_heads": heads,
                                               "num_key_value_heads": kv_heads})
    except (StrictDataclassClassValidationError, ValueError):
        # transformers' own validation, e.g. Llama's hidden size must be a multiple of the head count.
        return None


def _hubc_config(base: str, shapes: list[tuple[int, int, int]], ranks: dict[str, int], settings: dict):
    config_class, model_class = HUBC_CLASSES[base]
    layers = [dict(zip(LAYER_KEYS, s, strict=True)) for s in shapes]
    config = config_class.from_dict({
        **settings,
        **{k: max(layer[k] for layer in layers) for k in LAYER_KEYS},
        "hubc_layers": layers,
        "hubc_low_rank": dict(sorted(ranks.items())),
    })
    config.architectures = [model_class.__name__]
    return config
