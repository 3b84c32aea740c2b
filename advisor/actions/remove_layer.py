"""Remove whole decoder layers: the residual stream passes them unchanged. The checkpoint is the same architecture
with a smaller `num_hidden_layers` (the later layers renumbered), which vLLM and transformers load natively."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advisor.actions.base import Action, register
from advisor.errors import ShapeError


@register
@dataclass(frozen=True)
class RemoveLayer(Action):
    kind = "remove-layer"
    unit = "layer"
    structural = True
    order = 30

    def check(self, name, structure, target) -> None:
        if len(structure.layers) < 2:
            raise ShapeError(f"cannot remove {name}: the model has a single decoder layer",
                             hint="remove layers from models with more than one")

    @classmethod
    def apply(cls, model, units, ctx) -> dict[str, str | None]:
        from advisor.model import decoder_layers

        prefix, layers = decoder_layers(model)
        drop = {int(n.rsplit(".", 1)[1]) for n in units}
        if len(drop) >= len(layers):
            raise ShapeError("the plan removes every decoder layer", hint="keep at least one layer")
        kept = [i for i in range(len(layers)) if i not in drop]
        moved: dict[str, str | None] = {f"{prefix}.{i}": None for i in sorted(drop)}
        moved.update({f"{prefix}.{old}": f"{prefix}.{new}" for new, old in enumerate(kept) if old != new})
        new_layers = torch.nn.ModuleList([layers[i] for i in kept])
        parent_name, _, attr = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new_layers)
        for new, layer in enumerate(new_layers):
            # The KV cache is indexed by each attention module's layer_idx.
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new
        configs = {id(model.config): model.config}
        if hasattr(model.config, "get_text_config"):
            configs[id(model.config.get_text_config())] = model.config.get_text_config()
        for config in configs.values():
            config.num_hidden_layers = len(kept)
            # Per-layer settings (sliding or full attention in Gemma 2/3, Qwen, Mistral) follow their layers.
            for key in ("layer_types",):
                value = getattr(config, key, None)
                if isinstance(value, list) and len(value) == len(layers):
                    setattr(config, key, [value[i] for i in kept])
            # Qwen2: the first `max_window_layers` layers use full attention; count only those kept.
            window = getattr(config, "max_window_layers", None)
            if isinstance(window, int) and window < len(layers):
                config.max_window_layers = sum(1 for i in kept if i < window)
        # A hubc architecture lists shapes per layer (hubc_layers, hubc_low_rank): rebuilt from the kept modules.
        ctx.reshaped = ctx.reshaped or model.config.model_type.startswith("hubc_")
        return moved
