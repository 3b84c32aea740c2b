"""The `hubc` command line: parses flags, calls one verb, renders its result. No logic lives here.

Heavy libraries (torch, transformers, vLLM) are imported inside the commands, so `hubc --help` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from hubplugin import __version__

FORMATS = click.Choice(["human", "json"])


def _user_errors() -> tuple[type[BaseException], ...]:
    from advisor.errors import AdvisorError
    from hubplugin.errors import HubcError
    from serving.errors import ServingError

    return (HubcError, AdvisorError, ServingError)


def _run(fn):
    """Call a command body; typed errors become one line on stderr and exit code 2 (HUBC_DEBUG=1 re-raises)."""
    try:
        return fn()
    except _user_errors() as exc:
        if os.environ.get("HUBC_DEBUG"):
            raise
        line = exc.message if not exc.hint else f"{exc.message}; {exc.hint}"
        click.echo(f"error: {' '.join(line.split())}", err=True)
        sys.exit(2)
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
        Console().print(table)

    _run(body)


def _target_dict(t) -> dict:
    from dataclasses import asdict

    return asdict(t)


@main.command()
@click.argument("model")
@click.option("--target", "-t", required=True, help="hardware target from `hubc targets` (cpu, t4, a10g, l4, ...)")
@click.option("--scheme", help="w8a8-int8, w4a16, w8a16 or fp8 (default: the target's default)")
@click.option("--group-size", type=int, help="weights per scale for w4a16 (default: chosen per model)")
@click.option("--smoothing", type=click.Choice(["search", "none"]),
              help="activation-outlier smoothing before quantization (default: search for w8a8-int8 and fp8)")
@click.option("--out", type=click.Path(path_type=Path), help="output folder (default ./<model>-<scheme>-<target>)")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder once the new one is complete")
@click.option("--push", "push_repo", metavar="REPO_ID", help="push the variant to this Hub repo in one commit")
@click.option("--private", is_flag=True, help="create the pushed repo as private")
@click.option("--revision", help="Hub revision (branch, tag or commit) of MODEL")
@click.option("--no-serve", is_flag=True, help="skip the vLLM serving check and latency measurement")
@click.option("--eval-text", "eval_texts", multiple=True,
              help="evaluation text: wikitext2-test, licenses or a file path (repeatable; default both shipped texts)")
@click.option("--eval-windows", type=int, default=4, show_default=True, help="windows per text")
@click.option("--seq-len", type=int, default=512, show_default=True, help="tokens per evaluation window")
@click.option("--format", "fmt", type=FORMATS, default="human", help="human summary or JSON report on stdout")
def optimize(model, target, scheme, group_size, smoothing, out, overwrite, push_repo, private, revision, no_serve, eval_texts,
             eval_windows, seq_len, fmt) -> None:
    """Compress MODEL (Hub repo id, local folder, .gguf file, or `demo`) for TARGET, evaluate, serve and card it."""

    def body():
        from advisor.evaluate import EvalConfig
        from hubplugin.optimize import OptimizeConfig
        from hubplugin.optimize import optimize as run
        from hubplugin.render import summary

        config = OptimizeConfig(
            scheme=scheme, group_size=group_size, smoothing=smoothing, out=out, overwrite=overwrite, push=push_repo, private=private,
            serve=not no_serve, revision=revision,
            eval=EvalConfig(texts=tuple(eval_texts) or EvalConfig().texts, seq_len=seq_len, windows=eval_windows),
        )
        result = run(model, target, config, progress=lambda s: click.echo(f"» {s}", err=True))
        if fmt == "json":
            click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        else:
            summary(result)

    _run(body)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="create the repo as private")
@click.option("--message", default=None, help="commit message")
def push(folder, repo_id, private, message) -> None:
    """Push a checkpoint folder made by `hubc optimize` to REPO_ID on the Hub, in one commit."""

    def body():
        from hubplugin import hub

        result = hub.push_folder(folder, repo_id, private=private,
                                 commit_message=message or f"hubc: upload {folder.name}")
        click.echo(result.url)

    _run(body)


if __name__ == "__main__":
    main()
