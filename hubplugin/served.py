"""The served half of a run: base and variant served by vLLM side by side (serving.check), their served quality and
latency put on the run's result and stored in the results store under the variant's final folder."""

from __future__ import annotations

from pathlib import Path

# A served perplexity further than this from hubc's own evaluation of the same checkpoint is flagged.
SERVED_GAP = 0.02


def serve_and_measure(result, source, staging, texts, base_top1, target, config, progress) -> None:
    """Serve base and variant (serving.check: served quality, latency through `hubc bench`'s path, a completion),
    put the numbers on `result`, and store them in the results store under the variant's final folder."""
    import dataclasses

    from advisor.measurement import Traffic
    from serving.check import CheckConfig, EvalWindows, check
    from serving.server import ServerConfig
    from serving.store import ResultsStore, describe

    traffic = Traffic(config.latency_prompt_tokens, config.latency_output_tokens, concurrency=1)
    server = ServerConfig(dtype=target.serve_dtype_of(result.recipe.scheme), env=dict(target.serve_env),
                          max_model_len=max(config.eval.seq_len, traffic.input_len + traffic.output_len) + 16,
                          extra_args=("--no-enable-prefix-caching",))  # as `hubc bench` serves
    measured = {tr.text for tr in result.quality}
    windows = [EvalWindows(t.name, t.windows, config.eval.seq_len, base_top1[t.name]) for t in texts
               if t.name in measured]
    base = describe(source.path, model_id=source.hub_id, revision=source.revision,
                    name=source.ref if source.kind in ("hub", "demo") else source.hub_id)
    variant = describe(staging)
    # What describe() will read from the finished folder's report.json, so stored records name the final folder.
    final = dataclasses.replace(variant, path=str(Path(result.out).resolve()), model_id=source.hub_id,
                                revision=source.revision, base_model_id=source.hub_id, base_path=str(source.path),
                                recipe=result.to_dict().get("recipe"), target=result.target)
    checked = check(base, variant, CheckConfig(server=server, texts=windows, traffic=traffic,
                                               num_prompts=config.latency_requests,
                                               layout="frozen" if target.kind == "cpu" else "one-at-a-time"),
                    store=ResultsStore(), variant_record=final, progress=progress)
    for tr in result.quality:
        tr.served_base, tr.served_variant = checked.quality["base"][tr.text], checked.quality["variant"][tr.text]
    result.served = True
    result.sample = checked.sample
    from hubplugin.optimize import LatencyPair

    result.latency = LatencyPair(base=checked.latency["base"], variant=checked.latency["variant"],
                                 hardware=checked.hardware, vllm_version=checked.vllm_version,
                                 settings=checked.settings)
    for tr in result.quality:
        sv, ev_ = tr.served_variant, tr.variant
        gap = sv.perplexity / ev_.perplexity - 1.0
        if abs(gap) > SERVED_GAP:
            result.flags.append(
                f"on {tr.text}, vLLM serves this checkpoint at perplexity {sv.perplexity:.3f} while hubc's evaluation of "
                f"the same checkpoint gives {ev_.perplexity:.3f} ({gap:+.1%}); trust the served number"
            )
