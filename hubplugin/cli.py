"""The `hubc` command line: parses flags, calls one verb, renders its result. No logic lives here.

Heavy libraries (torch, transformers, vLLM) are imported inside the commands, so `hubc --help` stays instant.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from advisor.errors import HintedError
from advisor.recipe import METHODS
from hubplugin import __version__

FORMATS = click.Choice(["human", "json"])

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With spinning, a machine shared with
# other work (a vLLM server, a second job) runs calibration several times slower: measured on 2 busy cores, 10 steps
# of learned rounding on one block took 77 s spinning, 13 s passive.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["HUBC_SET_OMP_WAIT_POLICY"] = "1"  # vLLM servers started by hubc do not inherit it (serving.server)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a job runner stopping hubc) unwinds like Ctrl-C: the `finally` blocks remove partial outputs and
    stop the vLLM servers this process started, instead of the process dying with them in place."""


def _on_sigterm(signum, frame):
    raise _Terminated


def _run(fn):
    """Call a command body; typed errors become one line on stderr and exit code 2 (HUBC_DEBUG=1 re-raises)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return fn()
    except HintedError as exc:
        if os.environ.get("HUBC_DEBUG"):
            raise
        line = exc.message if not exc.hint else f"{exc.message}; {exc.hint}"
        click.echo(f"error: {' '.join(line.split())}", err=True)
        sys.exit(2)
    except _Terminated:
        click.echo("terminated", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hubc")
def main() -> None:
    """Compress a Hugging Face model for a named GPU or CPU, prove it with measurements, publish and serve it."""


@main.command()
@click.option("--format", "fmt", type=FORMATS, default="human", help="human table or JSON on stdout")
def targets(fmt: str) -> None:
    """List the hardware targets and the checkpoint schemes vLLM serves on each."""

    def body():
        from advisor.targets import load_catalog

        catalog = load_catalog()
        if fmt == "json":
            click.echo(json.dumps({n: _target_dict(t) for n, t in catalog.items()}, indent=2, default=str))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="hubc targets")
        for col in ("target", "description", "memory", "bandwidth", "schemes (default first)"):
            table.add_column(col)
        for name, t in catalog.items():
            schemes = [t.default_scheme] + [s for s in t.schemes if s != t.default_scheme]
            table.add_row(
                name,
                t.description,
                f"{t.memory_gib:g} GiB" if t.memory_gib else "this machine's",
                f"{t.memory_bandwidth_gbs:g} GB/s" if t.memory_bandwidth_gbs else "—",
                ", ".join(schemes),
            )
        console = Console()
        console.print(table)
        from advisor.targets import cpu_variants

        variants = ", ".join(f"cpu-{v.isa} ({', '.join(v.schemes)})" for v in cpu_variants())
        console.print(f"To build for a CPU other than this one, name its variant: {variants}.")

    _run(body)


def _target_dict(t) -> dict:
    from dataclasses import asdict

    return asdict(t)


@main.command()
@click.argument("model")
@click.option("--target", "-t", required=True, help="hardware target from `hubc targets` (cpu, t4, a10g, l4, ...)")
@click.option("--scheme", help="w8a8-int8, w4a16, w8a16 or fp8 (default: the target's default)")
@click.option("--group-size", type=click.IntRange(min=1), help="weights per scale for w4a16 (default: chosen per model)")
@click.option("--method", type=click.Choice(METHODS),
              help="weight rounding: rtn (round-to-nearest, seconds), gptq (Hessian error compensation, about "
                   "1.5 min for a 135M model on 2 cores), or autoround (rounding learned block by block: 3-5x GPTQ's "
                   "time with native bf16, about 3x more without; it prints its estimate before starting). "
                   "Calibrated methods use wikitext-2 valid. Default: gptq for 4-bit weights and for w8a8-int8 on "
                   "CPUs without VNNI, rtn otherwise (benchmarks/results/default_method_*.md)")
@click.option("--iterations", type=click.IntRange(min=1), help="learning steps per decoder block for --method autoround")
@click.option("--smoothing", type=click.Choice(["search", "none"]),
              help="per-channel scaling searched on calibration text: SmoothQuant for w8a8-int8/fp8 (their default), "
                   "activation-aware (AWQ-style) for weight-only schemes")
@click.option("--dense-budget", type=click.FloatRange(min=0, max=1, max_open=True),
              help="share of the linear weights left unquantized, the layers whose quantization costs the most loss "
                   "(measured on calibration text) first. Default: 0.02 for w8a8-int8/fp8; 0.3, at w8a16, for w4a16 "
                   "where the target serves w8a16; else 0")
@click.option("--budget-scheme", help="what the --dense-budget layers get: dense, or a scheme with more bits "
                                      "(e.g. w8a16 under w4a16). Default: dense; w8a16 for w4a16 on GPUs")
@click.option("--activations", type=click.Choice(["symmetric", "asymmetric"]),
              help="int8 activations per token: symmetric (default) or asymmetric, a zero point per token: closer "
                   "to the base by KL and top-1 agreement on the demo model; its perplexity change varied with the "
                   "calibration setting (README)")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path, dir_okay=False),
              help="recipe YAML to apply (e.g. per-module mixed precision) instead of --scheme/--method/...")
@click.option("--out", type=click.Path(path_type=Path), help="output folder (default ./<model>-<scheme>-<target>)")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder once the new one is complete")
@click.option("--push", "push_repo", metavar="REPO_ID", help="push the variant to this Hub repo in one commit")
@click.option("--private", is_flag=True, help="create the pushed repo as private")
@click.option("--revision", help="Hub revision (branch, tag or commit) of MODEL")
@click.option("--no-serve", is_flag=True, help="skip the vLLM serving check and latency measurement")
@click.option("--max-ppl-increase", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="quality gate: a variant whose perplexity on any evaluation text (evaluated or served) rises more "
                   "than this share over the base is flagged in the summary and card, and --push refuses it")
@click.option("--accept-quality-loss", is_flag=True,
              help="push a variant even when it fails the --max-ppl-increase gate (it stays flagged in its card)")
@click.option("--eval-text", "eval_texts", multiple=True,
              help="evaluation text: wikitext2-test, licenses or a file path (repeatable; default both shipped texts)")
@click.option("--eval-windows", type=click.IntRange(min=1), default=16, show_default=True,
              help="windows per text, from its start (fewer are noisy: 4 windows read the demo's served licenses "
                   "Δppl as +1.08% where 40 read +0.59%)")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="tokens per evaluation window")
@click.option("--format", "fmt", type=FORMATS, default="human", help="human summary or JSON report on stdout")
def optimize(model, target, scheme, group_size, method, iterations, smoothing, dense_budget, budget_scheme, activations,
             recipe_file, out, overwrite, push_repo, private, revision, no_serve, max_ppl_increase, accept_quality_loss,
             eval_texts, eval_windows, seq_len, fmt) -> None:
    """Compress MODEL (Hub repo id, local folder, .gguf file, or `demo`) for TARGET, evaluate, serve and card it."""

    def body():
        from advisor.evaluate import EvalConfig
        from hubplugin.optimize import OptimizeConfig
        from hubplugin.optimize import optimize as run
        from hubplugin.render import summary

        recipe = None
        if recipe_file is not None:
            recipe = _read_recipe(recipe_file, scheme=scheme, group_size=group_size, method=method,
                                  iterations=iterations, smoothing=smoothing, dense_budget=dense_budget,
                                  budget_scheme=budget_scheme, activations=activations)
        config = OptimizeConfig(
            recipe=recipe,
            scheme=scheme, group_size=group_size, method=method, iterations=iterations, smoothing=smoothing,
            dense_budget=dense_budget, budget_scheme=budget_scheme, activations=activations or "symmetric", out=out,
            overwrite=overwrite, push=push_repo, private=private, serve=not no_serve, revision=revision,
            max_ppl_increase=max_ppl_increase, accept_quality_loss=accept_quality_loss,
            eval=EvalConfig(texts=tuple(eval_texts) or EvalConfig().texts, seq_len=seq_len, windows=eval_windows),
        )
        result = run(model, target, config, progress=lambda s: click.echo(f"» {s}", err=True))
        if fmt == "json":
            click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        else:
            summary(result)
        if result.push_refused:
            from hubplugin.errors import QualityGateError

            raise QualityGateError(result.push_refused,
                                   hint=f"the checkpoint is complete at {result.out}; to publish it anyway: "
                                        f"hubc push {result.out} {push_repo} --accept-quality-loss")

    _run(body)


def _read_recipe(path: Path, **flags):
    """A recipe file replaces the flags that describe a recipe; giving both is ambiguous."""
    from advisor.recipe import Recipe
    from hubplugin.errors import HubcError

    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
    if given:
        raise HubcError(f"--recipe already says how to quantize; {', '.join(given)} would conflict with it",
                        hint="edit the recipe file, or drop --recipe")
    try:
        text = path.read_text()
    except OSError as exc:
        raise HubcError(f"cannot read recipe {path}: {exc.strerror}", hint="pass an existing recipe YAML file") from None
    import yaml

    try:
        return Recipe.from_yaml(text)
    except (yaml.YAMLError, TypeError) as exc:
        raise HubcError(f"{path} is not a valid recipe ({str(exc).splitlines()[0]})",
                        hint="see recipe.yaml in any hubc output folder for the format") from None


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="create the repo as private")
@click.option("--message", default=None, help="commit message")
@click.option("--accept-quality-loss", is_flag=True,
              help="push even though `hubc optimize` flagged the variant for failing its quality gate")
def push(folder, repo_id, private, message, accept_quality_loss) -> None:
    """Push a checkpoint folder made by `hubc optimize` to REPO_ID on the Hub, in one commit."""

    def body():
        from hubplugin import hub
        from hubplugin.card import refresh_bench_section
        from hubplugin.optimize import failed_gate

        failed = failed_gate(folder)
        if failed and not accept_quality_loss:
            from hubplugin.errors import QualityGateError

            raise QualityGateError(f"not pushed: {failed}",
                                   hint=f"publish it anyway with hubc push {folder} {repo_id} --accept-quality-loss")

        runs = refresh_bench_section(folder)
        if runs:
            click.echo(f"» card: added {runs} `hubc bench` measurement(s) of this checkpoint", err=True)
        result = hub.push_folder(folder, repo_id, private=private,
                                 commit_message=message or f"hubc: upload {folder.name}")
        click.echo(result.url)

    _run(body)


# -- serving benchmarks and picking (serving.bench, serving.pick) ----------------------------------------------


def _checkpoints(refs, revision=None) -> list:
    """Each reference (local folder, Hub repo id, .gguf file or `demo`) as a local checkpoint with its provenance;
    repo ids are pulled through the Hub client (hubplugin.source -> hubplugin.hub.download)."""
    from hubplugin.source import resolve
    from serving.store import describe

    out = []
    for ref in refs:
        source = resolve(ref, revision=revision)
        # A Hub snapshot folder is named after its sha, a converted GGUF after its file: show what it stands for.
        name = ref if source.kind in ("hub", "demo") else source.hub_id
        out.append(describe(source.path, model_id=source.hub_id, revision=source.revision, name=name))
    return out


def _bench_config(traffic, num_prompts, min_rounds, max_rounds, max_spread, dtype, layout, log_dir):
    from serving.bench import BenchConfig, Traffic

    try:
        parsed = Traffic.parse(traffic)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--traffic") from None
    return BenchConfig(traffic=parsed, num_prompts=num_prompts, min_rounds=min_rounds, max_rounds=max_rounds,
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
        click.option("--max-spread", type=float, default=0.05, show_default=True,
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


@main.command()
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
                     progress=lambda s: click.echo(f"» {s}", err=True))
        if fmt == "json":
            click.echo(json.dumps({**report.to_dict(), "store": str(store.path)}, indent=2, default=str))
        else:
            from hubplugin.render import bench_table

            bench_table(report, store.path)

    _run(body)


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


@main.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--max-tpot-ms", type=click.FloatRange(min=0, min_open=True), required=True,
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
                     progress=lambda s: click.echo(f"» {s}", err=True))
        if fmt == "json":
            click.echo(json.dumps({**result.to_dict(), "store": str(store.path)}, indent=2, default=str))
        else:
            from hubplugin.render import pick_table

            pick_table(result, store.path)
        if result.choice is None:
            sys.exit(1)

    _run(body)


# -- latency predictions (advisor.latency) ----------------------------------------------------------------------


def _latency_records(store, target) -> tuple[list, int]:
    """The stored `hubc bench` measurements of the target's hardware (`cpu`: this machine's), less those whose
    checkpoint folder was removed or rewritten since (its files no longer say what was measured); and how many
    were left out."""
    from advisor.latency import measured_on
    from serving.store import LATENCY, fingerprint, hardware

    if target.kind == "cpu":
        records = store.records(kind=LATENCY, hardware=hardware())
    else:
        records = [r for r in store.records(kind=LATENCY) if measured_on(target, r.hardware)]
    fresh = [r for r in records
             if Path(r.checkpoint.path).is_dir() and fingerprint(Path(r.checkpoint.path)) == r.checkpoint.fingerprint]
    return fresh, len(records) - len(fresh)


def _predict_table(predictions, model) -> None:
    """`hubc predict`: one row per checkpoint, measured next to predicted where the store has it, then what the
    predictions rest on."""
    from rich.table import Table

    from hubplugin.render import _console

    def ms(value) -> str:
        return "—" if value is None else f"{value:.1f} ms"

    first = predictions[0]
    table = Table(title=f"predicted latency on {first.target}, {first.traffic}, served in {first.dtype}")
    for col in ("checkpoint", "format", "TTFT p50", "TPOT p50", "from", "measured TTFT / TPOT",
                "held-out prediction", "roofline TTFT / TPOT"):
        table.add_column(col, justify="left" if col in ("checkpoint", "format", "from") else "right")
    for p in predictions:
        m = p.measured
        table.add_row(
            p.label, p.formats, ms(p.ttft_ms_p50), ms(p.tpot_ms_p50),
            f"{p.measurements} measurements" if p.basis == "measurements" else "roofline only",
            f"{ms(m.ttft_ms)} / {ms(m.tpot_ms)}" if m else "—",
            f"{ms(m.predicted_ttft_ms)} / {ms(m.predicted_tpot_ms)}" if m else "—",
            f"{ms(p.roofline_ttft_ms)} / {ms(p.roofline_tpot_ms)}" if p.roofline_ttft_ms is not None else "—",
        )  # fmt: skip
    console = _console()
    console.print(table)
    fitted = next((p for p in predictions if p.basis == "measurements"), None)
    if fitted is not None:
        if fitted.loo_count:
            loo = (f"leave-one-out error TTFT {fitted.loo_ttft_error:.0%}, TPOT {fitted.loo_tpot_error:.0%} "
                   f"(mean over {fitted.loo_count} of them")  # fmt: skip
            left = fitted.measurements - fitted.loo_count
            loo += f"; {left} {'is' if left == 1 else 'are'} the only measurement of a format)" if left else ")"
        else:
            loo = "no leave-one-out error: every format has a single measurement"
        console.print(f"predictions (not measurements) from {fitted.measurements} `hubc bench` measurements on "
                      f"{'; '.join(fitted.hardware)}: {loo}", highlight=False)  # fmt: skip
    if any(p.basis == "roofline" for p in predictions):
        t = model.target
        console.print(f"roofline only: a lower bound from the catalog ({t.memory_bandwidth_gbs:g} GB/s, peak "
                      f"{', '.join(f'{k} {v:g}' for k, v in t.peak_tflops.items())} TFLOPS); no measurements of "
                      "those formats on this GPU", highlight=False)  # fmt: skip
    console.print("measured: the latest stored run of that checkpoint at this traffic; held-out prediction: the "
                  "model fitted without that run", highlight=False)


@main.command()
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
        from advisor.checkpoint_features import Load, checkpoint_features
        from advisor.latency import LatencyModel
        from advisor.targets import get_target
        from serving.bench import DEFAULT_DTYPE, Traffic
        from serving.store import ResultsStore

        try:
            parsed = Traffic.parse(traffic)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--traffic") from None
        load = Load(parsed.input_len, parsed.output_len, parsed.concurrency)
        tgt = get_target(target)
        served = dtype or (DEFAULT_DTYPE if tgt.kind == "cpu" else tgt.serve_dtype)
        infos = _checkpoints(checkpoints, revision)
        store = ResultsStore(store_path)
        records, stale = _latency_records(store, tgt)
        if stale:
            click.echo(f"» {stale} stored measurement(s) left out: their checkpoint folders were removed or "
                       "rewritten since", err=True)  # fmt: skip
        model = LatencyModel.fit(records, tgt, served)
        predictions = [model.predict(checkpoint_features(i.path, served), load, label=i.label) for i in infos]
        if fmt == "json":
            out = {"predictions": [p.to_dict() for p in predictions], "coefficients": model.coefficients(),
                   "store": str(store.path)}  # fmt: skip
            click.echo(json.dumps(out, indent=2, default=str))
        else:
            _predict_table(predictions, model)

    _run(body)


if __name__ == "__main__":
    main()
