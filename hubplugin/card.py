"""The variant's model card: huggingface_hub's ModelCard/ModelCardData filled from one run's measurements and
rendered through the Jinja template in model_cards/. Nothing in it is typed by hand or guessed."""

from __future__ import annotations

import datetime
import re
from importlib import resources
from pathlib import Path

from hubplugin.errors import HubcError
from hubplugin.formatting import number as _f
from hubplugin.formatting import size as _size

TEMPLATE = "variant.md.j2"
# Strings that must never reach the Hub in a rendered card.
_SAMPLE_SLOT = "\x00sample\x00"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{%|%\}|\bNone\b|\bnan\b|\bNaN\b|\binf\b|\bTODO\b|\bTBD\b|<fill")


def _quality_rows(result) -> list[dict]:
    rows = []
    for tr in result.quality:
        pairs = [(tr.base, tr.variant)]
        if tr.served_base is not None and tr.served_variant is not None:
            pairs.append((tr.served_base, tr.served_variant))
        for base, var in pairs:
            rows.append(
                {
                    "text": tr.text,
                    "engine": f"{base.engine} {base.engine_version}",
                    "dtype": base.dtype,
                    "tokens": var.tokens,
                    "base_ppl": _f(base.perplexity),
                    "variant_ppl": _f(var.perplexity),
                    "delta": f"{var.perplexity / base.perplexity - 1:+.2%}",
                    "kl": _f(var.kl, ".4f"),
                    "top1": _f(var.top1_agreement, ".1%") if var.top1_agreement is not None else "—",
                    "ece": f"{base.ece:.3f} → {var.ece:.3f}" if base.ece is not None and var.ece is not None else "—",
                }
            )
    return rows


def card_context(result) -> dict:
    import torch
    import transformers

    from advisor.schemes import get_scheme
    from hubplugin import __version__
    from hubplugin.card_structure import architecture_note, heal_rows, heal_text, structure_lines

    recipe = result.recipe
    scheme = get_scheme(recipe.scheme)
    base_name = result.source.hub_id or result.source.path.name
    # The name users serve it by: the pushed repo id, else the local folder.
    served_name = "/".join(result.push_url.rstrip("/").split("/")[-2:]) if result.push_url else str(result.out)
    ctx = {
        "title": f"{base_name.split('/')[-1]} · {recipe.scheme} for {result.target}",
        "scheme": recipe.scheme,
        "scheme_description": scheme.description.replace("(dynamic)", "(dynamic, asymmetric: a zero point per token)")
        if recipe.activations == "asymmetric" else scheme.description,
        "base_name": base_name,
        "base_url": f"https://huggingface.co/{base_name}" if result.source.hub_id else base_name,
        "base_revision": result.source.revision,
        "target": result.target,
        "target_description": result.target_description,
        "source_note": result.source.note,
        "source_kind_text": "a GGUF file" if result.source.kind in ("gguf", "demo") else "a local folder",
        "size_before": _size(result.size_before),
        "size_after": _size(result.size_after),
        "size_ratio": f"{result.size_after / result.size_before:.0%}",
        "checkpoint_dtype": result.checkpoint_dtype,
        "size_original": _size(result.size_original) if result.size_original else None,
        "size_original_ratio": f"{result.size_after / result.size_original:.0%}" if result.size_original else None,
        "gate_text": _gate_text(result),
        "size_budget_text": budget_text(result),
        "quantized_modules": result.quantized_modules,
        "method_text": _method_text(result),
        "ignore_text": ", ".join(f"`{m}`" for m in recipe.ignore) or "none",
        "windows_text": _windows_text(result),
        "quality_rows": _quality_rows(result),
        "served_note": (
            "The `vllm` rows are computed from the served checkpoint's own prompt logprobs (teacher-forced), so they "
            "reflect the kernels users run; the `transformers` rows are hubc's evaluation of the same files. "
            "KL needs full distributions, which only the transformers evaluation has."
            if result.served else None
        ),
        "flags": list(result.flags),
        "recipe_yaml": recipe.to_yaml(),
        "serve_command": _serve_command(served_name, result),
        "served_name": served_name,
        "kernel_note": _kernel_note(result),
        "hubc_version": __version__,
        "made_on": datetime.date.today().isoformat(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "latency_rows": [],
        # Model-generated text may contain anything (even "None"): it is filled in after the placeholder check.
        "sample": {"prompt": result.sample["prompt"], "completion": _SAMPLE_SLOT} if result.sample else None,
        "not_served_note": result.not_served_reason or "",
        "structure_lines": structure_lines(result),
        "heal_text": heal_text(result),
        "heal_rows": heal_rows(result),
        "architecture_note": architecture_note(result),
    }
    if result.latency is not None:
        lat = result.latency
        s = lat.settings
        ctx.update(
            vllm_version=lat.vllm_version,
            hardware=lat.hardware,
            latency_settings=_latency_settings(s),
            latency_rows=[
                {
                    "name": name,
                    "ttft50": _f(m["ttft_ms_p50"], ".1f"),
                    "ttft95": _f(m["ttft_ms_p95"], ".1f"),
                    "tpot50": _f(m["tpot_ms_p50"], ".1f"),
                    "tpot95": _f(m["tpot_ms_p95"], ".1f"),
                    "tput": _f(m["throughput_tok_s"], ".1f"),
                }
                for name, m in ((f"base ({base_name})", lat.base), (f"this variant ({recipe.scheme})", lat.variant))
            ],
            speed_note=speed_note(result),
        )
    return ctx


def _latency_settings(s: dict) -> str:
    """The recorded server and request settings of the latency measurement, as the card's Serving section states
    them (only what was recorded: a setting missing from an older report.json is left out, never guessed)."""
    server = [f"dtype {s['dtype']}"]
    if s.get("max_model_len"):
        server.append(f"max-model-len {s['max_model_len']}")
    if s.get("kv_cache_gib"):
        server.append(f"{s['kv_cache_gib']:g} GiB KV cache")
    if s.get("enforce_eager"):
        server.append("enforce-eager")
    server += [str(arg) for arg in s.get("extra_args") or ()]
    warmup = f" after {s['warmup']} unmeasured warm-up request(s)" if s.get("warmup") else ""
    rounds = (f", in each of {s['rounds']} interleaved rounds of `vllm bench serve` (median over rounds)"
              if s.get("rounds") else "")  # fmt: skip
    return (
        f"{s['requests']} sequential requests (concurrency 1) of {s['prompt_tokens']} prompt tokens and "
        f"{s['output_tokens']} output tokens{warmup}{rounds}; server {', '.join(server)}; base and variant on the "
        "same settings"
    )


def speed_note(result) -> str:
    """The variant's measured time per output token against the base's, and the kernel behind the difference: base
    and variant ran on one server setting, so what differs is the quantized linears' kernel, named from the target
    catalog for the scheme(s) served; a cause is stated only where the catalog records one."""
    lat = result.latency
    ratio = lat.variant["tpot_ms_p50"] / lat.base["tpot_ms_p50"]
    dtype = lat.settings.get("dtype") or result.serve_dtype
    served = _served_kernels(result)
    kernels = "; ".join((f"{scheme}: " if len(served) > 1 else "") + f"`{s.kernel}` ({s.note.rstrip('.')})"
                        for scheme, s in served)
    how = (f"Base and variant were served in {dtype} on the same settings, so the difference is the kernel of the "
           f"variant's quantized linears, {kernels}, against vLLM's dense {dtype} GEMM for the base's.")
    if ratio > 1.05:
        return (f"On this hardware the variant is smaller but {ratio:.1f}× slower per output token than the base. "
                f"{how} Its speed on other hardware is not measured here.")
    if ratio < 0.95:
        return f"On this hardware the variant is {1 / ratio:.1f}× faster per output token than the base. {how}"
    return f"On this hardware the variant runs at the base's speed per output token (within 5%). {how}"


def _served_kernels(result) -> list[tuple[str, object]]:
    """(scheme, the catalog's SchemeSupport on the target) for every scheme the recipe quantizes with."""
    from advisor.actions import Quantize
    from advisor.targets import get_target

    target = get_target(result.target)
    recipe = result.recipe
    others = {a.scheme for a in _actions(recipe).values() if isinstance(a, Quantize) and a.scheme != recipe.scheme}
    return [(s, target.schemes[s]) for s in [recipe.scheme, *sorted(others)] if s in target.schemes]


def _actions(recipe) -> dict:
    """The recipe's per-unit actions, parsed (module name or `re:` regex → advisor.actions.Action)."""
    from advisor.actions import parse_action

    return {name: parse_action(value) for name, value in recipe.actions.items()}


def _bits(recipe) -> int:
    from advisor.schemes import get_scheme

    return get_scheme(recipe.scheme).weights.num_bits


def _gate_text(result) -> str | None:
    gate = result.gate
    if not gate or gate.get("worst") is None:
        return None
    w = gate["worst"]
    verdict = "passes" if gate["passed"] else "**fails**"
    return (f"Quality gate: this variant {verdict} hubc's gate of at most {gate['threshold']:+.0%} perplexity over "
            f"the base on every evaluation text (largest: {w['increase']:+.2%} on {w['text']}, {w['engine']}).")


def _method_text(result) -> str:
    from advisor.evaluate import text_label

    recipe, t = result.recipe, result.transforms
    if recipe.scheme == "dense":
        return "none: no quantization, structure only" + (
            f", calibrated on {t.get('calibration_tokens')} tokens of {text_label(recipe.calibration['text'])}"
            if recipe.calibration else "")
    parts = [{
        "rtn": "round-to-nearest",
        "gptq": "GPTQ (layer by layer, activation order, clipping search)",
        "autoround": f"rounding {'' if _bits(recipe) >= 8 else 'and clipping '}learned block by block "
                     f"({_learning_steps(recipe)} signed-gradient steps per decoder block against the full-precision "
                     "block, AutoRound-style)",
    }.get(recipe.method, recipe.method)]
    if recipe.smoothing != "none":
        from advisor.schemes import get_scheme

        kind = ("activation outliers smoothed into the weights (SmoothQuant"
                if get_scheme(recipe.scheme).input_activations is not None
                else "activation-aware weight scaling (AWQ-style")
        parts.append(f"{kind}, strength searched per group) in {t.get('smoothed')} of {t.get('smoothing_groups')} "
                     "layer groups")
    if recipe.calibration:
        parts.append(f"calibrated on {t.get('calibration_tokens')} tokens of {text_label(recipe.calibration['text'])}")
    kept = t.get("kept_dense") or {}
    if kept:
        total = t.get("quantization_cost") or 0.0
        share = f", {sum(kept.values()) / total:.0%} of the estimated quantization loss" if total > 0 else ""
        parts.append(f"{len(kept)} linear layer{'s' if len(kept) > 1 else ''} kept {recipe.budget_kept} within a "
                     f"{recipe.dense_budget:.1%} weight budget, the most costly to quantize as measured on the "
                     f"calibration text ({', '.join(kept)}{share})")
    removed = t.get("removed_layers") or []
    if removed:
        parts.append(f"decoder layer{'s' if len(removed) > 1 else ''} {', '.join(removed)} removed (the checkpoint "
                     f"has {len(removed)} fewer layer{'s' if len(removed) > 1 else ''} than the base)")
    manual = [a for k, a in _actions(recipe).items() if k not in kept and k not in removed]
    if manual:
        from advisor.actions import Quantize

        kinds = sorted({a.scheme if isinstance(a, Quantize) else a.kind for a in manual})
        parts.append(f"{len(manual)} per-module actions ({', '.join(kinds)}; listed in recipe.yaml)")
    if recipe.group_size:
        parts.append(f"group size {recipe.group_size}")
    if recipe.int8_pair_sum:
        parts.append(f"same-sign int8 codes of adjacent input channels kept within |q[2j]| + |q[2j+1]| ≤ {recipe.int8_pair_sum} "
                     "for this CPU's int8 GEMM (no VNNI: pairs of products are added in int16)")
    if result.path != "in memory":
        # Streamed and in-memory runs give the same bytes (tests/advisor/test_stream.py); the card says which ran
        # so that a reader of a big model's card knows how it was made on the hardware it names.
        parts.append(f"compressed and evaluated {result.path_reason}")
    return ", ".join(parts)


def _learning_steps(recipe) -> int:
    """The steps per block learned rounding ran: the recipe's, else the default advisor.quantize.autoround used."""
    if recipe.iterations is not None:
        return recipe.iterations
    from advisor.quantize.autoround import RoundConfig

    return RoundConfig().iterations


def _windows_text(result) -> str:
    tr = result.quality[0]
    return f"{tr.variant.tokens} scored tokens"


def _serve_command(name: str, result) -> str:
    if result.target == "cpu":
        return (
            "VLLM_CPU_KVCACHE_SPACE=2 python -m vllm.entrypoints.openai.api_server \\\n"
            f"  --model {name} --dtype {result.serve_dtype} --max-model-len 2048 --enforce-eager"
        )
    return f"vllm serve {name} --dtype {result.serve_dtype} --max-model-len 4096"


def _kernel_note(result) -> str:
    return " ".join(f"On {result.target}, vLLM runs {scheme} with `{s.kernel}`: {s.note.rstrip('.')}."
                    for scheme, s in _served_kernels(result))


def render_card(result) -> str:
    """Render README.md for the variant; refuses to return a card with a placeholder or an unfilled field."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = ["hubc", "compressed-tensors", result.recipe.scheme, f"target-{result.target}"]
    data = ModelCardData(
        base_model=result.source.hub_id,
        # Pruned or factorized weights were trained (healed): a fine-tune of the base; otherwise a quantization.
        base_model_relation=(None if not result.source.hub_id else
                             "finetune" if (result.transforms or {}).get("heal") else "quantized"),
        base_model_revision=result.source.revision if result.source.hub_id else None,  # the exact base commit
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    template = resources.files("model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    card = ModelCard.from_template(data, template_str=template, **card_context(result))
    text = str(card)
    bad = _PLACEHOLDER.search(text)
    if bad:
        line = text[: bad.start()].count("\n") + 1
        raise HubcError(f"the model card has an unfilled field at line {line} ({bad.group(0)!r})",
                        hint="this is a hubc bug; please report it with report.json")
    if result.sample:
        completion = " ".join(result.sample["completion"].split()).replace("*", "\\*")
        text = text.replace(_SAMPLE_SLOT, completion)
    return text


BENCH_START, BENCH_END = "<!-- hubc:bench -->", "<!-- /hubc:bench -->"


def _pair(metrics: dict, key: str) -> str:
    lo, hi = metrics.get(f"{key}_p50"), metrics.get(f"{key}_p95")
    return "—" if lo is None or hi is None else f"{lo:.1f} / {hi:.1f}"


def bench_section(records) -> str:
    """Markdown for `hubc bench` measurements of this checkpoint (serving.store.Measurement, kind `latency`): the
    latest run per traffic profile, hardware and vLLM version, each with the settings it ran under."""
    from serving.bench import stored_throughput

    latest = {}
    for m in records:
        latest[(m.traffic, m.hardware, m.engine_version)] = m
    intro = ("vLLM's own `vllm bench serve` (random dataset) against this checkpoint; latency percentiles are over "
             "the requests of a run (median over rounds), throughput percentiles across rounds (p95: the rate 95% "
             "of rounds reached). Only the hardware named was measured; no number here is a prediction.")
    header = ("| traffic | hardware | vLLM | TTFT p50 / p95 (ms) | TPOT p50 / p95 (ms) | ITL p50 / p95 (ms) | "
              "output tokens/s p50 / p95 | peak memory (MiB) | settings |")
    lines = ["### Measured with `hubc bench`", "", intro, "", header, "|---|---|---|---|---|---|---|---|---|"]
    for m in latest.values():
        x, tput = m.metrics, stored_throughput(m.metrics)
        server, bench = m.settings.get("server", {}), m.settings.get("benchmark", {})
        parts = [("dtype {}", server.get("dtype")), ("max-model-len {}", server.get("max_model_len")),
                 ("enforce-eager", True if server.get("enforce_eager") else None),
                 ("{} prompts", bench.get("num_prompts")), ("{} rounds", bench.get("rounds")),
                 ("seed {}", bench.get("seed"))]
        settings = ", ".join(text.format(value) for text, value in parts if value is not None)


        tok = (f"{tput['output_throughput_tok_s_p50']:.1f} / {tput['output_throughput_tok_s_p95']:.1f}"
               if tput else "—")
        peak = f"{x['peak_memory_mib']:.0f}" if x.get("peak_memory_mib") else "—"
        lines.append(f"| {m.traffic} | {m.hardware} | {m.engine_version} | {_pair(x, 'ttft_ms')} | "
                     f"{_pair(x, 'tpot_ms')} | "
                     f"{_pair(x, 'itl_ms')} | {tok} | {peak} | {settings} |")
    return "\n".join(lines)


def with_bench_section(readme: str, records) -> str | None:
    """The card with its `hubc bench` section replaced by `records`; None when the card has no such section (not
    a hubc card, or edited by hand) or there is nothing to show."""
    start, end = readme.find(BENCH_START), readme.find(BENCH_END)
    if start < 0 or end < start or not records:
        return None
    return readme[: start + len(BENCH_START)] + "\n" + bench_section(records) + "\n" + readme[end:]


def refresh_bench_section(folder: Path, store=None) -> int:
    """Put the results store's `hubc bench` measurements of this checkpoint (its current fingerprint) into the
    folder's card; returns how many runs were added (0: none stored, or not a hubc card)."""
    import os

    from serving.store import ResultsStore

    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return 0
    records = (store or ResultsStore()).records(kind="latency", checkpoint=folder)
    text = with_bench_section(readme.read_text(encoding="utf-8"), records)
    if text is None:
        return 0
    tmp = readme.with_name(".README.md.hubc-tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, readme)  # the card is never left half-written
    return len({(m.traffic, m.hardware, m.engine_version) for m in records})


def budget_text(result) -> str | None:
    """`--max-size`: the budget, what hubc chose to fit it, and whether the written weights did."""
    b = getattr(result, "size_budget", None)
    if not b:
        return None
    fits = "within it" if result.size_after <= b["max_bytes"] else "over it"
    return (f"Size budget {_size(b['max_bytes'])} (`--max-size`): {b['choice']}; the weights written take "
            f"{_size(result.size_after)}, {fits}.")

