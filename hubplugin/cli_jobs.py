"""The `hubc watch` and `hubc jobs` commands: run the webhook endpoint, and list, retry or cancel the jobs it queued.
They parse flags, call hubplugin.watch, and render; registered on the `hubc` group by hubplugin.cli."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from hubplugin.cli_common import FORMATS, progress, run_command

__all__ = ["jobs", "watch"]

_CONFIG = click.Path(path_type=Path, dir_okay=False)


@click.command()
@click.option("--config", "config_file", type=_CONFIG, required=True,
              help="watch.yaml: repos or owners to watch, targets, variant naming, retries, runner")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0: every interface)")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True,
              help="port to listen on (0: any free port, printed at start)")
@click.option("--no-run", is_flag=True,
              help="record deliveries and queue jobs without running them (a later `hubc watch` runs them)")
def watch(config_file, host, port, no_run) -> None:
    """Run the endpoint for Hub webhooks (POST /webhook): each new commit of a watched model repo gets one
    variant per target in watch.yaml, built and pushed like `hubc optimize --push`."""

    def body():
        from hubplugin.watch.config import load_config
        from hubplugin.watch.service import serve

        config = load_config(config_file)
        serve(config, host=host, port=port, run_jobs=not no_run, say=progress)

    run_command(body)


def _queue(config_file: Path | None, must_exist: bool):
    from hubplugin.watch.config import default_queue_path, load_config
    from hubplugin.watch.errors import JobStateError
    from hubplugin.watch.queue import JobQueue

    path = load_config(config_file).queue_path() if config_file else default_queue_path()
    if not path.exists():
        if must_exist:
            raise JobStateError(f"no job queue at {path}", hint="start `hubc watch --config watch.yaml` first")
        return None
    return JobQueue(path)


def _outcome(job, now: float) -> str:
    """The last column of `hubc jobs`: the variant, what the job is doing, or why it is not done."""
    if job.state == "done":
        return job.variant_url + (" (already pushed; not pushed again)" if job.reused else "")
    if job.state == "running":
        return job.stage or "running"
    if job.state == "queued" and job.error:
        wait = max(0, round(job.next_at - now))
        return f"retry {'in ' + str(wait) + ' s' if wait else 'now'}: {job.error}"
    return job.error or ""


@click.group(invoke_without_command=True)
@click.option("--config", "config_file", type=_CONFIG,
              help="watch.yaml, for its `queue:` (default queue: $HUBC_CACHE/watch/jobs.sqlite)")
@click.option("--format", "fmt", type=FORMATS, default="human", help="human table or JSON on stdout")
@click.pass_context
def jobs(ctx, config_file, fmt) -> None:
    """List the jobs `hubc watch` queued: state, repo@sha, target, attempts, variant URL or error."""
    ctx.obj = config_file
    if ctx.invoked_subcommand is not None:
        return

    def body():
        queue = _queue(config_file, must_exist=False)
        found = queue.jobs() if queue else []
        if fmt == "json":
            click.echo(json.dumps([j.to_dict() for j in found], indent=2, default=str))
            return
        if not found:
            click.echo("no jobs", err=True)
            return
        now = time.time()
        rows = [("ID", "STATE", "REPO@SHA", "TARGET", "ATTEMPTS", "VARIANT / ERROR")]
        rows += [(str(j.id), j.state, f"{j.repo}@{j.sha[:12]}", j.target, f"{j.attempts}/{j.max_attempts}",
                  _outcome(j, now)) for j in found]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for row in rows:
            click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[5])

    run_command(body)


@jobs.command()
@click.argument("job_id", type=int)
@click.pass_obj
def retry(config_file, job_id) -> None:
    """Queue a failed, cancelled or superseded job again (its attempts start over)."""

    def body():
        job = _queue(config_file, must_exist=True).retry(job_id)
        click.echo(f"job {job.id} queued again: {job.repo}@{job.sha[:12]} for {job.target}")

    run_command(body)


@jobs.command()
@click.argument("job_id", type=int)
@click.pass_obj
def cancel(config_file, job_id) -> None:
    """Cancel a queued or running job (a running one is stopped by its worker)."""

    def body():
        job = _queue(config_file, must_exist=True).cancel(job_id)
        click.echo(f"job {job.id} cancelled: {job.repo}@{job.sha[:12]} for {job.target}")

    run_command(body)
