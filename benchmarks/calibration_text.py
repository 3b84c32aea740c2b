"""Structure calibrated on the user's own kind of text (`--calibration-text`): the demo model pruned by hubc's
default at 20% of its decoder-linear weights and healed, once calibrated on the default (wikitext-2 valid plus text
the model samples itself), once on the first four licenses of licenses.txt (plus the same self-sampled text) and
once on both texts in turn (`--calibration-text` repeated; healing takes as many windows of each), all
evaluated on the rest of licenses.txt (held out: other licenses than the calibration part's) and on
wikitext-2 test, in transformers and as vLLM serves them.

    flock /tmp/vllm.lock .venv/bin/python benchmarks/calibration_text.py [--heal-minutes 15] [--only default,licenses-a]

Writes benchmarks/results/calibration_text.{json,md} (rows of earlier runs kept unless re-run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.structure_table import cpu_name, pct, run_one

RESULTS = ROOT / "benchmarks" / "results"
ROWS = ("default", "licenses-a", "mixed")


def halves(work: Path) -> tuple[Path, Path]:
    """licenses.txt cut where the GPL-3 begins: Apache-2.0, Artistic, CC0-1.0 and GFDL-1.3 (38% of the text, about
    10k tokens) calibrate; GPL-3, LGPL-2.1 and MPL-2.0 are held out, so no license is on both sides."""
    from advisor.evaluate import read_text

    text = read_text("licenses")[1]
    at = text.index("GNU GENERAL PUBLIC LICENSE")
    cut = text.rindex("\n", 0, at) + 1
    first, second = work / "licenses-a.txt", work / "licenses-b.txt"
    first.write_text(text[:cut], encoding="utf-8")
    second.write_text(text[cut:], encoding="utf-8")
    return first, second


def render(rows: dict, meta: dict) -> str:
    out = ["# Calibrating structure on the user's kind of text", "",
           (f"SmolLM2-135M-Instruct, `hubc optimize demo --target cpu --scheme dense --prune 0.2` (hubc's default "
            f"choice of MLP channels and heads), healed {meta['heal_minutes']:g} min, on {meta['cpu']}. licenses.txt is "
            "cut where the GPL-3 begins: Apache-2.0, Artistic, CC0-1.0 and GFDL-1.3 (licenses-a) calibrate one row; "
            "GPL-3, LGPL-2.1 and MPL-2.0 (licenses-b, other licenses) are held out for both. Δppl against the base: before → after healing on "
            "the healing report's held-out windows (8 × 512 tokens, transformers), and of the exported checkpoint "
            "as evaluated (16 × 512 tokens, transformers float32) and as served (vLLM, teacher-forced)."), "",
           ("| calibration text | linear params removed | heal (steps, min) | Δppl licenses-b before → after heal | "
            "evaluated | served | Δppl wikitext-2 test before → after heal | evaluated | served |"),
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in ROWS:
        r = rows.get(key)
        if not r:
            continue
        if r.get("failed"):
            out.append(f"| {key} | failed: {r['failed']} | | | | | | | |")
            continue
        h = r["heal"]
        cells = []
        for text in ("licenses-b.txt", "wikitext2-test"):
            q = r["quality"].get(text, {})
            cells += [f"{pct(q.get('delta_before_heal'))} → {pct(q.get('delta_after_heal'))}",
                      pct(q.get("delta_evaluated")), pct(q.get("delta_served"))]
        label = {"default": "wikitext-2 valid (default)", "licenses-a": "licenses-a",
                 "mixed": "wikitext-2 valid + licenses-a, in turn"}[key]
        out.append(f"| {label} + self-sampled | {r['linear_removed']:.1%} | {h['steps']}, {h['seconds'] / 60:.1f} | "
                   + " | ".join(cells) + " |")
    out += ["", (f"Commands (in the JSON): `{next(iter(rows.values()))['command']}` and the same with "
                 f"`--calibration-text licenses-a.txt` (and `--calibration-text wikitext2-valid` before it). Written {meta['date']} at hubc {meta['commit']} by "
                 "`flock /tmp/vllm.lock .venv/bin/python benchmarks/calibration_text.py`.")]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated rows ({', '.join(ROWS)})")
    parser.add_argument("--heal-minutes", type=float, default=15.0)
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args()
    wanted = args.only.split(",") if args.only else list(ROWS)
    stored = RESULTS / "calibration_text.json"
    data = json.loads(stored.read_text()) if stored.exists() else {"rows": {}, "meta": {}}
    with tempfile.TemporaryDirectory(prefix="hubc-calibration-text-") as tmp:
        work = Path(tmp)
        first, second = halves(work)
        for key in wanted:
            extra = ["--eval-text", str(second), "--eval-text", "wikitext2-test"]
            if key == "licenses-a":
                extra += ["--calibration-text", str(first)]
            elif key == "mixed":
                extra += ["--calibration-text", "wikitext2-valid", "--calibration-text", str(first)]
            print(f"» {key}", file=sys.stderr)
            data["rows"][key] = run_one("params-20", work, args.heal_minutes, args.eval_windows, extra=extra)
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False,
                                    capture_output=True, text=True).stdout.strip()
            data["meta"] = {"cpu": cpu_name(), "heal_minutes": args.heal_minutes, "commit": commit,
                            "date": datetime.date.today().isoformat()}
            RESULTS.mkdir(exist_ok=True)
            stored.write_text(json.dumps(data, indent=2))
            (RESULTS / "calibration_text.md").write_text(render(data["rows"], data["meta"]))


if __name__ == "__main__":
    main()
