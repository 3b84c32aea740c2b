"""Big models, streamed: peak memory and time per layer of `hubc optimize --stream` on Llama-shaped models with
random weights, built on the fly as sharded safetensors (nothing downloaded).

Rows are SHAPE:LAYERS (default 1b:2 and 1b:22; 7b:2 times the Llama-2-7B shape on two layers, extrapolated to its
32). Each runs `hubc optimize` as a user would (W4A16 GPTQ, or with --scheme w8a8-int8 the cpu default's smoothing
and round to nearest; --no-serve, evaluation on a few windows of wikitext-2
test) in a subprocess whose process tree's resident memory is sampled from /proc every 0.2 s. The acceptance of
issue 21: peak RSS at 22 layers ≤ 1.3 × that at 2 layers, time per layer within ±15%, the 7B shape under 12 GB.

    .venv/bin/python benchmarks/big_models.py                  # 1b:2 and 1b:22
    .venv/bin/python benchmarks/big_models.py --rows 7b:2      # added to the same results files
    .venv/bin/python benchmarks/big_models.py --rows 7b:32 --device cuda   # on a GPU machine: the whole 7B shape

Writes benchmarks/results/big_models.{json,md} (rows of earlier runs kept unless re-run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {
    # TinyLlama-1.1B's shape (the "1B"), and Llama-2-7B's.
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32},
}
FULL_DEPTH = {"1b": 22, "7b": 32}
VOCAB = 32000
SHARD_BYTES = 2 * 1024**3


def build(folder: Path, shape: str, layers: int, seed: int = 0) -> Path:
    """A LlamaForCausalLM folder of `shape` with `layers` decoder layers: config, a word-level tokenizer (the tests'
    one, 32000 entries) and random bf16 weights (std 0.02, norms 1) in shards of at most 2 GB with an index, written
    one tensor at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path[:0] = [str(ROOT)]
    sys.path.append(str(ROOT / "tests"))
    from helpers import tiny_tokenizer

    if (folder / "model.safetensors.index.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=4096, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3, tie_word_embeddings=False, **SHAPES[shape])
    config.save_pretrained(folder)
    tiny_tokenizer(VOCAB).save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    shards, buffer, size = [], {}, 0

    def flush():
        nonlocal buffer, size
        name = f".part-{len(shards)}.safetensors"
        save_file(buffer, str(folder / name), metadata={"format": "pt"})
        shards.append((name, list(buffer)))
        buffer, size = {}, 0

    for name, s in shapes.items():
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=generator) * 0.02
        t = t.to(torch.bfloat16)
        if buffer and size + t.numel() * 2 > SHARD_BYTES:
            flush()
        buffer[name] = t
        size += t.numel() * 2
    flush()
    weight_map, total = {}, 0
    for i, (name, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / name).rename(folder / final)
        total += (folder / final).stat().st_size
        weight_map.update(dict.fromkeys(names, final))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants now."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


# --scheme → (target, the recipe's scheme lines): W4A16 GPTQ for a GPU target, or the CPU default's W8A8-int8 with
# smoothing searched layer by layer (round to nearest: the smoothing's memory and time, not GPTQ's).
SCHEMES = {
    "w4a16": ("a10g", "scheme: w4a16\ntarget: a10g\nmethod: gptq\nsmoothing: none\nbudget_scheme: w8a16\n"),
    "w8a8-int8": ("cpu", "scheme: w8a8-int8\ntarget: cpu\nmethod: rtn\nsmoothing: search\n"),
}


def run(folder: Path, out: Path, calib_windows: int, eval_windows: int, stream: bool, dense_budget: float = 0.0,
        scheme: str = "w4a16", device: str = "cpu") -> dict:
    """`hubc optimize` on the folder, its process tree's peak RSS sampled; returns the measurements. A
    `dense_budget` keeps that share of the weights at W8A16 (the GPU targets' default is 0.3) or dense (W8A8)."""
    target, lines = SCHEMES[scheme]
    recipe = out.parent / f"{out.name}.recipe.yaml"
    recipe.write_text(
        f"{lines}dense_budget: {dense_budget}\n"
        f"calibration: {{text: wikitext2-valid, windows: {calib_windows}, seq_len: 512}}\n")
    shutil.rmtree(out, ignore_errors=True)
    command = [str(ROOT / ".venv" / "bin" / "hubc"), "optimize", str(folder), "--target", target, "--recipe",
               str(recipe), "--no-serve", "--eval-text", "wikitext2-test", "--eval-windows", str(eval_windows),
               "--seq-len", "512", "--stream" if stream else "--no-stream", "--device", device, "--format", "json",
               "--out", str(out)]
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"hubc optimize failed ({proc.returncode}): {stderr[-2000:]}")
    report = json.loads(stdout)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    per_layer = report["layer_seconds"].get("quantization") or []
    eval_layers = report["layer_seconds"].get("evaluation") or []
    timings = report["timings"]
    quality = report["quality"][0]
    return {
        "command": " ".join(command),
        "path": report.get("path"),
        "device": report.get("device", "cpu"),
        "layers": layers,
        "peak_rss_bytes": peak[0],
        "wall_s": round(wall, 1),
        "timings": timings,
        "layer_seconds": report["layer_seconds"],
        # Medians: on a machine shared with other work a few layers take 1.5-2x the others (measured: 29-59 s).
        "quantization_s_per_layer": round(statistics.median(per_layer), 2) if per_layer else None,
        "quantization_s_per_layer_mean": round(statistics.mean(per_layer), 2) if per_layer else None,
        # Evaluation's fixed part (the models' skeletons, embedding the windows, the head in vocabulary chunks) is
        # not a layer's: per layer is the median of the layers' own times.
        "evaluation_s_per_layer": round(statistics.median(eval_layers), 2) if eval_layers else None,
        "evaluation_s_per_layer_mean": round(statistics.mean(eval_layers), 2) if eval_layers else None,
        "evaluation_fixed_s": round(timings.get("evaluation", 0) - sum(eval_layers), 2),
        "dense_budget_s": timings.get("dense budget"),
        "checkpoint_bytes": report["size_after"],
        "perplexity": {"base": quality["base"]["perplexity"], "variant": quality["variant"]["perplexity"]},
        "kl": quality["variant"]["kl"],
    }


def _start(command: list[str]) -> subprocess.Popen:
    """Start `hubc optimize` and return once it is streaming layers into its staging folder."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stderr:
        if "one layer at a time" in line:
            break
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe drained
    return proc


def kill_check(folder: Path, out: Path, calib_windows: int, seconds: float = 20.0) -> dict:
    """Kill `hubc optimize --stream` mid-way: SIGTERM unwinds and removes its staging folder at once; after SIGKILL
    (nothing runs) the next run for the same output removes the dead run's staging folder as it starts."""
    import signal

    recipe = out.parent / f"{out.name}.recipe.yaml"
    recipe.write_text(
        "scheme: w4a16\ntarget: a10g\nmethod: gptq\nsmoothing: none\ndense_budget: 0.0\n"
        f"calibration: {{text: wikitext2-valid, windows: {calib_windows}, seq_len: 512}}\n")
    shutil.rmtree(out, ignore_errors=True)
    command = [str(ROOT / ".venv" / "bin" / "hubc"), "optimize", str(folder), "--target", "a10g", "--recipe",
               str(recipe), "--no-serve", "--eval-windows", "2", "--stream", "--out", str(out)]

    def left() -> list[str]:
        return sorted(p.name for p in out.parent.glob(f".{out.name}.partial-*")) + ([out.name] if out.exists() else [])

    result = {}
    for how in ("SIGTERM", "SIGKILL"):
        proc = _start(command)
        time.sleep(seconds)
        proc.send_signal(getattr(signal, how))
        proc.wait(timeout=120)
        result[how] = {"exit_code": proc.returncode, "left": left()}
    proc = _start(command)  # the next run, started after the SIGKILL
    result["next run"] = {"left while it runs": [n for n in left() if f"partial-{proc.pid}-" not in n]}
    proc.terminate()
    proc.wait(timeout=120)
    result["next run"]["left after it is stopped"] = left()
    result["command"] = " ".join(command)
    return result


EARLIER = " (220b763, before the heap trim)"


def _acceptance(shallow: dict, deep: dict, label: str) -> list[str]:
    """The issue's two bars for one pair of runs. Time per layer by median, mean and minimum: on a machine shared
    with other work a layer's time is its own cost plus what the other work took, and the minimum is the least
    disturbed reading."""
    ratio = deep["peak_rss_bytes"] / shallow["peak_rss_bytes"]
    change = {}
    for kind in ("quantization", "evaluation"):
        a, b = shallow["layer_seconds"][kind], deep["layer_seconds"][kind]
        change[kind] = {how: f(b) / f(a) - 1 for how, f in (("median", statistics.median), ("mean", statistics.mean),
                                                              ("minimum", min))}
    within = {how: all(abs(change[k][how]) <= 0.15 for k in change) for how in ("median", "mean", "minimum")}
    return [(f"- Peak RSS at 22 layers / at 2 layers{label}: {ratio:.2f} (bar ≤ 1.3): "
             f"{'met' if ratio <= 1.3 else 'NOT met'}."),
            (f"- Time per layer, 22 layers against 2{label} (bar ±15%): quantization "
             + ", ".join(f"{v:+.0%} by {how}" for how, v in change["quantization"].items())
             + "; evaluation " + ", ".join(f"{v:+.0%} by {how}" for how, v in change["evaluation"].items())
             + ": " + ", ".join(f"{'met' if ok else 'NOT met'} by {how}" for how, ok in within.items()) + ".")]


def render(rows: dict, meta: dict) -> str:
    gb = 1e9
    lines = [
        "# Big models streamed: peak memory and time per layer", "",
        (f"`hubc optimize --stream` (W4A16 GPTQ unless the row names W8A8-int8 smoothed — the cpu default's smoothing "
         "searched layer by layer, weights rounded to nearest —, calibration {meta['calib_windows']}×512 tokens of wikitext-2 valid, "
        f"evaluation {meta['eval_windows']}×512 tokens of wikitext-2 test, --no-serve) on Llama-shaped models with "
        f"random bf16 weights built by `benchmarks/big_models.py`; {meta['machine']}, a machine shared with other "
        "work (timings are noisy). Peak RSS: the hubc process tree, sampled every 0.2 s from /proc."), "",
        ("| row | path | layers | peak RSS (GB) | quantization s/layer, median (mean) | evaluation s/layer, median "
         "(mean) | evaluation, fixed (s) | wall (s) | ppl base → variant | KL |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for key, r in rows.items():
        runs = f" (×{r['runs']} runs)" if r.get("runs", 1) > 1 else ""
        lines.append(f"| {key}{runs} | {r['path']} | {r['layers']} | {r['peak_rss_bytes'] / gb:.2f} | "
                     f"{r['quantization_s_per_layer']} ({r.get('quantization_s_per_layer_mean')}) | "
                     f"{r['evaluation_s_per_layer']} ({r.get('evaluation_s_per_layer_mean')}) | "
                     f"{r.get('evaluation_fixed_s')} | "
                     f"{r['wall_s']:.0f} | "
                     f"{r['perplexity']['base']:.1f} → {r['perplexity']['variant']:.1f} | {r['kl']:.4f} |")
    lines += ["", "## Acceptance (issue 21)", ""]
    for label, suffix in (("", ""), (" (earlier runs, before the heap trim)", EARLIER)):
        shallow, deep = rows.get("1b:2" + suffix), rows.get("1b:22" + suffix)
        if shallow and deep:
            lines += _acceptance(shallow, deep, label)
    d2, d22 = rows.get("1b:2 +30% at w8a16"), rows.get("1b:22 +30% at w8a16")
    if d2 and d22:
        lines += [(f"- With the dense budget (30% at W8A16, its costs measured layer by layer, forward then "
                   f"backward): peak RSS {d2['peak_rss_bytes'] / 1e9:.2f} → {d22['peak_rss_bytes'] / 1e9:.2f} GB "
                   f"({d22['peak_rss_bytes'] / d2['peak_rss_bytes']:.2f}×); cost pass {d2['dense_budget_s']} s → "
                   f"{d22['dense_budget_s']} s ({d2['dense_budget_s'] / 2:.1f} → {d22['dense_budget_s'] / 22:.1f} "
                   "s/layer).")]
    for key, r in rows.items():
        if key.startswith("7b:32 on cuda"):
            minutes = (r["timings"].get("load", 0) + r["timings"].get("quantization", 0)) / 60
            lines += [(f"- 7B shape, all 32 layers, on {r['device']}: load + GPTQ W4A16 {minutes:.1f} min (bar ≤ 15 "
                       f"min on one H100): {'met' if minutes <= 15 else 'NOT met'}; evaluation "
                       f"{r['timings'].get('evaluation', 0) / 60:.1f} min, whole run {r['wall_s'] / 60:.1f} min, "
                       f"peak host RSS {r['peak_rss_bytes'] / gb:.2f} GB.")]
    big = rows.get("7b:2")
    if big:
        per = big["quantization_s_per_layer"] + big["evaluation_s_per_layer"]
        lines += [(f"- 7B shape (2 layers): peak RSS {big['peak_rss_bytes'] / gb:.2f} GB (bar < 12 GB): "
                  f"{'met' if big['peak_rss_bytes'] < 12 * gb else 'NOT met'}; {per:.0f} s per layer "
                  f"(quantization {big['quantization_s_per_layer']} + evaluation {big['evaluation_s_per_layer']}), "
                  f"so about {per * FULL_DEPTH['7b'] / 3600:.1f} h for its 32 layers on this machine.")]
    kill = meta.get("kill")
    if kill:
        lines += [(f"- Killed mid-way ({kill['seconds']:.0f} s into streaming layers of the 1B shape): SIGTERM exits "
                   f"{kill['SIGTERM']['exit_code']} leaving {kill['SIGTERM']['left'] or 'nothing'}; SIGKILL leaves "
                   f"{kill['SIGKILL']['left'] or 'nothing'} (no checkpoint; SIGKILL runs no handler, so its staging folder stays), "
                   f"which the next run for the same output removes as it starts (left while it runs: "
                   f"{kill['next run']['left while it runs'] or 'nothing'}; after it is stopped: "
                   f"{kill['next run']['left after it is stopped'] or 'nothing'}).")]
    lines += [f"- {note}" for note in meta.get("notes", [])]
    lines += ["", (f"Commands: `{next(iter(rows.values()))['command']}` (one per row, in the JSON). Written "
              f"{meta['date']} at hubc {meta['commit']}.")]
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def merged(runs: list[dict]) -> dict:
    """One row from repeated runs: layer times pooled, the highest peak RSS, the median wall time."""
    row = dict(runs[-1])
    row["runs"] = len(runs)
    row["layer_seconds"] = {k: [t for r in runs for t in r["layer_seconds"].get(k) or []]
                            for k in ("quantization", "evaluation")}
    row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    row["wall_s"] = statistics.median(r["wall_s"] for r in runs)
    _fill_stats(row)
    return row


def _fill_stats(row: dict) -> None:
    """Medians and means of a stored row's layer times (rows written before they were recorded)."""
    for kind in ("quantization", "evaluation"):
        times = row["layer_seconds"].get(kind) or []
        if times:
            row[f"{kind}_s_per_layer"] = round(statistics.median(times), 2)
            row[f"{kind}_s_per_layer_mean"] = round(statistics.mean(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1b:2,1b:22", help="SHAPE:LAYERS[,...] (shapes: 1b, 7b)")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--no-stream", action="store_true", help="run in memory (for comparison)")
    parser.add_argument("--dense-budget", type=float, default=0.0,
                        help="share of the weights kept at W8A16, measured layer by layer (GPU defaults: 0.3)")
    parser.add_argument("--scheme", choices=sorted(SCHEMES), default="w4a16",
                        help="w4a16 (GPTQ, a10g) or w8a8-int8 (the cpu default's smoothing, round to nearest)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per row, their layer times pooled (a 2-layer row has few on a noisy machine)")
    parser.add_argument("--device", default="cpu",
                        help="hubc optimize --device: cpu (rows of this machine's CPU), cuda or auto")
    parser.add_argument("--kill", action="store_true", help="only check that killing a 1b:2 run leaves nothing")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hubc-big-models"), help="where models are built")
    args = parser.parse_args()

    import psutil

    stored = RESULTS / "big_models.json"
    data = json.loads(stored.read_text()) if stored.exists() else {"rows": {}}
    for row in data["rows"].values():
        _fill_stats(row)
    if args.kill:
        folder = build(args.work / "llama-1b-2", "1b", 2)
        data["meta"]["kill"] = {**kill_check(folder, args.work / "out-kill", args.calib_windows), "seconds": 20.0}
        stored.write_text(json.dumps(data, indent=2))
        (RESULTS / "big_models.md").write_text(render(data["rows"], data["meta"]))
        return
    for row in args.rows.split(","):
        shape, layers = row.split(":")
        folder = build(args.work / f"llama-{shape}-{layers}", shape, int(layers))
        key = row + (" in memory" if args.no_stream else "") + \
            (f" +{args.dense_budget:.0%} at w8a16" if args.dense_budget else "") + \
            (f" {args.scheme} smoothed" if args.scheme != "w4a16" else "") + \
            (f" on {args.device}" if args.device != "cpu" else "")
        print(f"» {key}: running hubc optimize", file=sys.stderr)
        runs = [run(folder, args.work / f"out-{shape}-{layers}", args.calib_windows, args.eval_windows,
                    not args.no_stream, args.dense_budget, args.scheme, args.device) for _ in range(args.repeat)]
        data["rows"][key] = merged(runs)
        print(json.dumps(data["rows"][key]), file=sys.stderr)
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False,
                                capture_output=True,
                                text=True).stdout.strip()
        data["meta"] = {**data.get("meta", {}), "calib_windows": args.calib_windows, "eval_windows": args.eval_windows,
                        "machine": f"{cpu_name()}, {os.cpu_count()} cores, "
                                   f"{psutil.virtual_memory().total / 1e9:.0f} GB",
                        "date": datetime.date.today().isoformat(), "commit": commit}
        RESULTS.mkdir(exist_ok=True)
        stored.write_text(json.dumps(data, indent=2))
        (RESULTS / "big_models.md").write_text(render(data["rows"], data["meta"]))


if __name__ == "__main__":
    main()
