"""What every `hubc` command shares: the output formats, and how a command ends (typed errors as one line on stderr
and exit code 2, SIGTERM and Ctrl-C unwinding like an interrupt, exit codes 143 and 130)."""

from __future__ import annotations

import math
import os
import sys

import click

from advisor.errors import HintedError

__all__ = ["FORMATS", "Finite", "Terminated", "progress", "run_command"]

FORMATS = click.Choice(["human", "json"])
"""`--format`: a human table or summary, or JSON on stdout."""


class Finite(click.FloatRange):
    """A float range that also refuses nan and ±inf: click's FloatRange lets `nan` through every bound (each
    comparison with it is false), which would turn a quality gate or a budget silently off."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job runner stopping hubc) unwinds like Ctrl-C: the `finally` blocks remove partial outputs and
    stop the vLLM servers this process started, instead of the process dying with them in place."""


def _on_sigterm(signum, frame):
    raise Terminated


def progress(message: str) -> None:
    """Progress chatter, on stderr (stdout is data)."""
    click.echo(f"» {message}", err=True)


def run_command(fn):
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
    except Terminated:
        click.echo("terminated", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
