"""Whether importance and whitening matter for structural compression of the demo model, before any healing:
Δppl on wikitext-2 test and licenses.txt of each way of removing ~20% of the decoder-linear parameters.

    .venv/bin/python benchmarks/structure_importance.py [--share 0.2] [--windows 8] [--only REGEX]

Every row goes through hubc's own path: advisor.structure_search.choose turns a request into per-unit actions, a
dense-scheme plan from advisor.plan.resolve, advisor.compress.apply_structure applies it, advisor.evaluate scores
it. Calibration is mixed text: wikitext-2 valid windows and as many windows the base model samples itself
(advisor.calibrate.generate_windows); evaluation is `--windows` × 512 tokens of each text. Statistics are measured
once on the base model and shared by every row (a copy of the cache per row: actions record what they cut in it).

Writes benchmarks/results/structure_importance.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN = 512

# Row → structure request (advisor.structure_search.choose); `{share}` is --share.
METHODS: dict[str, dict] = {
    "magnitude MLP, uniform": {"mlp": "share", "allocation": "uniform", "importance": "magnitude"},
    "Wanda-sp MLP, uniform": {"mlp": "share", "allocation": "uniform", "importance": "wanda", "refit": False},
    "activation MLP, uniform": {"mlp": "share", "allocation": "uniform", "importance": "activation"},
    "activation MLP, global": {"mlp": "share", "importance": "activation"},
    "taylor MLP, global": {"mlp": "share", "importance": "taylor"},
    "hubc default (params)": {"params": "share"},
    "params: MLP+heads+layers": {"params": "share", "mix": ["mlp", "heads", "layers"]},
    "params, taylor": {"params": "share", "importance": "taylor"},
    "layers by skip loss": {"layers": "share"},
    "plain SVD, uniform": {"factorize": "share", "whitening": False, "allocation": "uniform"},
    "whitened SVD, uniform": {"factorize": "share", "allocation": "uniform"},
    "plain SVD, ranks by plain spectrum": {"factorize": "share", "whitening": False},
    "whitened SVD (hubc default)": {"factorize": "share"},
}


def request(spec: dict, share: float, structure) -> dict:
    """The method's request at `share` of the decoder-linear parameters: an MLP share removes share × 4/3 of the
    MLP channels when the MLP holds 3/4 of them (computed from the model), layers are counted."""
    linears = {li.name: li.in_features * li.out_features for li in structure.linears}
    mlp = sum(v for n, v in linears.items() if ".mlp." in n) / sum(linears.values())
    out = {}
    for key, value in spec.items():
        if value != "share":
            out[key] = value
        elif key == "mlp":
            out[key] = share / mlp
        elif key == "layers":
            out[key] = round(share * len(structure.layers))
        else:
            out[key] = share
    return out


def measure_once(model, structure, windows) -> dict:
    """Every statistic a row reads, in one pass (with gradients, for the Taylor rows) and the skip losses."""
    from advisor.importance import SKIP_WINDOWS, measure, skip_losses, spread

    decoder = [li.name for li in structure.linears if any(li.name.startswith(la.name + ".") for la in structure.layers)]
    taylor = [n for n in decoder if n.endswith(("mlp.down_proj", "self_attn.o_proj"))]
    heads = {n: la.head_dim for la in structure.layers for n in taylor if n.startswith(la.name + ".")}
    cache: dict = {}
    t0 = time.time()
    relative = [n for n in decoder if n.endswith(("mlp.down_proj", "self_attn.o_proj"))]
    measure(model, windows, cache, sumsq=decoder, covariance=decoder, taylor=taylor, heads=heads, layers=True,
            relative=relative)
    skip_losses(model, spread(windows, SKIP_WINDOWS), cache)
    print(f"statistics measured in {time.time() - t0:.0f} s", flush=True)
    return cache


def removed_share(before, after) -> float:
    def size(structure):
        return sum(li.in_features * li.out_features for li in structure.linears
                   if any(li.name.startswith(la.name + ".") for la in structure.layers))
    return 1 - size(after) / size(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens per text")
    parser.add_argument("--calibration", type=int, default=8, help="windows of wikitext-2 valid, and as many sampled")
    parser.add_argument("--only", help="regex: run only the matching rows (others kept from the last results)")
    args = parser.parse_args()
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    from advisor.calibrate import generate_windows
    from advisor.compress import CompressReport, apply_structure
    from advisor.evaluate import make_windows, perplexity, read_text, score
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
    texts = {name: make_windows(tokenizer, read_text(name)[1], SEQ_LEN, args.windows)
             for name in ("wikitext2-test", "licenses")}
    calibration = make_windows(tokenizer, read_text("wikitext2-valid")[1], SEQ_LEN, args.calibration)
    calibration += generate_windows(base, tokenizer, args.calibration, SEQ_LEN)

    def ppl(model) -> dict[str, float]:
        return {name: perplexity(score(model, w, name)[0]) for name, w in texts.items()}

    base_ppl = ppl(base)
    target = get_target("cpu")
    cache = measure_once(base, structure, calibration)
    out_json = RESULTS / "structure_importance.json"
    old = {r["method"]: r for r in json.loads(out_json.read_text())["rows"]} if args.only and out_json.exists() else {}
    rows = []
    for method, spec in METHODS.items():
        if args.only and not re.search(args.only, method):
            if method in old:
                rows.append(old[method])
            continue
        t0 = time.time()
        model = copy.deepcopy(base)
        req = request(spec, args.share, structure)
        actions = choose(model, structure, req, calibration, cache)
        recipe = Recipe(scheme="dense", target=target.name, actions=actions,
                        calibration={"text": "wikitext2-valid", "windows": args.calibration, "seq_len": SEQ_LEN,
                                     "self_generated": args.calibration})
        plan = resolve(recipe, structure, target)
        shared = {k: dict(v) for k, v in cache.items()}
        model, plan = apply_structure(model, plan, CompressReport(), calibration, shared)
        result = ppl(model)
        row = {"method": method, "request": req, "params_removed": removed_share(structure, plan.structure),
               **{f"ppl_{n}": p for n, p in result.items()},
               **{f"delta_{n}": result[n] / base_ppl[n] - 1 for n in texts}, "seconds": time.time() - t0,
               "actions": actions}
        rows.append(row)
        print(f"{method:28s} removed {row['params_removed']:.1%}  wikitext2-test {row['delta_wikitext2-test']:+.1%}"
              f"  licenses {row['delta_licenses']:+.1%}  ({row['seconds']:.0f} s)", flush=True)
        del model
    import transformers

    record = {
        "model": "SmolLM2-135M-Instruct (demo)", "dtype": "float32", "engine": "transformers",
        "engine_version": transformers.__version__, "torch": torch.__version__, "cpu": platform.processor() or
        platform.machine(), "threads": torch.get_num_threads(), "share": args.share,
        "evaluation": {n: {"windows": len(w), "tokens": sum(len(x) - 1 for x in w)} for n, w in texts.items()},
        "calibration": {"wikitext2-valid windows": args.calibration, "self-generated windows": args.calibration,
                        "seq_len": SEQ_LEN},
        "base_ppl": base_ppl, "rows": rows, "seconds": time.time() - started,
        "arguments": " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "structure_importance.md").write_text(markdown(record))
    print(f"wrote {out_json.relative_to(ROOT)} and .md ({record['seconds']:.0f} s)")


def markdown(record: dict) -> str:
    ev = record["evaluation"]
    lines = [
        "# Structural compression of the demo model before healing: importance and whitening",
        "",
        (f"SmolLM2-135M-Instruct, float32, transformers {record['engine_version']}; Δppl against the base "
        f"(wikitext-2 test {record['base_ppl']['wikitext2-test']:.2f}, licenses.txt "
        f"{record['base_ppl']['licenses']:.2f}) on {ev['wikitext2-test']['windows']} windows × {SEQ_LEN} tokens of "
        f"each text. Calibration: {record['calibration']['wikitext2-valid windows']} windows of wikitext-2 valid and "
        f"{record['calibration']['self-generated windows']} the base model sampled itself. No healing."),
        (f"Written by `.venv/bin/python benchmarks/structure_importance.py {record.get('arguments', '')}`"
         f" on {record.get('cpu', 'an unrecorded CPU')}."),
        "",
        "| method | request | params removed | Δppl wikitext-2 test | Δppl licenses |",
        "|---|---|---:|---:|---:|",
    ]
    for r in record["rows"]:
        req = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["request"].items())
        lines.append(f"| {r['method']} | {req} | {r['params_removed']:.1%} | {r['delta_wikitext2-test']:+.1%} | "
                     f"{r['delta_licenses']:+.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
