"""Check a model folder's weight files before any slow work, so a damaged download fails in one line naming the file
instead of in a safetensors or transformers traceback minutes later.

Only headers and file sizes are read (checkpoint_features' safetensors header reader): every *.safetensors file must
be whole (header, offsets and length agree), `model.safetensors.index.json` must name files that exist and hold the
tensors it puts in them, and the tensors must be the ones the model config.json describes, in its shapes (the model
built on the meta device, no memory allocated). A tied output head may be absent; buffers are not weights.

The comparison with config.json is skipped where it would guess: a model transformers cannot build, a checkpoint
quantized by another method than compressed-tensors, or an architecture whose checkpoint names transformers converts
on load (fused MoE experts).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advisor.checkpoint_features import read_safetensors_header
from advisor.errors import DamagedWeightsError

__all__ = ["ConfigWeights", "ModelWeight", "check_weight_files", "config_weights"]

_REDOWNLOAD = "download the model again, or save it again with save_pretrained"
_PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
_LAYER_INDEX = re.compile(r"\.\d+(?=\.)")


@dataclass(frozen=True)
class ModelWeight:
    """One parameter of the model config.json describes."""

    names: tuple[str, ...]
    """Every name it goes by: more than one where weights are tied (the output head and the input embedding)."""
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ConfigWeights:
    """The weights of the model a config.json describes, as transformers builds it."""

    params: tuple[ModelWeight, ...]
    buffers: frozenset[str]
    """Buffer names: a checkpoint may hold them (rotary frequencies), none has to."""
    prefix: str
    """The base model's attribute (`model`): transformers adds or strips it from checkpoint names."""
    renames: tuple[tuple[str, str], ...] = ()
    """(regex, replacement) renamings transformers applies to checkpoint names on load."""


def check_weight_files(path: Path, what: str | None = None) -> None:
    """Raise DamagedWeightsError naming the file and what to do if the weights of the model folder `path` are
    missing, unreadable, truncated, inconsistent with their index, or not the tensors its config.json needs.
    `what` names the folder in messages (default: the folder's path)."""
    what = what or f"folder '{path}'"
    files = sorted(path.glob("*.safetensors"))
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if not files and not indexes:
        raise _no_weights(path, what)
    stored: dict[str, tuple[Path, dict[str, Any]]] = {}
    for file in files:
        try:
            _, header = read_safetensors_header(file)
        except (OSError, ValueError) as exc:
            raise DamagedWeightsError(
                f"'{file}' is damaged: {exc}", hint=_REDOWNLOAD
            ) from None
        stored.update((name, (file, info)) for name, info in header.items())
    for index in indexes:
        _check_index(index, {f.name: f for f in files}, stored)
    model = config_weights(path)
    if model is not None:
        _check_against_config(path, model, {name: tuple(info["shape"]) for name, (_, info) in stored.items()},
                              {name: file for name, (file, _) in stored.items()}, indexed=bool(indexes))  # fmt: skip


def config_weights(path: Path) -> ConfigWeights | None:
    """The weights of the model the folder's config.json describes (built on the meta device: nothing allocated), or
    None where a checkpoint's names cannot be compared with them: transformers cannot build the model, the
    checkpoint is quantized by another method than compressed-tensors, or transformers renames or fuses this
    architecture's tensors on load."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if quant and quant.get("quant_method") != "compressed-tensors":
        return None
    import torch
    from transformers import AutoModelForCausalLM

    from advisor.errors import AdvisorError
    from advisor.model import load_config

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(load_config(path))
        from transformers.conversion_mapping import get_model_conversion_mapping

        if get_model_conversion_mapping(model, add_legacy=False):
            return None
        # The renamings transformers applies to every model's checkpoint (`LayerNorm.gamma`, `.weight_g`).
        legacy = [(source, target) for t in get_model_conversion_mapping(model)
                  for source, target in zip(t.source_patterns, t.target_patterns, strict=True)]  # fmt: skip
    # An unbuildable config is not damaged weights: the command's own structure check reports it.
    except (AdvisorError, ValueError, KeyError, TypeError, AttributeError, ImportError):
        return None
    names: dict[int, list[str]] = {}
    params = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        params[id(param)] = param
    return ConfigWeights(
        params=tuple(ModelWeight(tuple(names[key]), tuple(params[key].shape)) for key in names),
        buffers=frozenset(name for name, _ in model.named_buffers(remove_duplicate=False)),
        prefix=getattr(model, "base_model_prefix", "") or "",
        renames=tuple(legacy),
    )


def _no_weights(path: Path, what: str) -> DamagedWeightsError:
    pickles = [name for name in _PICKLE if (path / name).is_file()] or sorted(
        p.name for p in path.glob("*.bin")
    )
    if pickles:
        return DamagedWeightsError(
            f"{what} holds PyTorch pickle weights ({pickles[0]}) but no *.safetensors, and hubc reads safetensors only",
            hint='convert them: python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" and pass that folder",
        )
    return DamagedWeightsError(f"{what} has no weight files (*.safetensors)",
                               hint="download the model's weights into it, or point at the folder that holds them")  # fmt: skip


def _check_index(index: Path, files: dict[str, Path], stored: dict[str, tuple[Path, dict]]) -> None:
    """Every shard the index names exists and holds the tensors the index puts in it (what transformers and vLLM
    load by)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise DamagedWeightsError(f"'{index}' is not a safetensors index (JSON with a weight_map)",
                                  hint=_REDOWNLOAD) from None  # fmt: skip
    missing = sorted({shard for shard in weight_map.values() if shard not in files})
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DamagedWeightsError(
            f"'{index}' names the shard '{missing[0]}'{more}, which is not in '{index.parent}'",
            hint="the download is incomplete: download the model again",
        )
    for name, shard in weight_map.items():
        held = stored.get(name)
        if held is None or held[0].name != shard:
            where = f"it is in '{held[0].name}'" if held else "no file holds it"
            raise DamagedWeightsError(f"'{index}' puts tensor '{name}' in '{files[shard]}', which does not hold it "
                                      f"({where})", hint=_REDOWNLOAD)  # fmt: skip


def _check_against_config(
    path: Path,
    model: ConfigWeights,
    shapes: dict[str, tuple[int, ...]],
    files: dict[str, Path],
    indexed: bool,
) -> None:
    weights, buffers, prefix = model.params, model.buffers, model.prefix
    expected = {name: w.shape for w in weights for name in w.names}

    def as_model_name(name: str) -> str:
        """The name transformers loads a stored tensor as: renamed, the base-model prefix added or stripped (a
        checkpoint saved from `LlamaModel`)."""
        for pattern, replacement in model.renames:
            name = re.sub(pattern, replacement, name)
        if name in expected or name in buffers or not prefix:
            return name
        if f"{prefix}.{name}" in expected:
            return f"{prefix}.{name}"
        bare = name.removeprefix(f"{prefix}.")
        return bare if bare in expected else name

    renamed = {as_model_name(name): name for name in shapes}
    for name, shape in expected.items():  # in the model's order: the first disagreement is the telling one
        original = renamed.get(name)
        if original is not None and shapes[original] != shape:
            raise DamagedWeightsError(
                f"tensor '{original}' in '{files[original]}' has shape {list(shapes[original])} but "
                f"'{path / 'config.json'}' makes it {list(shape)}",
                hint="config.json and the weights disagree: use the config.json saved with these weights",
            )
    # A parameter counts as stored under its name or in a compressed-tensors form (`weight_packed`, `weight.*`).
    present = set(renamed)
    present.update(n.removesuffix("_packed") for n in renamed)
    present.update(n.rpartition(".")[0] for n in renamed)
    modules = {w.rpartition(".")[0] for w in expected}
    # Where every stored name is the model's own, the checkpoint uses its naming and any absent parameter is missing;
    # otherwise only one whose siblings in other layers are stored (transformers may rename the rest on load).
    buffer_leaves = {b.rpartition(".")[2] for b in buffers}  # older checkpoints stored `...rotary_emb.inv_freq`
    own_naming = all(n in expected or n.rpartition(".")[0] in modules or n.rpartition(".")[2] in buffer_leaves
                     for n in renamed)  # fmt: skip
    families = {_LAYER_INDEX.sub(".#", n) for n in renamed}
    for weight in weights:
        if any(name in present for name in weight.names):
            continue
        name = weight.names[0]
        if own_naming or _LAYER_INDEX.sub(".#", name) in families:
            where = "its index's shards" if indexed else "its *.safetensors files"
            raise DamagedWeightsError(
                f"tensor '{name}' {list(weight.shape)}, which the model of '{path / 'config.json'}' needs, is in "
                f"none of {where} in '{path}'",
                hint="the weights are incomplete: download the model again, or save it again with save_pretrained",
            )
