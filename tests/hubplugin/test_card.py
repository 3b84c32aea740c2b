"""The model card states what the run did and measured: the kernel behind a speed difference, the learning steps
the recipe ran."""

from __future__ import annotations

from pathlib import Path

from advisor.evaluate import Measurement, TextResult
from advisor.recipe import Recipe
from advisor.targets import get_target
from hubplugin.card import render_card
from hubplugin.optimize import LatencyPair, OptimizeResult
from hubplugin.source import ModelSource


def _result(tmp_path: Path, recipe: Recipe, tpot_ms: tuple[float, float] | None = None) -> OptimizeResult:
    def measured(ppl: float, engine: str = "transformers") -> Measurement:
        return Measurement(
            engine=engine,
            engine_version="1",
            dtype="float32",
            hardware="test CPU",
            text="wikitext2-test",
            tokens=512,
            perplexity=ppl,
            kl=0.01,
            top1_agreement=0.9,
        )

    result = OptimizeResult(
        source=ModelSource(ref="org/base", kind="hub", path=tmp_path, hub_id="org/base", revision="abc"),
        target=recipe.target,
        target_description="a test target",
        serve_dtype="float32",
        recipe=recipe,
        out=tmp_path / "out",
        size_before=2_000_000,
        size_after=1_000_000,
        quantized_modules=7,
        quality=[TextResult(text="wikitext2-test", base=measured(10.0), variant=measured(10.1))],
    )
    if tpot_ms is not None:
        timing = [
            {
                "ttft_ms_p50": 50.0,
                "ttft_ms_p95": 60.0,
                "tpot_ms_p50": t,
                "tpot_ms_p95": t + 1,
                "throughput_tok_s": 1000 / t,
            }
            for t in tpot_ms
        ]
        result.latency = LatencyPair(
            base=timing[0],
            variant=timing[1],
            hardware="test CPU",
            vllm_version="0.32.0",
            settings={"dtype": "float32", "requests": 5, "prompt_tokens": 128, "output_tokens": 32},
        )
        result.served = True
    return result


def test_a_slower_variant_names_the_kernel_that_served_it_and_no_unrecorded_cause(tmp_path):
    recipe = Recipe(scheme="fp8", target="cpu-avx2")
    card = render_card(_result(tmp_path, recipe, tpot_ms=(30.0, 900.0)))
    fp8 = get_target("cpu-avx2").schemes["fp8"]
    assert "30.0× slower per output token" in card
    speed = next(line for line in card.splitlines() if "slower per output token" in line)
    assert f"`{fp8.kernel}`" in speed and fp8.note.rstrip(".") in speed and "served in float32" in speed
    assert "cost more than the memory they save" not in card


def test_learning_steps_are_the_ones_the_recipe_ran(tmp_path):
    from advisor.quantize.autoround import RoundConfig

    given = Recipe(scheme="w8a8-int8", target="cpu-avx2", method="autoround", iterations=20)
    assert "(20 signed-gradient steps per decoder block" in render_card(_result(tmp_path, given))
    default = Recipe(scheme="w8a8-int8", target="cpu-avx2", method="autoround")
    steps = RoundConfig().iterations
    assert f"({steps} signed-gradient steps per decoder block" in render_card(_result(tmp_path, default))
