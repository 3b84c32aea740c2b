"""Human rendering of results (rich tables on stdout); JSON output bypasses this module."""

from __future__ import annotations

from hubplugin.card import budget_text, speed_note
from hubplugin.formatting import number, size


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
    table.add_row(f"weights on disk ({result.checkpoint_dtype})", "—", size(result.size_before),
                  size(result.size_after), f"{result.size_after / result.size_before - 1:+.0%}")
    if result.size_original:
        table.add_row("weights on disk (base as given)", "—", size(result.size_original), size(result.size_after),
                      f"{result.size_after / result.size_original - 1:+.0%}")
    for tr in result.quality:
        measured = [(tr.base, tr.variant)]
        if tr.served_variant is not None:
            measured.append((tr.served_base, tr.served_variant))
        for base, var in measured:
            engine = f"{base.engine} ({base.dtype})"
            table.add_row(f"perplexity, {tr.text}", engine, number(base.perplexity), number(var.perplexity),
                          f"{var.perplexity / base.perplexity - 1:+.2%}")
            if var.kl is not None:
                table.add_row(f"KL vs base, {tr.text}", engine, "", number(var.kl, ".4f"), "")
            if var.top1_agreement is not None:
                table.add_row(f"top-1 agreement, {tr.text}", engine, "", number(var.top1_agreement, ".1%"), "")
    if result.latency is not None:
        lat = result.latency
        engine = f"vllm {lat.vllm_version}"
        for key, label in (("ttft_ms_p50", "TTFT p50 (ms)"), ("tpot_ms_p50", "time per token p50 (ms)"),
                           ("throughput_tok_s", "throughput (tokens/s)")):
            b, v = lat.base[key], lat.variant[key]
            table.add_row(label, engine, number(b, ".1f"), number(v, ".1f"), f"{v / b - 1:+.0%}" if b else "")
    console.print(table)
    budget = budget_text(result)
    if budget:
        console.print(budget, markup=False)
    if getattr(result, "path_reason", ""):
        console.print(f"compressed and evaluated {result.path_reason}", markup=False)
    from hubplugin.card_structure import heal_rows, heal_text, structure_lines

    for line in structure_lines(result):
        console.print(line, markup=False)
    if heal_text(result):
        console.print(heal_text(result), markup=False)
        for row in heal_rows(result):
            console.print(f"  {row['text']}: base {row['base']}, before healing {row['before']} ({row['before_delta']}),"
                          f" after {row['after']} ({row['after_delta']})", markup=False)
    kept = (result.transforms or {}).get("kept_dense")
    if kept:
        console.print(f"kept {result.recipe.budget_kept} ({result.recipe.dense_budget:.1%} weight budget, most costly to quantize first): "
                      + ", ".join(kept), markup=False)
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
    if result.gate and result.gate["passed"]:
        w = result.gate["worst"]
        console.print(f"quality gate passed: at most {result.gate['threshold']:+.0%} perplexity over the base "
                      f"(largest {w['increase']:+.2%}, {w['text']}, {w['engine']})")
    console.print(f"checkpoint: {result.out}")
    if result.push_url:
        console.print(f"pushed: {result.push_url}")


def table_console():
    """A console for tables: as wide as the terminal, or 160 columns when piped (one line per row)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)  # piped: one line per row


def bench_table(report, store_path) -> None:
    """`hubc bench`: one row per checkpoint (base first), then the settings, the store and any notes."""
    from rich.table import Table

    base = report.base
    table = Table(title=f"vllm bench serve, {report.traffic}: {report.rounds} interleaved rounds")
    for col in ("checkpoint", "TTFT p50", "TTFT p95", "TPOT p50", "TPOT p95", "ITL p50", "ITL p95",
                "tok/s p50/p95", "req/s p50/p95", "peak mem", "TPOT vs base", "TPOT spread"):
        # A long checkpoint name folds onto a second line rather than losing its end (the scheme and target).
        table.add_column(col, justify="left" if col == "checkpoint" else "right",
                         overflow="fold" if col == "checkpoint" else "ellipsis")
    for r in report.results:
        s = r.summary
        vs = "" if base is None or r is base else f"{s['tpot_ms_p50'] / base.summary['tpot_ms_p50'] - 1:+.0%}"
        table.add_row(
            r.checkpoint.label + (" (base)" if r.role == "base" else ""),
            *(f"{s[k]:.1f} ms" for k in ("ttft_ms_p50", "ttft_ms_p95", "tpot_ms_p50", "tpot_ms_p95",
                                         "itl_ms_p50", "itl_ms_p95")),
            f"{s['output_throughput_tok_s_p50']:.1f} / {s['output_throughput_tok_s_p95']:.1f}",
            f"{s['request_throughput_rps_p50']:.2f} / {s['request_throughput_rps_p95']:.2f}",
            f"{s['peak_memory_mib'] / 1024:.2f} GiB", vs, f"{r.spread:.1%}" if len(r.rounds) > 1 else "—",
        )
    console = table_console()
    console.print(table)
    console.print(f"TTFT, TPOT, ITL: vLLM's percentiles over the requests of a run, median of the rounds; output "
                  f"tokens/s and requests/s: p50 and p95 across the {report.rounds} rounds (p95: the rate 95% of "
                  f"rounds reached); peak memory: the largest of the rounds", highlight=False)
    server, bench_settings = report.settings["server"], report.settings["benchmark"]
    console.print(f"vLLM {report.vllm_version} on {report.hardware}; {server['dtype']}, eager, prefix caching off, "
                  f"{bench_settings['num_prompts']} prompts per run ({bench_settings['warmups']} warm-up), "
                  f"layout {bench_settings['layout']}; stored in {store_path}; logs in {report.log_dir}",
                  highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)


def pick_table(result, store_path) -> None:
    """`hubc pick`: the candidates in rank order, the settings, the plot and the choice with its reason."""
    from rich.table import Table

    pct = result.slo.tpot_percentile
    table = Table(title=f"hubc pick: {result.traffic}, served perplexity on {result.quality_text}")
    for col in ("rank", "checkpoint", f"TPOT p{pct}", "TPOT spread", "TTFT p50", "tok/s p50/p95", "perplexity",
                "vs base", "size", "meets SLO", "Pareto", "measured"):
        table.add_column(col, justify="left" if col in ("checkpoint", "measured") else "right")
    for c in result.candidates:
        tok_s_p95 = "—" if c.throughput_tok_s_p95 is None else f"{c.throughput_tok_s_p95:.1f}"  # an older record
        table.add_row(
            str(c.rank or "—"), c.label + (" (base)" if c.role == "base" else ""), f"{c.tpot(pct):.1f} ms",
            "unknown" if c.tpot_spread is None else f"{c.tpot_spread:.1%}",  # one round: not measured
            f"{c.ttft_ms_p50:.1f} ms", f"{c.throughput_tok_s:.1f} / {tok_s_p95}",
            f"{c.perplexity:.3f}" if c.perplexity is not None else "—",
            f"{c.ppl_increase:+.2%}" if c.ppl_increase is not None else "—",
            f"{c.checkpoint.size_bytes / 1e6:.0f} MB", "yes" if c.meets_slo else "no", "yes" if c.pareto else "",
            ", ".join(c.measured_now) + " now" if c.measured_now else "stored",
        )
    console = table_console()
    console.print(table)
    console.print(f"vLLM {result.vllm_version} on {result.hardware}, {result.dtype}; results store {store_path}",
                  highlight=False)
    if result.plot is not None:
        console.print(f"Pareto plot: {result.plot}", highlight=False)
    console.print(("best: " if result.choice else "no choice: ") + result.reason, highlight=False)


def targets_table(catalog, variants) -> None:
    """`hubc targets`: one row per target with the schemes vLLM serves there, then the CPU variants to build for."""
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
    from rich.console import Console

    console = Console()
    console.print(table)
    names = ", ".join(f"cpu-{v.isa} ({', '.join(v.schemes)})" for v in variants)
    console.print(f"To build for a CPU other than this one, name its variant: {names}.")


def predict_table(predictions, model) -> None:
    """`hubc predict`: one row per checkpoint, measured next to predicted where the store has it, then what the
    predictions rest on."""
    from rich.table import Table

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
    console = table_console()
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
        console.print(f"predictions (not measurements) from {fitted.measurements} stored `vllm bench serve` measurements on "
                      f"{'; '.join(fitted.hardware)}: {loo}", highlight=False, soft_wrap=True)  # fmt: skip
    if any(p.basis == "roofline" for p in predictions):
        t = model.target
        console.print(f"roofline only: a lower bound from the catalog ({t.memory_bandwidth_gbs:g} GB/s, peak "
                      f"{', '.join(f'{k} {v:g}' for k, v in t.peak_tflops.items())} TFLOPS); no measurements of "
                      "those formats on this GPU", highlight=False)  # fmt: skip
    console.print("measured: the latest stored run of that checkpoint at this traffic; held-out prediction: the "
                  "model fitted without that run", highlight=False)
