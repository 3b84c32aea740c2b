"""The quality gate: a variant whose perplexity rises over the base's beyond a threshold on any evaluation text, as
hubc evaluates it or as vLLM serves it, is flagged with what to try, and is not pushed unless the user accepts it."""

from __future__ import annotations

import json
from pathlib import Path


def quality_gate(quality: list, threshold: float) -> dict:
    """Whether every evaluation text's perplexity stays within `threshold` (a share) of the base's, as hubc evaluates
    the checkpoint and, where it was served, as vLLM serves it against the served base."""
    failures, worst = [], None
    for tr in quality:
        checks = [("hubc", tr.variant.perplexity / tr.base.perplexity - 1)]
        if tr.served_variant is not None and tr.served_base is not None:
            checks.append(("vLLM", tr.served_variant.perplexity / tr.served_base.perplexity - 1))
        for engine, increase in checks:
            if worst is None or increase > worst["increase"]:
                worst = {"text": tr.text, "engine": engine, "increase": increase}
            if increase > threshold:
                failures.append({"text": tr.text, "engine": engine, "increase": increase})
    return {"threshold": threshold, "passed": not failures, "worst": worst, "failures": failures}


def gate_summary(gate: dict) -> str:
    parts = [f"{f['text']} {f['increase']:+.1%} ({f['engine']})" for f in gate["failures"]]
    return f"perplexity over the base beyond the {gate['threshold']:.0%} quality gate on {', '.join(parts)}"


def failed_gate(folder: Path) -> str | None:
    """Why the checkpoint in `folder` failed the quality gate of the `hubc optimize` run that made it (its
    report.json), or None when it passed or has no report."""
    try:
        gate = json.loads((folder / "report.json").read_text()).get("gate")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(gate, dict) or gate.get("passed", True):
        return None
    return gate_summary(gate)


def quantization_tries(recipe) -> list[str]:
    """What to change in the quantization of a variant over the gate: a calibrated method, more kept dense, more
    bits."""
    tries = []
    if recipe.method == "rtn":
        tries.append("--method gptq (fast) or --method autoround (best, slower)")
    elif recipe.method == "gptq":
        tries.append("--method autoround")
    raised = "w8a16" if recipe.scheme == "w4a16" else "dense"
    tries.append(f"a larger --dense-budget (e.g. {min(0.5, max(0.1, 2 * recipe.dense_budget)):.2f}"
                 + (f" with --budget-scheme {raised}" if raised != "dense" else "") + ")")
    if recipe.scheme == "w4a16":
        tries.append("--scheme w8a16")
    return tries


def gate_message(result) -> str:
    """The flag a variant failing the quality gate carries in the summary and the card, with what to try."""
    recipe = result.recipe
    tries = []
    removed = result.transforms.get("removed_layers") or []
    if removed:
        tries.append(f"remove fewer layers (this variant removed {len(removed)}: {', '.join(removed)})")
    params = result.linear_parameters or {}
    if params.get("base") and params.get("variant", params["base"]) < params["base"]:
        share = 1 - params["variant"] / params["base"]
        heal = result.transforms.get("heal") or {}
        tries.append(f"prune or factorize less (this variant removed {share:.0%} of the decoder's linear weights)")
        tries.append(f"heal longer (--heal-minutes; this variant healed {heal['steps']} steps)" if heal.get("steps")
                     else "heal by distillation (--heal-minutes 15)")
    if recipe.scheme != "dense":  # a structure-only variant quantizes nothing: no method or budget to change
        tries += quantization_tries(recipe)
    return (f"quality gate failed: {gate_summary(result.gate)}; try {'; '.join(tries)}. "
            "--push refuses this variant unless --accept-quality-loss is given")
