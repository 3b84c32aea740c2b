"""Which healing settings recover the most of what pruning cost, on the text healing trains on and on another
domain: the demo model pruned by hubc's default (20% of the decoder-linear weights), then healed by distillation
for the same number of steps under each setting (learning rate, the share of self-generated text, the weight of
the distillation term, every decoder weight trained or rank-r LoRA updates merged back). Δppl against the base on
held-out windows of wikitext-2 test and licenses.txt (never trained on), before and after healing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/heal_settings.py [--steps 30] [--only REGEX] [--name NAME]

Every row goes through hubc's own pieces: advisor.structure_search.choose and advisor.compress.apply_structure
prune once (calibration: 16 windows of wikitext-2 valid and 16 the base model sampled itself, as `hubc optimize
--prune` calibrates), advisor.heal.heal heals a copy per row. Healing text: wikitext-2 valid windows of 256 tokens
and pieces of the self-generated samples, as advisor.calibrate.Calibration builds them.

Writes benchmarks/results/NAME.{json,md} (default heal_settings; one step count per file); rows accumulate (one per
setting, replaced when rerun).
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

# Row → (training windows: wikitext-2 valid windows, self-generated pieces), HealConfig fields.
SETTINGS: dict[str, tuple[tuple[int, int], dict]] = {
    "lr 1e-4": ((512, 32), {"lr": 1e-4}),
    "lr 3e-4": ((512, 32), {"lr": 3e-4}),
    "lr 1e-3": ((512, 32), {"lr": 1e-3}),
    "lr 3e-4, half self-generated": ((64, 64), {"lr": 3e-4}),
    "lr 3e-4, self-generated only": ((0, 64), {"lr": 3e-4}),
    "lr 3e-4, KL only": ((512, 32), {"lr": 3e-4, "kl_weight": 1.0}),
    "lr 3e-4, KL and cross-entropy 1:1": ((512, 32), {"lr": 3e-4, "kl_weight": 0.5}),
    "lr 3e-4, cross-entropy only": ((512, 32), {"lr": 3e-4, "kl_weight": 0.0}),
    "lr 3e-4, temperature 2": ((512, 32), {"lr": 3e-4, "temperature": 2.0}),
    "LoRA rank 16, lr 3e-4": ((512, 32), {"lr": 3e-4, "lora_rank": 16}),
    "LoRA rank 16, lr 1e-3": ((512, 32), {"lr": 1e-3, "lora_rank": 16}),
    "LoRA rank 64, lr 1e-3": ((512, 32), {"lr": 1e-3, "lora_rank": 64}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens per text")
    parser.add_argument("--only", help="regex: run only the matching settings (others kept from the last results)")
    parser.add_argument("--name", default="heal_settings", help="results file name (benchmarks/results/NAME.*)")
    args = parser.parse_args()
    out_json = RESULTS / f"{args.name}.json"
    earlier = json.loads(out_json.read_text()) if out_json.exists() else None
    if earlier and earlier["steps"] != args.steps:
        sys.exit(f"{out_json.name} holds rows of another step count: give --name for {args.steps} steps")
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    from advisor.calibrate import SAMPLE_START, SAMPLE_TOP_P, generate_windows, heal_pieces
    from advisor.compress import CompressReport, apply_structure
    from advisor.evaluate import make_windows, read_text
    from advisor.heal import HealConfig, heal
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
    samples = generate_windows(base, tokenizer, 32, 512)
    calibration = make_windows(tokenizer, read_text("wikitext2-valid")[1], 512, 16) + samples[:16]
    model = copy.deepcopy(base)
    cache: dict = {}
    actions = choose(model, structure, {"params": 0.2}, calibration, cache)
    recipe = Recipe(scheme="dense", target="cpu", actions=actions,
                    calibration={"text": "wikitext2-valid", "windows": 16, "seq_len": 512, "self_generated": 16})
    pruned, _ = apply_structure(model, resolve(recipe, structure, get_target("cpu")), CompressReport(), calibration,
                                cache)
    wiki = make_windows(tokenizer, read_text("wikitext2-valid")[1], 256, 512)
    pieces = heal_pieces(samples, 256)

    old = {r["setting"]: r for r in earlier["rows"]} if args.only and earlier else {}
    rows = []
    for name, ((n_wiki, n_self), fields) in SETTINGS.items():
        if args.only and not re.search(args.only, name):
            if name in old:
                rows.append(old[name])
            continue
        student = copy.deepcopy(pruned)
        config = HealConfig(steps=args.steps, **fields)
        t0 = time.time()
        report = heal(student, base, wiki[:n_wiki] + pieces[:n_self], config, held)
        row = {"setting": name, "wiki_windows": n_wiki, "self_generated_windows": n_self, **fields,
               "steps": report.steps, "heal_seconds": report.seconds, "kl_start": report.kl_start,
               "kl_end": report.kl_end, "held_out": report.held_out, "seconds": time.time() - t0,
               "sampler": f"{SAMPLE_START} start, top-p {SAMPLE_TOP_P}"}
        rows.append(row)
        print(f"{name:32s}" + "  ".join(f"{n} {v['before'] / v['base'] - 1:+.1%} → {v['after'] / v['base'] - 1:+.1%}"
                                          for n, v in report.held_out.items()), flush=True)
        del student
    import transformers

    record = {"model": "SmolLM2-135M-Instruct (demo)", "pruning": "hubc default, 20% of decoder-linear weights",
              "steps": args.steps, "transformers": transformers.__version__, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "rows": rows, "seconds": time.time() - started, "arguments": shlex.join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(record))
    print(f"wrote {out_json.relative_to(ROOT)} and .md ({record['seconds']:.0f} s)")


def markdown(record: dict) -> str:
    lines = ["# Healing settings on the pruned demo model", "",
             (f"SmolLM2-135M-Instruct pruned by hubc's default (20% of the decoder-linear weights), healed "
              f"{record['steps']} steps of 4 × 256 tokens per setting from the same pruned model. Δppl against the "
              "base on held-out windows (8 × 512 tokens per text, never trained on), before → after healing."),
             ("Written by `.venv/bin/python benchmarks/heal_settings.py [--only REGEX]` (rows accumulate; the last "
              f"run: `{record['arguments'] or 'all settings'}`). s/step is the row's own run's: rows from other runs "
              "ran on other sessions' machines and loads."), "",
             ("| setting | training windows (wikitext-2 valid + self-generated) | sampler | Δppl wikitext-2 test | "
              "Δppl licenses | final KL | s/step |"), "|---|---:|---|---:|---:|---:|---:|"]
    for r in record["rows"]:
        cells = [f"{v['before'] / v['base'] - 1:+.1%} → {v['after'] / v['base'] - 1:+.1%}"
                 for v in (r["held_out"]["wikitext2-test"], r["held_out"]["licenses"])]
        lines.append(f"| {r['setting']} | {r['wiki_windows']} + {r['self_generated_windows']} | "
                     f"{r.get('sampler', 'bos start, whole vocabulary')} | {cells[0]} | "
                     f"{cells[1]} | {r['kl_end']:.3f} | {r['heal_seconds'] / r['steps']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
