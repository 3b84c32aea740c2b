"""The `hubc` command line: parses flags, calls one verb, renders its result. No logic lives here.

Heavy libraries (torch, transformers, vLLM) are imported inside the commands, so `hubc --help` stays instant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from advisor.quantize import METHODS
from hubplugin import __version__
from hubplugin.cli_common import FORMATS, Finite
from hubplugin.cli_common import run_command as _run
from hubplugin.cli_serving import bench, pick, predict

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With spinning, a machine shared with
# other work (a vLLM server, a second job) runs calibration several times slower: measured on 2 busy cores, 10 steps
# of learned rounding on one block took 77 s spinning, 13 s passive.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["HUBC_SET_OMP_WAIT_POLICY"] = "1"  # vLLM servers started by hubc do not inherit it (serving.server)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hubc")
def main() -> None:
    """Compress a Hugging Face model for a named GPU or CPU, prove it with measurements, publish and serve it."""


for _command in (bench, pick, predict):  # measuring, picking and predicting served checkpoints
    main.add_command(_command)


@main.command()
@click.option("--format", "fmt", type=FORMATS, default="human", help="human table or JSON on stdout")
def targets(fmt: str) -> None:
    """List the hardware targets and the checkpoint schemes vLLM serves on each."""

    def body():
        from dataclasses import asdict

        from advisor.targets import load_catalog

        catalog = load_catalog()
        if fmt == "json":
            click.echo(json.dumps({n: asdict(t) for n, t in catalog.items()}, indent=2, default=str))
            return
        from advisor.targets import cpu_variants
        from hubplugin.render import targets_table

        targets_table(catalog, cpu_variants())

    _run(body)


@main.command()
@click.argument("model")
@click.option("--target", "-t", required=True, help="hardware target from `hubc targets` (cpu, t4, a10g, l4, ...)")
@click.option("--scheme", help="w8a8-int8, w4a16, w8a16, fp8, or dense (no quantization: structure only) "
                               "(default: the target's default)")
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
@click.option("--dense-budget", type=Finite(min=0, max=1, max_open=True),
              help="share of the linear weights left unquantized, the layers whose quantization costs the most loss "
                   "(measured on calibration text) first. Default: 0.02 for w8a8-int8/fp8 (0.03 for w8a8-int8 on CPUs "
                   "without VNNI); 0.3, at w8a16, for w4a16 "
                   "where the target serves w8a16; else 0")
@click.option("--budget-scheme", help="what the --dense-budget layers get: dense, or a scheme with more bits "
                                      "(e.g. w8a16 under w4a16). Default: dense; w8a16 for w4a16 on GPUs")
@click.option("--activations", type=click.Choice(["symmetric", "asymmetric"]),
              help="int8 activations per token: symmetric (default) or asymmetric, a zero point per token: closer "
                   "to the base by KL and top-1 agreement on the demo model; its perplexity change varied with the "
                   "calibration setting (README)")
@click.option("--remove-layer", "remove_layers", type=click.IntRange(min=0), multiple=True,
              help="remove decoder layer N (0-based; repeat for more): the checkpoint has fewer layers, served as "
                   "the same architecture")
@click.option("--prune", "prune_spec", metavar="SPEC",
              help="structured pruning chosen on calibration text: a share of the decoder-linear parameters (e.g. "
                   "0.2: hubc chooses channels, heads and layers), or mlp=R,heads=R,layers=N (e.g. "
                   "mlp=0.3,heads=0.25,layers=4); healed by distillation (--heal-minutes)")
@click.option("--factorize", "factorize_share", type=Finite(min=0, max=1, min_open=True, max_open=True),
              help="share of the decoder-linear parameters removed by low-rank factorization (activation-whitened "
                   "SVD, ranks chosen per linear); combines with --prune and any --scheme")
@click.option("--heal-minutes", type=Finite(min=0),
              help="distillation healing after --prune/--factorize/--remove-layer: minutes of training against the "
                   "base model (default 15; 0: none)")
@click.option("--max-size", "max_size", metavar="SIZE",
              help="largest weights on disk, e.g. 120MB or 1.5GB: hubc takes the scheme with the most bits that "
                   "fits, then a smaller dense budget, then prunes what is still over (chosen on calibration text, "
                   "healed by distillation); keeps whichever of --scheme/--dense-budget you give")
@click.option("--speedup", type=Finite(min=1, min_open=True),
              help="a decode step (time per output token, one request) this many times faster than the base's, as "
                   "the latency model predicts it from this hardware's stored measurements (`hubc bench`; on GPU "
                   "targets without any, the catalog's roofline): hubc removes MLP channels, heads and whole layers "
                   "by estimated loss per millisecond saved, heals, then serves both and reports the measured "
                   "speed-up")
@click.option("--calibration-text", "calibration_texts", metavar="wikitext2-valid|FILE", multiple=True,
              help="text hubc calibrates on (quantization, and the importance and healing of --prune/--factorize/"
                   "--speedup): a UTF-8 file of the kind of text the model will serve, never an --eval-text; repeat "
                   "it to mix texts (windows taken from each in turn). Default: wikitext-2 valid (plus text the "
                   "model samples itself, for structure)")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path, dir_okay=False),
              help="recipe YAML to apply (e.g. per-module mixed precision) instead of --scheme/--method/...")
@click.option("--out", type=click.Path(path_type=Path), help="output folder (default ./<model>-<scheme>-<target>)")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder once the new one is complete")
@click.option("--push", "push_repo", metavar="REPO_ID", help="push the variant to this Hub repo in one commit")
@click.option("--private", is_flag=True, help="create the pushed repo as private")
@click.option("--revision", help="Hub revision (branch, tag or commit) of MODEL")
@click.option("--no-serve", is_flag=True, help="skip the vLLM serving check and latency measurement")
@click.option("--max-ppl-increase", type=Finite(min=0), default=0.05, show_default=True,
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
@click.option("--stream/--no-stream", default=None,
              help="compress and evaluate one decoder layer at a time, weights read from the safetensors shards, so "
                   "memory does not grow with depth (rtn, gptq, autoround, smoothing, the dense budget; not structure "
                   "or healing). Default: when the model's bf16 weights, four times over, would take more than 75% of "
                   "the available memory, or on a GPU")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="where quantization (GPTQ, learned rounding) and the streamed evaluation compute, one decoder layer "
                   "at a time in bf16 on a GPU; auto: a CUDA GPU when torch sees one. Structure and healing run on "
                   "the host")
@click.option("--format", "fmt", type=FORMATS, default="human", help="human summary or JSON report on stdout")
def optimize(model, target, scheme, group_size, method, iterations, smoothing, dense_budget, budget_scheme, activations,
             remove_layers, prune_spec, factorize_share, heal_minutes, max_size, speedup, calibration_texts, recipe_file,
             out, overwrite, push_repo, private, revision, no_serve, max_ppl_increase, accept_quality_loss,
             eval_texts, eval_windows, seq_len, stream, device, fmt) -> None:
    """Compress MODEL (Hub repo id, local folder, .gguf file, or `demo`) for TARGET, evaluate, serve and card it."""

    def body():
        from advisor.evaluate import EvalConfig
        from hubplugin.optimize import OptimizeConfig
        from hubplugin.optimize import optimize as run
        from hubplugin.render import summary

        recipe = None
        max_bytes = None
        if max_size is not None:
            from advisor.size_budget import parse_size

            try:
                max_bytes = parse_size(max_size)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--max-size") from None
            if recipe_file is not None:
                raise click.BadParameter("a recipe file fixes the scheme and structure; --max-size chooses them",
                                         param_hint="--max-size")
        if speedup is not None and (recipe_file is not None or prune_spec):
            raise click.BadParameter("--speedup chooses what to remove; a recipe file or --prune fixes it",
                                     param_hint="--speedup")
        if recipe_file is not None:
            recipe = _read_recipe(recipe_file, scheme=scheme, group_size=group_size, method=method,
                                  iterations=iterations, smoothing=smoothing, dense_budget=dense_budget,
                                  budget_scheme=budget_scheme, activations=activations,
                                  remove_layer=remove_layers or None, prune=prune_spec, factorize=factorize_share,
                                  heal_minutes=heal_minutes, calibration_text=calibration_texts or None)
        from advisor.recommend import Choices

        config = OptimizeConfig(
            recipe=recipe,
            choices=Choices(scheme=scheme, group_size=group_size, method=method, iterations=iterations,
                            smoothing=smoothing, dense_budget=dense_budget, budget_scheme=budget_scheme,
                            activations=activations, remove_layers=tuple(remove_layers),
                            structure=structure_request(prune_spec, factorize_share), heal_minutes=heal_minutes,
                            calibration_text=calibration_texts or None),
            out=out, overwrite=overwrite, push=push_repo, private=private, serve=not no_serve, revision=revision,
            max_ppl_increase=max_ppl_increase, accept_quality_loss=accept_quality_loss,
            eval=EvalConfig(texts=tuple(eval_texts) or EvalConfig().texts, seq_len=seq_len, windows=eval_windows),
            stream=stream, device=device, max_size=max_bytes, speedup=speedup,
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


def structure_request(prune: str | None, factorize: float | None) -> dict | None:
    """--prune / --factorize → a recipe `structure` block (checked by advisor.recipe.check_structure)."""
    from advisor.recipe import check_structure

    spec: dict = {}
    if prune:
        try:
            if "=" not in prune:
                spec["params"] = float(prune)
            else:
                for part in prune.split(","):
                    key, _, value = part.partition("=")
                    key = key.strip()
                    value = value.strip()
                    spec[key] = int(value) if key == "layers" else value if key in ("allocation", "importance") \
                        else float(value)
        except ValueError:
            raise click.BadParameter(f"cannot read {prune!r}: give a share (0.2) or mlp=R,heads=R,layers=N "
                                     "(optionally allocation=global|uniform, importance=activation|magnitude)",
                                     param_hint="--prune") from None
    if factorize:
        spec["factorize"] = factorize
    if not spec:
        return None
    from advisor.errors import AdvisorError

    try:
        check_structure(spec)
    except AdvisorError as exc:
        raise click.BadParameter(str(exc), param_hint="--prune") from None
    return spec


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
        from hubplugin.gate import failed_gate

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


from hubplugin.cli_jobs import jobs, watch  # webhook mode: `hubc watch`, `hubc jobs`

for _command in (watch, jobs):
    main.add_command(_command)


if __name__ == "__main__":
    main()
