"""Write and read compressed-tensors checkpoints, the format vLLM loads natively.

The tensors are written here rather than through compressed-tensors' compressors because hubc's codes come from its
own rounding (GPTQ, learned rounding, the int8 pair limit of CPUs without VNNI), which the library's quantize step
would redo; the config and the int4 packing come from compressed-tensors itself, so vLLM reads them as its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from advisor.compress import Compressed
from advisor.errors import AdvisorError, DamagedWeightsError
from advisor.plan import Plan
from advisor.quantize.rtn import FakeQuantLinear, QuantizedWeight
from advisor.schemes import QuantArgs, Scheme

MAX_SHARD = "4GB"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    weight_bytes: int
    """Bytes of all safetensors files written."""
    quantized_modules: int


def _group(scheme: Scheme, targets: list[str], with_format: bool) -> dict:
    group = {"targets": targets, "weights": scheme.weights.to_ct()}
    if scheme.input_activations is not None:
        group["input_activations"] = scheme.input_activations.to_ct()
    if with_format:
        group["format"] = scheme.ct_format
    return group


def quantization_config(plan: Plan) -> dict:
    """The `quantization_config` block vLLM's compressed-tensors loader detects, validated by compressed-tensors.

    A plan that quantizes every linear with the recipe's scheme is one config group targeting every `Linear`; a
    mixed one has a group per scheme naming its modules exactly, each with its own format, and lists the dense
    modules in `ignore`."""
    from compressed_tensors.quantization import QuantizationConfig

    recipe = plan.recipe
    schemes = plan.schemes
    ignore = list(recipe.ignore)
    if len(schemes) == 1 and all(s is not None for s in plan.linears.values()):
        groups, fmt = {"group_0": _group(schemes[0], list(recipe.targets), False)}, schemes[0].ct_format
    else:
        groups = {
            f"group_{i}": _group(s, [n for n, c in plan.linears.items() if c is not None and c.name == s.name], True)
            for i, s in enumerate(schemes)
        }
        formats = {s.ct_format for s in schemes}
        fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
        ignore += [n for n, c in plan.linears.items() if c is None and n not in ignore]
    config = QuantizationConfig.model_validate(
        {
            "config_groups": groups,
            "format": fmt,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "ignore": ignore,
        }
    )
    return config.model_dump(exclude_none=False, mode="json")


def scale_dtype(scheme: Scheme, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype vLLM holds a scheme's weight scales in: float32 for the int8/FP8 GEMMs (their per-channel scales),
    the model's dtype for weight-only kernels (Marlin, CPU WNA16), so the checkpoint stores what is computed with."""
    if scheme.input_activations is not None or dtype is None:
        return torch.float32
    return dtype


def compressed_tensors_of(qw: QuantizedWeight, scheme: Scheme, dtype: torch.dtype | None = None,
                          ) -> dict[str, torch.Tensor]:
    """One quantized linear's tensors as the checkpoint stores them (suffix → tensor: packed codes, scales, zero
    points), for its scheme's compressed-tensors format."""
    from compressed_tensors.compressors import pack_to_int32

    out: dict[str, torch.Tensor] = {"weight_scale": qw.scale.to(scale_dtype(scheme, dtype)).contiguous()}
    if scheme.ct_format == "pack-quantized":
        out["weight_packed"] = pack_to_int32(qw.codes, scheme.weights.num_bits)
        out["weight_shape"] = torch.tensor(qw.codes.shape)
        if qw.zero_point is not None:
            out["weight_zero_point"] = pack_to_int32(qw.zero_point, scheme.weights.num_bits, packed_dim=0).contiguous()
    else:
        out["weight"] = qw.codes.contiguous()
        if qw.zero_point is not None:
            out["weight_zero_point"] = qw.zero_point.contiguous()
    return out


def write_checkpoint(compressed: Compressed, out: Path, dtype: torch.dtype | None = None) -> ExportResult:
    """Write what compress produced as a compressed-tensors checkpoint in `out` (which must exist and be empty; the
    caller moves it into place once everything else is written). Writes only: every weight was quantized by
    compress.

    `dtype` is the checkpoint's: the unquantized tensors (embeddings, norms, dense linears, the head) and the scales
    of weight-only schemes are written in it, and config.json names it; None keeps the model's own."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    model, plan = compressed.model, compressed.plan
    modules = dict(model.named_modules())
    state = {k: v for k, v in model.state_dict().items()}
    head = model.get_output_embeddings()
    if plan.structure.tied_embeddings and head is not None:
        # Tied heads share the embedding tensor; the checkpoint stores it once, as transformers does.
        state = {k: v for k, v in state.items() if not (k.startswith(_prefix_of(modules, head)) and k.endswith("weight"))}
    packed: dict[str, torch.Tensor] = {}
    for name, scheme in plan.linears.items():
        if scheme is None:
            continue
        del state[f"{name}.weight"]
        for suffix, tensor in compressed_tensors_of(compressed.quantized[name], scheme, dtype).items():
            packed[f"{name}.{suffix}"] = tensor
    # What stays unquantized is written in the checkpoint's dtype; the quantized tensors keep theirs.
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()} | packed
    state = {k: v.detach().contiguous() for k, v in state.items()}

    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD)
    total = 0
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out / filename), metadata={"format": "pt"})
        total += (out / filename).stat().st_size
    if split.is_sharded:
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    write_config(model.config, plan, out, dtype)
    return ExportResult(out, total, sum(c is not None for c in plan.linears.values()))


def write_config(model_config, plan: Plan, out: Path, dtype: torch.dtype | None) -> None:
    """config.json of a checkpoint: the model's config, the checkpoint dtype and the plan's quantization_config."""
    config = model_config.to_dict()
    if dtype is not None:
        # Both spellings: transformers 5 reads `dtype`, older readers (and other tools) `torch_dtype`.
        config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if plan.schemes:
        config["quantization_config"] = quantization_config(plan)
    else:
        config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def _prefix_of(modules: dict, target) -> str:
    for name, module in modules.items():
        if module is target:
            return name + "."
    return "\0"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own and OS errors for damaged files
            raise DamagedWeightsError(f"cannot read {f} ({str(exc).splitlines()[0][:120]})",
                                      hint="the checkpoint is damaged: export it again") from None
    return state


def _quant_args(block: dict | None) -> QuantArgs | None:
    if not block:
        return None
    return QuantArgs(
        num_bits=block["num_bits"],
        type=block["type"],
        symmetric=block["symmetric"],
        strategy=block["strategy"],
        group_size=block.get("group_size"),
        dynamic=bool(block.get("dynamic")),
    )


def _group_of(name: str, class_name: str, groups: list[dict]) -> dict:
    """The config group a module belongs to, matched as vLLM matches: by name (exact or `re:`), then by class."""
    import re

    def hit(target: str, value: str) -> bool:
        return re.fullmatch(target[3:], value) is not None if target.startswith("re:") else target == value

    for value in (name, class_name):
        for group in groups:
            if any(hit(t, value) for t in group["targets"]):
                return group
    raise DamagedWeightsError(f"no quantization config group targets {name}",
                              hint="config.json's quantization_config does not match the weights: export again")


def load_for_eval(path: Path):
    """Read a compressed-tensors checkpoint (or a structure-only one without quantization) back from disk into a
    float32 transformers model whose linear layers compute what the quantized kernels compute (dequantized weights,
    per-token activation quantization).

    Evaluating this model evaluates the checkpoint as written, not the in-memory tensors that produced it. A damaged
    or inconsistent checkpoint raises DamagedWeightsError naming the file."""
    from advisor.weight_files import check_weight_files

    check_weight_files(path)
    try:
        return _load_for_eval(path)
    except (KeyError, ValueError, RuntimeError) as exc:
        if isinstance(exc, torch.OutOfMemoryError) or "allocate" in str(exc):
            raise
        raise DamagedWeightsError(
            f"{path} is not a compressed-tensors checkpoint hubc can read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'})",
            hint="its quantization_config and its tensors disagree: export the checkpoint again") from None


def read_config(path: Path) -> tuple[object, list[dict]]:
    """A checkpoint's transformers config (without its quantization_config) and its quantization config groups
    (empty for a dense checkpoint)."""
    from transformers import AutoConfig

    from advisor.architecture import register

    register()  # a pruned or factorized checkpoint may be of a hubc architecture
    try:
        config_dict = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DamagedWeightsError(f"cannot read {path / 'config.json'} ({exc})",
                                  hint="the checkpoint is incomplete: export it again") from None
    qcfg = config_dict.pop("quantization_config", None)
    if qcfg and qcfg.get("quant_method") != "compressed-tensors":
        raise AdvisorError(f"{path} is quantized with {qcfg.get('quant_method')!r}, not compressed-tensors",
                           hint="evaluate checkpoints written by hubc optimize (or another compressed-tensors exporter)")
    # No quantization_config: a structure-only (dense) variant, read as the plain model it is.
    groups = list(qcfg["config_groups"].values()) if qcfg else []
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"},
                                  model_type=config_dict["model_type"])
    return config, groups


def _load_for_eval(path: Path):
    from transformers import AutoModelForCausalLM

    config, groups = read_config(path)
    # Built on the CPU, not on meta: non-persistent buffers (rotary frequencies) must be real.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = _read_state(path)
    quantized = dequantize_into(model, state, groups, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise DamagedWeightsError(f"{path}: tensors the model does not have: {', '.join(unexpected[:3])}",
                                  hint="config.json does not match the weights: export the checkpoint again")
    model.tie_weights()
    missing = [m for m in missing if not any(m.startswith(q + ".") for q in quantized)]
    if missing and not (config.tie_word_embeddings and all("lm_head" in m for m in missing)):
        raise DamagedWeightsError(f"{path}: tensors missing from the checkpoint: {', '.join(missing[:3])}",
                                  hint="the checkpoint is incomplete: export it again")
    model.eval()
    return model


def dequantize_into(model, state: dict[str, torch.Tensor], groups: list[dict], path: Path) -> list[str]:
    """Replace each linear of `model` whose quantized tensors are in `state` (all of a checkpoint's, or one decoder
    layer's) by a FakeQuantLinear computing what its kernel computes, taking those tensors out of `state`; returns
    the names of the linears replaced."""
    from compressed_tensors.compressors import unpack_from_int32

    quantized = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".weight_scale")})
    modules = dict(model.named_modules())
    for name in quantized:
        group = _group_of(name, type(modules[name]).__name__, groups)
        w_args, a_args = _quant_args(group["weights"]), _quant_args(group.get("input_activations"))
        scale = state.pop(f"{name}.weight_scale")
        zp = state.pop(f"{name}.weight_zero_point", None)
        if f"{name}.weight_packed" in state:
            shape = torch.Size(state.pop(f"{name}.weight_shape").tolist())
            if shape != modules[name].weight.shape:
                raise DamagedWeightsError(f"{name}.weight_shape in {path} says {list(shape)}, but config.json makes "
                                          f"the layer {list(modules[name].weight.shape)}",
                                          hint="its quantization tensors and config.json disagree: export it again")
            codes = unpack_from_int32(state.pop(f"{name}.weight_packed"), w_args.num_bits, shape)
            if zp is not None:
                zp = unpack_from_int32(zp, w_args.num_bits, torch.Size([shape[0], zp.shape[1]]), packed_dim=0)
        else:
            codes = state.pop(f"{name}.weight")
        weight = QuantizedWeight(codes, scale, zp, w_args).dequantize()
        if weight.shape != modules[name].weight.shape:
            raise DamagedWeightsError(f"{name} reads back as {list(weight.shape)} from {path}, but config.json makes it "
                                      f"{list(modules[name].weight.shape)}",
                                      hint="its quantization tensors and config.json disagree: export it again")
        bias = state.pop(f"{name}.bias", None)
        bias = None if bias is None else bias.float()  # stored in the checkpoint dtype, computed in float32
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, FakeQuantLinear(weight, bias, a_args))
    return quantized
