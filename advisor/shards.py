"""The safetensors shards of a checkpoint folder, for the layer-by-layer path (advisor.stream, advisor.stream_eval):
the model's skeleton (parameters on the meta device), its tensors read on demand (`ShardReader`) into the tensors
outside the decoder stack and into one decoder layer at a time, and the checkpoint written shard by shard
(`ShardWriter`: a size limit per shard and `model.safetensors.index.json`, as the Hub's large checkpoints are).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from advisor.errors import DamagedWeightsError

STREAM_SHARD_BYTES = 512 * 1024**2
"""Largest shard the streaming writer buffers before writing it (the in-memory writer's is 4 GB): the buffer is
part of the peak memory, and a checkpoint smaller than one shard is held whole until the end, so the shard size
bounds how much the peak can differ between a shallow model and a deep one."""


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


def meta_names(module: torch.nn.Module) -> list[str]:
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def load_outer(model, reader: ShardReader, layers_prefix: str, dtype: torch.dtype = torch.float32) -> None:
    """Read every tensor outside the decoder stack (embeddings, final norm, head); a head tied to the embedding is
    tied again."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    names = [n for n in meta_names(model) if not n.startswith(layers_prefix + ".")]
    if tied:
        names = [n for n in names if not (head_name and n == f"{head_name}.weight")]
    assign(model, reader.read(names, dtype))
    if tied:
        model.tie_weights()


def load_layer(layer: torch.nn.Module, prefix: str, reader: ShardReader, dtype: torch.dtype = torch.float32) -> None:
    """Read one decoder layer's weights (`prefix` is its module name and a dot)."""
    assign(layer, reader.read([prefix + n for n in meta_names(layer)], dtype), prefix)


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
