"""The `hubc bench`, `hubc pick` and `hubc predict` commands: measure served checkpoints, pick one against an SLO,
predict latency. They parse flags, call serving.bench / serving.pick / advisor.latency, and render the result
(hubplugin.render); registered on the `hubc` group by hubplugin.cli."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from hubplugin.cli_common import FORMATS, Finite, progress, run_command

__all__ = ["bench", "pick", "predict"]


def _checkpoints(refs, revision=None) -> list:
    from hubplugin.checkpoints import local_checkpoints

    return local_checkpoints(refs, revision, warn=lambda message: click.echo(f"warning: {message}", err=True))


def _traffic(text):
    from advisor.measurement import Traffic

    try:
        return Traffic.parse(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--traffic") from None


def _bench_config(traffic, num_prompts, min_rounds, max_rounds, max_spread, dtype, layout, log_dir):
    from serving.bench import BenchConfig

    return BenchConfig(traffic=_traffic(traffic), num_prompts=num_prompts, min_rounds=min_rounds, max_rounds=max_rounds,
                       max_spread=max_spread, dtype=dtype, layout=layout, log_dir=log_dir)


def _bench_options(fn):
    """The measurement options `hubc bench` and `hubc pick` share."""
    options = [
        click.option("--base", help="base model to measure with them (folder, Hub repo id or `demo`)"),
        click.option("--traffic", default="in=512,out=128,concurrency=8", show_default=True,
                     help="random prompts of `in` tokens, `out` generated tokens, `concurrency` requests in flight"),
        click.option("--num-prompts", type=click.IntRange(min=1), help="requests per benchmark run (default max(4 x concurrency, 8))"),
        click.option("--min-rounds", type=click.IntRange(min=1), default=2, show_default=True, help="interleaved rounds always run"),
        click.option("--max-rounds", type=click.IntRange(min=1), default=5, show_default=True,
                     help="rounds at most, added while the TPOT spread is above --max-spread"),
        click.option("--max-spread", type=Finite(min=0), default=0.05, show_default=True,
                     help="target relative range of TPOT p50 across rounds"),
        click.option("--dtype", default="bfloat16", show_default=True,
                     type=click.Choice(["bfloat16", "float16", "float32", "auto"]),
                     help="dtype every checkpoint is served in (W4A16 on CPU needs 16-bit activations)"),
        click.option("--layout", default="frozen", show_default=True, type=click.Choice(["frozen", "one-at-a-time"]),
                     help="frozen: all servers start once, all but the measured one SIGSTOPped; one-at-a-time: "
                          "each server runs only for its turn"),
        click.option("--store", "store_path", type=click.Path(path_type=Path),
                     help="results store (default $HUBC_CACHE/results.sqlite or ~/.cache/hubc/results.sqlite)"),
        click.option("--log-dir", type=click.Path(path_type=Path), help="keep server and benchmark logs here"),
        click.option("--revision", help="Hub revision for repo ids (branch, tag or commit)"),
        click.option("--format", "fmt", type=FORMATS, default="human", help="human table or JSON on stdout"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command()
@click.argument("checkpoints", nargs=-1, required=True)
@_bench_options
def bench(checkpoints, base, traffic, num_prompts, min_rounds, max_rounds, max_spread, dtype, layout, store_path,
          log_dir, revision, fmt) -> None:
    """Measure TTFT, TPOT, ITL (p50/p95), throughput and peak memory of CHECKPOINTS (and --base) with vLLM's own
    `vllm bench serve`, interleaved in one run, and store the numbers."""

    def body():
        from serving.bench import bench as run
        from serving.store import ResultsStore

        config = _bench_config(traffic, num_prompts, min_rounds, max_rounds, max_spread, dtype, layout, log_dir)
        infos = _checkpoints(checkpoints, revision)
        base_info = _checkpoints([base], revision)[0] if base else None
        store = ResultsStore(store_path)
        report = run(infos, config, base=base_info, store=store,
                     progress=progress)
        if fmt == "json":
            click.echo(json.dumps({**report.to_dict(), "store": str(store.path)}, indent=2, default=str))
        else:
            from hubplugin.render import bench_table

            bench_table(report, store.path)

    run_command(body)


def _percent(ctx, param, value):
    """`5`, `5%` and `+5%` all mean a 5% increase."""
    if value is None:
        return None
    try:
        share = float(str(value).strip().rstrip("%")) / 100
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a percentage (e.g. 5 or 5%)") from None
    if not math.isfinite(share) or share <= -1:
        raise click.BadParameter(f"{value!r} is not a perplexity change: give a percentage above -100 (e.g. 5 or 5%)")
    return share


@click.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--max-tpot-ms", type=Finite(min=0, min_open=True), required=True,
              help="largest acceptable time per output token (ms)")
@click.option("--max-ppl-increase", callback=_percent, required=True,
              help="largest acceptable served-perplexity increase over the base, in percent (5 or 5%)")
@click.option("--tpot-percentile", type=click.Choice(["50", "95"]), default="50", show_default=True,
              help="the TPOT percentile the SLO is on")
@click.option("--eval-text", default="wikitext2-test", show_default=True,
              help="text for served perplexity: wikitext2-test, licenses or a file path")
@click.option("--eval-windows", type=click.IntRange(min=1), default=2, show_default=True, help="windows of that text")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="tokens per window")
@click.option("--plot", type=click.Path(path_type=Path), default=Path("hubc-pick-pareto.png"), show_default=True,
              help="where to write the Pareto plot (PNG)")
@click.option("--remeasure", is_flag=True, help="measure again even what the store already holds")
@_bench_options
def pick(checkpoints, max_tpot_ms, max_ppl_increase, tpot_percentile, eval_text, eval_windows, seq_len, plot,
         remeasure, base, traffic, num_prompts, min_rounds, max_rounds, max_spread, dtype, layout, store_path,
         log_dir, revision, fmt) -> None:
    """Rank CHECKPOINTS (folders or Hub repo ids) and the base by TPOT at the traffic profile and by served
    perplexity, and name the best that meets both SLOs; measures whatever the results store lacks."""

    def body():
        from serving.pick import SLO, PickConfig, PickError, QualityConfig, base_ref
        from serving.pick import pick as run
        from serving.store import ResultsStore

        config = PickConfig(
            slo=SLO(max_tpot_ms=max_tpot_ms, max_ppl_increase=max_ppl_increase,
                    tpot_percentile=int(tpot_percentile)),
            bench=_bench_config(traffic, num_prompts, min_rounds, max_rounds, max_spread, dtype, layout, log_dir),
            quality=QualityConfig(text=eval_text, seq_len=seq_len, windows=eval_windows),
            remeasure=remeasure,
            plot=plot,
        )
        infos = _checkpoints(checkpoints, revision)
        base_model = base or base_ref(infos)
        if base_model is None:
            raise PickError("no base model to compare perplexity with: none of the checkpoints has hubc's "
                            "report.json", hint="name it with --base MODEL")
        store = ResultsStore(store_path)
        result = run(infos, _checkpoints([base_model])[0], config, store=store,
                     progress=progress)
        if fmt == "json":
            click.echo(json.dumps({**result.to_dict(), "store": str(store.path)}, indent=2, default=str))
        else:
            from hubplugin.render import pick_table

            pick_table(result, store.path)
        if result.choice is None:
            sys.exit(1)

    run_command(body)


# -- latency predictions (advisor.latency) ----------------------------------------------------------------------


@click.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--target", "-t", required=True, help="hardware target from `hubc targets` (cpu, t4, a10g, l4, ...)")
@click.option("--traffic", default="in=512,out=128,concurrency=8", show_default=True,
              help="random prompts of `in` tokens, `out` generated tokens, `concurrency` requests in flight")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]),
              help="dtype the checkpoints are served in (default: bfloat16 on cpu, as `hubc bench` serves; the "
                   "target's own on GPUs)")
@click.option("--store", "store_path", type=click.Path(path_type=Path),
              help="results store (default $HUBC_CACHE/results.sqlite or ~/.cache/hubc/results.sqlite)")
@click.option("--revision", help="Hub revision for repo ids (branch, tag or commit)")
@click.option("--format", "fmt", type=FORMATS, default="human", help="human table or JSON on stdout")
def predict(checkpoints, target, traffic, dtype, store_path, revision, fmt) -> None:
    """Predict TTFT and TPOT p50 of CHECKPOINTS served by vLLM on TARGET at the traffic profile: the target's
    roofline, calibrated by the `hubc bench` measurements of the same hardware in the results store (`cpu` has no
    roofline: measurements only). Where the store has measured a checkpoint at that traffic, shows both."""

    def body():
        from advisor.checkpoint_features import checkpoint_features
        from advisor.latency import LatencyModel
        from advisor.targets import get_target
        from serving.bench import DEFAULT_DTYPE
        from serving.store import ResultsStore, target_latency_records

        load = _traffic(traffic)
        tgt = get_target(target)
        served = dtype or (DEFAULT_DTYPE if tgt.kind == "cpu" else tgt.serve_dtype)
        infos = _checkpoints(checkpoints, revision)
        store = ResultsStore(store_path)
        records, stale = target_latency_records(store, tgt)
        if stale:
            progress(f"{stale} stored measurement(s) left out: their checkpoint folders were removed or rewritten "
                     "since")
        model = LatencyModel.fit(records, tgt, served)
        predictions = [model.predict(checkpoint_features(i.path, served), load, label=i.label) for i in infos]
        if fmt == "json":
            out = {"predictions": [p.to_dict() for p in predictions], "coefficients": model.coefficients(),
                   "store": str(store.path)}  # fmt: skip
            click.echo(json.dumps(out, indent=2, default=str))
        else:
            from hubplugin.render import predict_table

            predict_table(predictions, model)

    run_command(body)
