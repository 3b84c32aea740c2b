"""Which calibration text structure should be chosen on: the demo model pruned by hubc's default (20% of the
decoder-linear weights) with importance measured, and down/o refitted, on each mix of wikitext-2 valid and text the
base model samples itself; Δppl against the base on held-out windows of wikitext-2 test and licenses.txt (another
domain, never calibrated on), before healing and, with --heal-steps, after that many steps of it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/structure_calibration.py [--heal-steps 30] [--only REGEX]

Every row goes through hubc's own pieces: advisor.calibrate.generate_windows samples, advisor.structure_search.choose
and advisor.compress.apply_structure prune, advisor.heal.heal heals on wikitext-2 valid windows of 256 tokens and
pieces of the row's samples, as advisor.calibrate.Calibration builds them.

Writes benchmarks/results/structure_calibration.{json,md}; rows accumulate (replaced when rerun).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

# Row → (wikitext-2 valid windows, sampled windows, sampler, structure request extras).
ROWS: dict[str, tuple[int, int, str, dict]] = {
    "wikitext-2 valid only": (32, 0, "default", {}),
    "wikitext-2 + sampled from BOS, full vocabulary": (16, 16, "bos", {}),
    "wikitext-2 + sampled (hubc default)": (16, 16, "default", {}),
    "wikitext-2 + sampled, no refit": (16, 16, "default", {"refit": False}),
    "8 wikitext-2 + 24 sampled": (8, 24, "default", {}),
    "sampled only": (0, 32, "default", {}),
    "wikitext-2 + 3x sampled": (16, 48, "default", {}),
    "wikitext-2 + sampled at temperature 0.7": (16, 16, "cool", {}),
}
SAMPLERS = {"default": {}, "bos": {"start": "bos", "top_p": 1.0}, "cool": {"temperature": 0.7}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heal-steps", type=int, default=0, help="heal each row this many steps (0: before only)")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens per text")
    parser.add_argument("--only", help="regex: run only the matching rows (others kept from the last results)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from advisor.calibrate import generate_windows, heal_pieces
    from advisor.compress import CompressReport, apply_structure
    from advisor.evaluate import make_windows, read_text
    from advisor.heal import HealConfig, heal, perplexities
    from advisor.model import load_model, structure_of
    from advisor.plan import resolve
    from advisor.recipe import Recipe
    from advisor.structure_search import choose
    from advisor.targets import get_target
    from hubplugin.source import resolve as resolve_source

    started = time.time()
    path = resolve_source("demo").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = load_model(path)
    structure = structure_of(base)
    held = {n: make_windows(tokenizer, read_text(n)[1], 512, args.windows) for n in ("wikitext2-test", "licenses")}
    base_ppl = perplexities(base, held)
    valid = read_text("wikitext2-valid")[1]
    wiki = make_windows(tokenizer, valid, 512, 32)
    heal_text = make_windows(tokenizer, valid, 256, 512)
    out_json = RESULTS / "structure_calibration.json"
    old = {r["row"]: r for r in json.loads(out_json.read_text())["rows"]} if args.only and out_json.exists() else {}
    todo = [name for name in ROWS if not args.only or re.search(args.only, name)]
    samples: dict[str, list] = {}
    for sampler in dict.fromkeys(ROWS[n][2] for n in todo):
        count = max(ROWS[n][1] for n in todo if ROWS[n][2] == sampler)
        t0 = time.time()
        samples[sampler] = generate_windows(base, tokenizer, count, 512, **SAMPLERS[sampler]) if count else []
        print(f"sampled {count} windows ({sampler}) in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for name, (n_wiki, n_sampled, sampler, extra) in ROWS.items():
        if name not in todo:
            if name in old:
                rows.append(old[name])
            continue
        t0 = time.time()
        own = samples[sampler][:n_sampled]
        calibration = wiki[:n_wiki] + own
        model, cache = copy.deepcopy(base), {}
        actions = choose(model, structure, {"params": 0.2, **extra}, calibration, cache)
        recipe = Recipe(scheme="dense", target="cpu", actions=actions,
                        calibration={"text": "wikitext2-valid", "windows": n_wiki or 1, "seq_len": 512})
        pruned, _ = apply_structure(model, resolve(recipe, structure, get_target("cpu")), CompressReport(),
                                    calibration, cache)
        row = {"row": name, "wiki_windows": n_wiki, "sampled_windows": n_sampled, "sampler": sampler, **extra,
               "before": perplexities(pruned, held)}
        if args.heal_steps:
            report = heal(pruned, base, heal_text + heal_pieces(own, 256)[:32], HealConfig(steps=args.heal_steps),
                          held)
            row["after"] = {n: v["after"] for n, v in report.held_out.items()}
            row["heal_steps"] = report.steps
        row["seconds"] = round(time.time() - t0)
        rows.append(row)
        print(f"{name:48s}" + "  ".join(
            f"{n} {row['before'][n] / base_ppl[n] - 1:+.1%}"
            + (f" → {row['after'][n] / base_ppl[n] - 1:+.1%}" if "after" in row else "") for n in held), flush=True)
        del model, pruned
    import transformers

    record = {"model": "SmolLM2-135M-Instruct (demo)", "base": base_ppl, "windows": args.windows,
              "transformers": transformers.__version__, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "rows": rows,
              "seconds": round(time.time() - started), "arguments": shlex.join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "structure_calibration.md").write_text(markdown(record))
    print(f"wrote {out_json.relative_to(ROOT)} and .md ({record['seconds']} s)")


def markdown(record: dict) -> str:
    base = record["base"]
    lines = ["# Calibration text for structure on the demo model", "",
             ("SmolLM2-135M-Instruct, hubc's default pruning (`--prune 0.2`: 20% of the decoder-linear weights, MLP "
              "channels and heads), importance and refit measured on each calibration mix (windows of 512 tokens). "
              f"Δppl against the base (wikitext-2 test {base['wikitext2-test']:.2f}, licenses.txt "
              f"{base['licenses']:.2f}) on {record['windows']} held-out windows × 512 tokens of each text, before "
              "healing → after the row's healing steps (4 × 256 tokens each, lr 3e-4; training text: 512 windows of "
              "wikitext-2 valid and 32 pieces of the row's samples). Sampled text is the base model's own "
              "(advisor.calibrate.generate_windows; `default`: BOS, a random first token, top-p 0.95; `bos`: BOS "
              "alone, the whole vocabulary; `cool`: as `default` at temperature 0.7)."),
             ("Written by `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/structure_calibration.py [--heal-steps N] "
              f"[--only REGEX]` (rows accumulate; the last run: `{record['arguments'] or 'all rows'}`)."), "",
             "| calibration | wikitext-2 valid + sampled | sampler | Δppl wikitext-2 test | Δppl licenses |",
             "|---|---:|---|---:|---:|"]
    for r in record["rows"]:
        cells = []
        for n in ("wikitext2-test", "licenses"):
            cell = f"{r['before'][n] / base[n] - 1:+.1%}"
            if "after" in r:
                cell += f" → {r['after'][n] / base[n] - 1:+.1%} ({r['heal_steps']} steps)"
            cells.append(cell)
        lines.append(f"| {r['row']} | {r['wiki_windows']} + {r['sampled_windows']} | {r['sampler']} | {cells[0]} | "
                     f"{cells[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
