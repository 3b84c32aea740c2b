"""Human rendering of results (rich tables on stdout); JSON output bypasses this module."""

from __future__ import annotations

from hubplugin.card import _f, _size, speed_note


def summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or captured: keep each row on one line rather than wrap at 80 columns
        console = Console(width=140)
    table = Table(title=f"{result.source.hub_id or result.source.ref} → {result.recipe.scheme} for {result.target}")
    table.add_column("measure")
    table.add_column("engine")
    table.add_column("base", justify="right")
    table.add_column("variant", justify="right")
    table.add_column("change", justify="right")
    table.add_row("weights on disk", "—", _size(result.size_before), _size(result.size_after),
                  f"{result.size_after / result.size_before - 1:+.0%}")
    for tr in result.quality:
        measured = [(tr.base, tr.variant)]
        if tr.served_variant is not None:
            measured.append((tr.served_base, tr.served_variant))
        for base, var in measured:
            engine = f"{base.engine} ({base.dtype})"
            table.add_row(f"perplexity, {tr.text}", engine, _f(base.perplexity), _f(var.perplexity),
                          f"{var.perplexity / base.perplexity - 1:+.2%}")
            if var.kl is not None:
                table.add_row(f"KL vs base, {tr.text}", engine, "", _f(var.kl, ".4f"), "")
            if var.top1_agreement is not None:
                table.add_row(f"top-1 agreement, {tr.text}", engine, "", _f(var.top1_agreement, ".1%"), "")
    if result.latency is not None:
        lat = result.latency
        engine = f"vllm {lat.vllm_version}"
        for key, label in (("ttft_ms_p50", "TTFT p50 (ms)"), ("tpot_ms_p50", "time per token p50 (ms)"),
                           ("throughput_tok_s", "throughput (tokens/s)")):
            b, v = lat.base[key], lat.variant[key]
            table.add_row(label, engine, _f(b, ".1f"), _f(v, ".1f"), f"{v / b - 1:+.0%}" if b else "")
    console.print(table)
    if result.latency is not None:
        console.print(speed_note(result))
        console.print(f"latency measured on {result.latency.hardware}")
    elif result.not_served_reason:
        console.print(result.not_served_reason)
    if result.sample:
        console.print(f"served variant completes {result.sample['prompt']!r} with {result.sample['completion']!r}",
                      markup=False)
    for flag in result.flags:
        console.print(f"[bold yellow]warning:[/] {flag}")
    console.print(f"checkpoint: {result.out}")
    if result.push_url:
        console.print(f"pushed: {result.push_url}")
