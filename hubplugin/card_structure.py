"""The card's and the summary's account of structure: what pruning, factorization and layer removal changed, what
healing recovered, and how to load a checkpoint of hubc's own architecture."""

from __future__ import annotations

from collections import Counter


def _m(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def _layers(n: int) -> str:
    return f"{n} layer{'s' if n != 1 else ''}"


def structure_lines(result) -> list[str]:
    """One sentence per kind of structural change, from report.json's `transforms`; empty when none."""
    t = result.transforms or {}
    notes = t.get("structure") or {}
    lines = []
    params = result.linear_parameters or {}
    if params and params.get("base") and params.get("variant") != params.get("base"):
        base, variant = params["base"], params["variant"]
        lines.append(f"Decoder linear weights: {_m(base)} → {_m(variant)} ({variant / base - 1:+.1%}).")
    request = dict(t.get("structure_request") or {})
    latency = request.pop("latency", None)
    if request:
        lines.append("Requested: " + ", ".join(f"{k} {v}" for k, v in request.items())
                     + " — hubc chose where on calibration text (the choices are the recipe's actions).")
    speed = getattr(result, "speedup", None)
    if speed:
        line = (f"Speed-up asked: {speed['speedup']:g}x faster decoding ({speed['traffic']}). Latency model "
                f"({speed['basis']}, {speed['measurements']} measurement(s)): base {speed['base_ms']:.3g} ms per "
                f"token, {speed['start_ms']:.3g} ms in the variant's format before structure, goal "
                f"{speed['goal_ms']:.3g} ms; removals ranked by estimated loss per millisecond saved "
                f"({speed['ms_per_layer']:.3g} ms per decoder layer, {speed['ms_per_param'] * 1e6:.3g} ms per "
                "million weights)")
        if speed.get("predicted_variant_ms"):
            line += (f"; the written variant is predicted at {speed['predicted_variant_ms']:.3g} ms "
                     f"({speed['predicted_speedup']:.2f}x)")
        if not speed.get("save_ms"):
            line += "; the scheme alone meets the goal, so structure removed nothing"
        if speed.get("measured_speedup"):
            line += f"; measured {speed['measured_speedup']:.2f}x"
        lines.append(line + ".")
        lines += [f"Note: {n}." for n in speed.get("notes") or []]
    elif latency:
        lines.append(f"Latency request: save {latency['save_ms']:.2f} ms per decode step.")
    prune = notes.get("prune") or {}
    if prune:
        widths = Counter(n["mlp_width"] for n in prune.values() if "mlp_width" in n)
        heads = Counter((n["heads"], n["kv_heads"]) for n in prune.values() if "heads" in n)
        importance = sorted({n.get("importance", "activation") for n in prune.values()})
        parts = []
        if widths:
            parts.append(f"MLP channels pruned in {_layers(sum(widths.values()))} (widths kept: "
                         + ", ".join(f"{w} ×{c}" for w, c in sorted(widths.items())) + ")")
        if heads:
            parts.append(f"attention heads pruned in {_layers(sum(heads.values()))} (query/KV heads kept: "
                         + ", ".join(f"{h}/{kv} ×{c}" for (h, kv), c in sorted(heads.items())) + ")")
        if parts:
            lines.append("; ".join(parts) + f", ranked by {' and '.join(importance)} importance.")
    factorize = notes.get("factorize") or {}
    if factorize:
        ranks = Counter(n["rank"] for n in factorize.values())
        whitened = all(n.get("whitening", True) for n in factorize.values())
        lines.append(f"{len(factorize)} linear layers factorized as U·V ({'activation-whitened' if whitened else 'plain'}"
                     " SVD; ranks " + ", ".join(f"{r} ×{c}" for r, c in sorted(ranks.items())) + ").")
    removed = t.get("removed_layers") or []
    if removed:
        lines.append(f"Decoder layers removed: {', '.join(removed)}.")
    return lines


def heal_rows(result) -> list[dict]:
    heal = (result.transforms or {}).get("heal") or {}
    rows = []
    for text, r in (heal.get("held_out") or {}).items():
        rows.append({"text": text, "base": f"{r['base']:.3f}", "before": f"{r['before']:.3f}",
                     "before_delta": f"{r['before'] / r['base'] - 1:+.1%}", "after": f"{r['after']:.3f}",
                     "after_delta": f"{r['after'] / r['base'] - 1:+.1%}"})
    return rows


def heal_text(result) -> str | None:
    heal = (result.transforms or {}).get("heal")
    if not heal:
        return None
    from advisor.evaluate import text_label
    from advisor.heal import HealConfig

    calibration = result.recipe.calibration or {}
    sampled = (result.recipe.heal or {}).get("self_generated", HealConfig.self_generated)
    trained = f" ({text_label(calibration['text'])}{' and text the base sampled itself' if sampled else ''})" \
        if calibration.get("text") else ""
    how = f" (rank-{heal['lora_rank']} LoRA updates, merged back)" if heal.get("lora_rank") else ""
    return (f"Healed by distillation from the base{how}: {heal['steps']} steps, {heal['tokens']:,} tokens in "
            f"{heal['seconds'] / 60:.1f} min ({heal['dtype']}), KL to the base {heal['kl_start']:.3f} → "
            f"{heal['kl_end']:.3f} nats/token on its training text{trained}. Perplexity on held-out text, evaluated "
            "in transformers before quantization:")


def architecture_note(result) -> str | None:
    """How to load a checkpoint of hubc's own architecture (per-layer shapes, factorized linears); None for the
    base's architecture, which vLLM and transformers load as they are."""
    if not (result.model_type or "").startswith("hubc_"):
        return None
    return (f"This checkpoint's architecture, `{result.architecture}` (model type `{result.model_type}`), has "
            "per-layer shapes or low-rank factorized linears, which stock vLLM and transformers do not build. "
            "Install hubc first (`pip install hubc`): vLLM then finds hubc's plugin by its entry point and serves "
            "it with the command below, unchanged; in Python, `from advisor.architecture import register; register()` "
            "registers it with transformers' `AutoModelForCausalLM`. No `trust_remote_code` is needed or used. Without hubc, both transformers and "
            f"vLLM (which reads the config through transformers) stop with \"The checkpoint you are trying to load "
            f"has model type `{result.model_type}` but Transformers does not recognize this architecture\".")
