"""The path of one run: model ref + target in, a validated, evaluated, served and carded checkpoint out.

The CLI and the webhook worker both call `optimize`. Everything that can fail fast (target, scheme, output folder,
push access, shapes) is checked before the first slow step, and the checkpoint is assembled in a staging folder that
is moved into place only when complete, so a failed run writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from advisor.errors import AdvisorError
from advisor.evaluate import EvalConfig, TextResult
from advisor.recipe import Recipe
from advisor.recommend import Choices
from hubplugin.errors import HubcError
from hubplugin.gate import gate_message, gate_summary, quality_gate
from hubplugin.outfolder import check_out, default_out, staging_folder, weights_size, weights_size_in
from hubplugin.source import ModelSource, cache_dir


@dataclass
class OptimizeConfig:
    """Everything `hubc optimize` can be told, with the defaults a user gets."""

    choices: Choices = field(default_factory=Choices)
    """What the user chose about the recipe (scheme, method, dense budget, actions, ...); the rest is hubc's
    default (advisor.recommend)."""
    out: Path | None = None
    """Output folder; default ./<model>-<scheme>-<target>."""
    overwrite: bool = False
    """Replace an existing output folder (only once the new one is complete)."""
    push: str | None = None
    """Hub repo id to push the variant to, in one commit."""
    private: bool = False
    max_ppl_increase: float = 0.05
    """Quality gate: a perplexity rise over the base beyond this share, on any text (evaluated or served), is
    flagged, and the variant is not pushed unless `accept_quality_loss`."""
    accept_quality_loss: bool = False
    serve: bool = True
    """Serve base and variant with vLLM and measure served quality and latency (targets this machine runs)."""
    revision: str | None = None
    token: str | None = None
    recipe: Recipe | None = None
    """A recipe to apply instead of `choices` (e.g. one read from a file)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    stream: bool | None = None
    """Compress and evaluate one decoder layer at a time, weights read from the safetensors shards (advisor.stream):
    True (--stream), False (--no-stream), None: when the model would not fit comfortably in memory."""
    device: str = "auto"
    """Where layer-by-layer work computes (advisor.device): auto (a CUDA GPU when torch sees one), cpu, cuda[:N]."""
    max_size: int | None = None
    """Largest checkpoint weights in bytes (--max-size): hubc chooses the scheme, dense budget and pruning that fit
    (advisor.size_budget) for what the user left open."""
    speedup: float | None = None
    """A decode step (TPOT) this many times faster than the base's (--speedup): hubc chooses what structure removes
    by estimated loss per millisecond the latency model predicts it saves (advisor.latency.speedup_plan)."""
    latency_prompt_tokens: int = 128
    latency_output_tokens: int = 32
    latency_requests: int = 5


@dataclass
class LatencyPair:
    """TTFT / per-token latency of the base and the variant, measured in one interleaved `vllm bench serve` run on
    the same server settings (serving.check), and stored in the results store like `hubc bench`'s."""

    base: dict
    """TTFT/TPOT p50/p95 (ms, median over rounds), throughput_tok_s, rounds, tpot_ms_p50_spread, measurement_id."""
    variant: dict
    hardware: str
    vllm_version: str
    settings: dict
    """Server settings, and requests, prompt/output tokens, warm-up, concurrency and rounds of the measurement."""


@dataclass
class OptimizeResult:
    source: ModelSource
    target: str
    target_description: str
    serve_dtype: str
    """The activation dtype vLLM serves this checkpoint in on the target."""
    recipe: Recipe
    out: Path
    size_before: int
    """Bytes of the base's weights in the checkpoint dtype (what a user would otherwise deploy on the target)."""
    size_after: int
    quantized_modules: int
    quality: list[TextResult]
    checkpoint_dtype: str = "bfloat16"
    """The dtype of the variant's unquantized tensors (and of the base size it is compared with)."""
    size_original: int | None = None
    """Bytes of the base's weight files as given, when they are in another dtype (e.g. float32 from a GGUF)."""
    transforms: dict = field(default_factory=dict)
    """What the pre-quantization transforms did (smoothing groups, chosen strengths, calibration tokens)."""
    latency: LatencyPair | None = None
    served: bool = False
    sample: dict | None = None
    """A greedy text completion from the served variant: proof it generates text."""
    not_served_reason: str | None = None
    flags: list[str] = field(default_factory=list)
    push_refused: str | None = None
    """Why the variant was not pushed although --push was given (the quality gate)."""
    push_url: str | None = None
    push_commit: str | None = None
    seconds: float = 0.0
    gate: dict | None = None
    """The quality gate: {threshold, passed, worst: {text, engine, increase}, failures: [...]}."""
    timings: dict = field(default_factory=dict)
    """Seconds per step of the run (load, transforms, dense budget, quantization, export, evaluation, serving)."""
    architecture: str | None = None
    """The variant's architecture (config.json `architectures[0]`): the base's, or hubc's own where structure made
    per-layer shapes or factorized linears (advisor.architecture)."""
    model_type: str | None = None
    linear_parameters: dict = field(default_factory=dict)
    """Weights of the decoder's linear layers: {base, variant} (what pruning and factorization reduce)."""
    path: str = "in memory"
    """How compression and evaluation ran: `in memory` or `streamed layer by layer` (advisor.stream)."""
    path_reason: str = ""
    """Why that path (the model's size against the memory available, or the flag)."""
    device: str = "cpu"
    """Where the layer-by-layer quantization and the streamed evaluation computed (advisor.device)."""
    layer_seconds: dict = field(default_factory=dict)
    """Streamed runs: seconds each decoder layer took, {quantization: [...], evaluation: [...]}."""
    size_budget: dict | None = None
    """--max-size: {max_bytes, estimate, choice: what hubc chose and why}; the written size is `size_after`."""
    speedup: dict | None = None
    """--speedup: the plan (advisor.latency.SpeedupPlan: predicted base TPOT, goal, what structure had to save and
    what the model rests on), the variant's predicted TPOT from its own files, and, when served, the measured
    speed-up."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["source"] = self.source.to_dict()
        d["out"] = str(self.out)
        d["recipe"] = asdict(self.recipe)
        return d


def optimize(ref: str, target_name: str, config: OptimizeConfig, progress: Callable[[str], None] = lambda s: None) -> OptimizeResult:
    """Run the whole path for one model and one target. Raises HubcError/AdvisorError/ServingError subclasses."""
    from advisor.device import resolve as resolve_device
    from advisor.schemes import get_scheme
    from advisor.targets import get_target

    started = time.monotonic()
    target = get_target(target_name)
    device = resolve_device(config.device)  # a GPU asked for and not there fails before anything is read
    if config.recipe is not None:
        config.recipe.check_fields()
    scheme = get_scheme(config.recipe.scheme if config.recipe else config.choices.scheme or target.default_scheme)
    target.require_scheme(scheme.name)
    if config.out is not None:
        check_out(config.out, config.overwrite)
    from advisor.calibrate import text_names
    from advisor.evaluate import read_text

    evaluated = {name: read_text(name)[1] for name in config.eval.texts}  # a missing file fails now, not later
    calibration = (config.recipe.calibration or {}).get("text") if config.recipe else config.choices.calibration_text
    for name in text_names(calibration) if calibration else ():
        _, text = read_text(name)
        same = [e for e, content in evaluated.items() if content == text]
        if same:
            raise AdvisorError(f"the calibration text {name} is the evaluation text {same[0]}: its numbers would "
                               "not be held out", hint="calibrate on other text of the same kind, or evaluate on "
                                                       "other text")
    if config.push:
        from hubplugin import hub

        config.push = hub.check_push_access(config.push, token=config.token)

    progress("resolving the model")
    from hubplugin import source as sources

    source = sources.resolve(ref, revision=config.revision, token=config.token)
    if config.out is None and config.max_size is None:  # a size budget may choose another scheme: named below
        check_out(default_out(source, scheme.name, target.name), config.overwrite)

    from advisor.model import inspect_structure
    from advisor.plan import resolve
    from advisor.recommend import recommend

    structure = inspect_structure(source.path)
    if structure.context_length and config.eval.seq_len > structure.context_length:
        raise AdvisorError(f"--seq-len {config.eval.seq_len} is longer than the model's context "
                           f"({structure.context_length} tokens)",
                           hint=f"use --seq-len {min(512, structure.context_length)} or any value up to "
                                f"{structure.context_length}")
    choices, budget = config.choices, None
    speedup, latency_model = _plan_speedup(source, target, scheme, structure, config, progress)
    if speedup is not None:
        request = {**((config.recipe.structure if config.recipe else choices.structure) or {}),
                   "speedup": speedup.speedup, "latency": speedup.spec()}
        if config.recipe:
            config.recipe = dataclasses.replace(config.recipe, structure=request)
        else:
            choices = dataclasses.replace(choices, structure=request)
    if config.max_size is not None and config.recipe is None:
        from advisor.size_budget import fit_choices

        choices, budget = fit_choices(structure, target, config.max_size, choices)
        progress(f"size budget: {budget['choice']}")
    plan = resolve(config.recipe, structure, target) if config.recipe else recommend(structure, target, choices)
    out = (config.out or default_out(source, plan.recipe.scheme, target.name)).resolve()
    check_out(out, config.overwrite)
    from advisor.stream import choose_path

    path = choose_path(config.stream, plan, device=device)

    staging = staging_folder(out)
    try:
        result = _build(source, target, plan, staging, out, config, progress, path, device)
        if speedup is not None:
            result.speedup = speedup_outcome(speedup, latency_model, staging, result)
            if result.speedup.get("flag"):
                result.flags.append(result.speedup["flag"])
        if budget is not None:
            result.size_budget = budget
            if result.size_after > budget["max_bytes"]:
                result.flags.append(f"the weights take {result.size_after / 1e6:.1f} MB, over the --max-size budget "
                                    f"of {budget['max_bytes'] / 1e6:.1f} MB (estimated {budget['estimate'] / 1e6:.1f}"
                                    " MB): give a smaller --max-size")
        result.gate = quality_gate(result.quality, config.max_ppl_increase)
        if not result.gate["passed"]:
            result.flags.insert(0, gate_message(result))
        _write_outputs(result, staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        result.out = out
        (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    if config.push and not result.gate["passed"] and not config.accept_quality_loss:
        result.seconds = time.monotonic() - started
        result.push_refused = (
            f"not pushed to {config.push}: {gate_summary(result.gate)}"
        )
        (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
        return result
    if config.push:
        from hubplugin import hub

        progress(f"pushing to {config.push}")
        try:
            pushed = hub.push_folder(
                out, config.push, token=config.token, private=config.private,
                commit_message=f"hubc: {result.recipe.scheme} variant of {source.hub_id or source.ref} for {target.name}",
            )
        except HubcError as exc:
            # The local checkpoint is complete and kept, so the push can be retried without redoing the work.
            exc.hint = f"{exc.hint}; the checkpoint is complete at {out}: retry with `hubc push {out} {config.push}`"
            raise
        result.push_url, result.push_commit = pushed.url, pushed.commit_sha
        (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    result.seconds = time.monotonic() - started
    return result


def _plan_speedup(source, target, scheme, structure, config, progress):
    """--speedup (or a recipe's `structure: {speedup: X}`): what structure has to save, from the latency model of
    this target (its stored measurements, or its roofline), before any model is loaded: (SpeedupPlan, the
    LatencyModel it came from), or (None, None) without a speed-up."""
    request = (config.recipe.structure if config.recipe else config.choices.structure) or {}
    speed = config.speedup or request.get("speedup")
    if not speed:
        return None, None
    if config.max_size is not None:
        raise AdvisorError("--speedup and --max-size each choose what to remove; give one of them")
    from advisor.recipe import check_structure

    check_structure({**request, "speedup": speed})  # a speed-up does not combine with params, mlp, heads or layers
    from advisor.checkpoint_features import DTYPE_BYTES, checkpoint_features
    from advisor.latency import LatencyModel, speedup_plan
    from advisor.measurement import Traffic
    from advisor.schemes import is_dense
    from advisor.size_budget import linear_bytes
    from serving.store import ResultsStore, target_latency_records

    served = target.serve_dtype_of(scheme.name)
    load = Traffic(config.latency_prompt_tokens, config.latency_output_tokens, concurrency=1)
    records, _ = target_latency_records(ResultsStore(), target)
    model = LatencyModel.fit(records, target, served)
    features = checkpoint_features(source.path, served)
    params = sum(li.in_features * li.out_features for li in structure.linears)
    dense = is_dense(scheme.name)
    stored = sum(linear_bytes(li.in_features, li.out_features, None if dense else scheme, DTYPE_BYTES[served])
                 for li in structure.linears)
    plan = speedup_plan(model, features, load, float(speed), params, "dense" if dense else scheme.name,
                        stored / max(params, 1))
    progress(f"speed-up {plan.speedup:g}x: the base's decode step is predicted at {plan.base_ms:.3g} ms ({plan.basis}"
             f", {plan.measurements} measurement(s)); structure has to save {plan.save_ms:.3g} ms")
    return plan, model


def speedup_outcome(plan, model, folder: Path, result) -> dict:
    """The speed-up plan, the variant's TPOT predicted from its written files by the same model, and the measured
    speed-up where it was served; a flag where the measurement falls short of the request by more than 5%."""
    from advisor.checkpoint_features import checkpoint_features
    from advisor.errors import AdvisorError as _Error
    from advisor.measurement import Traffic

    out = plan.to_dict()
    try:
        load = Traffic.parse(plan.traffic)
        predicted = model.predict(checkpoint_features(folder, model.dtype), load).tpot_ms_p50
        out["predicted_variant_ms"] = predicted
        out["predicted_speedup"] = plan.base_ms / predicted
    except _Error as exc:
        out["prediction_error"] = exc.message
    pair = result.latency
    if pair is not None and pair.base.get("tpot_ms_p50") and pair.variant.get("tpot_ms_p50"):
        measured = pair.base["tpot_ms_p50"] / pair.variant["tpot_ms_p50"]
        out["measured_speedup"] = measured
        if measured < plan.speedup * 0.95:
            out["flag"] = (f"asked for a {plan.speedup:g}x faster decode step, measured {measured:.2f}x (predicted "
                           f"{out.get('predicted_speedup', float('nan')):.2f}x from {plan.measurements} stored "
                           "measurement(s)): this run's measurements are stored now, so running the same command "
                           "again plans with them")
    return out


class _Clock:
    """Seconds spent in each step, for report.json and the benchmarks that choose defaults by time."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._step, self._since = None, time.monotonic()

    def step(self, name: str | None) -> None:
        now = time.monotonic()
        if self._step is not None:
            self.timings[self._step] = round(self.timings.get(self._step, 0.0) + now - self._since, 2)
        self._step, self._since = name, now


def _build(source, target, plan, staging, out, config, progress, path, device) -> OptimizeResult:
    import torch
    from transformers import AutoTokenizer

    from advisor import evaluate as ev
    from advisor.calibrate import Calibration
    from advisor.device import describe
    from hubplugin.source import copy_tokenizer_files

    clock = _Clock()
    clock.step("load")
    progress(f"loading the model: {path.reason}")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    if plan.recipe.calibration:
        from advisor.calibrate import CalibConfig, calibration_windows

        calibration_windows(tokenizer, CalibConfig.from_dict(plan.recipe.calibration))  # too short: said before loading
    texts = []
    for name in config.eval.texts:
        label, text = ev.read_text(name)
        texts.append(ev.EvalText(label, ev.make_windows(tokenizer, text, config.eval.seq_len, config.eval.windows)))

    def step(name: str, message: str) -> None:
        progress(message)
        clock.step(name)

    base_linear = sum(li.in_features * li.out_features for li in plan.structure.linears)
    dtype = getattr(torch, target.checkpoint_dtype)
    if path.stream:
        from advisor.stream import compress_streaming

        exported, report, plan = compress_streaming(source.path, plan, Calibration.of(plan.recipe, tokenizer),
                                                    staging, dtype, step, device=device)
    else:
        from advisor.compress import compress
        from advisor.export import write_checkpoint
        from advisor.model import load_model

        model = load_model(source.path)
        # Healing is judged on the evaluation texts (8 windows each: a before/after comparison, not the final
        # numbers).
        held_out = {t.name: t.windows[:8] for t in texts}
        from advisor.measurement import fingerprint

        samples_cache = cache_dir() / "samples" / fingerprint(source.path)
        compressed = compress(model, plan, Calibration.of(plan.recipe, tokenizer, model, samples_cache), step,
                              held_out=held_out, device=device)
        clock.step("export")
        exported = write_checkpoint(compressed, staging, dtype=dtype)
        plan, report = compressed.plan, compressed.report
        del model, compressed
    copy_tokenizer_files(source.path, staging)
    variant_linear = sum(li.in_features * li.out_features for li in plan.structure.linears)

    # Base and variant are scored side by side, window by window (the base read again from its files, the variant
    # from the exported checkpoint), so KL is exact over the vocabulary while only one window's distributions exist;
    # streamed, layer by layer with the head in chunks of the vocabulary.
    progress("evaluating the variant against the base")
    clock.step("evaluation")
    quality, base_top1, eval_layers = [], {}, []
    scored = _score(source.path, staging, texts, path.stream, eval_layers, device)
    for t, (var_scores, base_scores) in zip(texts, scored, strict=True):
        quality.append(
            TextResult(
                text=t.name,
                base=ev.measure(base_scores, t.name, "float32"),
                variant=ev.measure(var_scores, t.name, "float32",
                                   note="hubc evaluation of the exported checkpoint (weights read back, activations quantized per token as the kernels do)"),
            )
        )
        base_top1[t.name] = base_scores.top1_per_window(t.windows)

    recipe = plan.recipe
    result = OptimizeResult(
        source=source,
        target=target.name,
        target_description=target.description,
        serve_dtype=target.serve_dtype_of(recipe.scheme),
        recipe=recipe,
        out=out,
        size_before=weights_size_in(source.path, target.checkpoint_dtype),
        size_after=exported.weight_bytes,
        checkpoint_dtype=target.checkpoint_dtype,
        quantized_modules=exported.quantized_modules,
        quality=quality,
        transforms=asdict(report),
        architecture=plan.structure.architecture,
        model_type=plan.structure.model_type,
        linear_parameters={"base": base_linear, "variant": variant_linear},
        path=path.name,
        path_reason=path.reason,
        device=describe(device),
        layer_seconds={"quantization": report.layer_seconds, "evaluation": eval_layers} if path.stream else {},
    )
    if report.heal:
        result.flags += report.heal.get("flags", [])
    original = weights_size(source.path)
    if abs(original - result.size_before) > 0.01 * original:
        result.size_original = original
    if not config.serve:
        result.not_served_reason = "serving was skipped (--no-serve)"
    elif not target.served_here:
        result.not_served_reason = (
            f"this checkpoint targets {target.description}; it was validated against the target's vLLM kernels "
            f"but not served here ({target.not_served_reason or 'this machine has no such GPU'})"
        )
    else:
        from hubplugin.served import serve_and_measure

        clock.step("serving")
        serve_and_measure(result, source, staging, texts, base_top1, target, config, progress)
    clock.step(None)
    result.timings = clock.timings
    return result


def _score(base_path: Path, variant_path: Path, texts, stream: bool, layer_seconds: list[float], device) -> list:
    """(variant's scores, base's) per text: both models in memory (on the host), or streamed layer by layer on
    `device` (then the seconds each layer took are appended to `layer_seconds`)."""
    if stream:
        from advisor.stream_eval import score_streaming

        return score_streaming(base_path, variant_path, texts, layer_seconds=layer_seconds, device=device)
    from advisor import evaluate as ev
    from advisor.export import load_for_eval
    from advisor.model import load_model

    base, variant = load_model(base_path), load_for_eval(variant_path)
    return [ev.score(variant, t.windows, f"base and variant on {t.name}", reference=base) for t in texts]


def _write_outputs(result: OptimizeResult, staging: Path) -> None:
    from hubplugin.card import render_card

    (staging / "recipe.yaml").write_text(result.recipe.to_yaml())
    (staging / "report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    (staging / "README.md").write_text(render_card(result))


__all__ = ["HubcError", "OptimizeConfig", "OptimizeResult", "optimize"]
