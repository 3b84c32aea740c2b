"""Streaming (advisor.stream): a checkpoint compressed one decoder layer at a time from the shards is the one the
in-memory path writes, byte for byte; the streamed evaluation gives the in-memory numbers; the path is chosen by
size and refused, with its reason, for what does not stream."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES

from advisor import evaluate as ev
from advisor.calibrate import Calibration
from advisor.compress import compress
from advisor.errors import AdvisorError
from advisor.export import load_for_eval, write_checkpoint
from advisor.model import inspect_structure, load_model
from advisor.recommend import Choices, recommend
from advisor.shards import ShardReader, ShardWriter
from advisor.stream import choose_path, compress_streaming
from advisor.stream_eval import score_streaming
from advisor.targets import get_target

CALIBRATION = {"text": "wikitext2-valid", "windows": 4, "seq_len": 64}


def plan_for(folder: Path, scheme: str, method: str, **choices):
    settings = {"smoothing": "none", "dense_budget": 0, "calibration": CALIBRATION, **choices}
    if method == "autoround":
        settings.setdefault("iterations", 5)
    return recommend(inspect_structure(folder), get_target("a10g"), Choices(scheme=scheme, method=method, **settings))


def both_ways(folder: Path, plan, tmp_path: Path, max_shard_bytes: int | None = None) -> tuple[Path, Path]:
    """The checkpoint written in memory and streamed, same plan and calibration."""
    from transformers import AutoTokenizer

    calibration = Calibration.of(plan.recipe, AutoTokenizer.from_pretrained(folder))
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    memory.mkdir(parents=True)
    streamed.mkdir()
    write_checkpoint(compress(load_model(folder), plan, calibration), memory, dtype=torch.bfloat16)
    extra = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    compress_streaming(folder, plan, calibration, streamed, dtype=torch.bfloat16, **extra)
    return memory, streamed


@pytest.mark.parametrize(("scheme", "method"), [("w4a16", "gptq"), ("w8a8-int8", "gptq"), ("w8a16", "rtn"),
                                               ("w4a16", "autoround")])
def test_streamed_checkpoint_is_the_in_memory_one_byte_for_byte(tiny_llama_dir, tmp_path, scheme, method):
    memory, streamed = both_ways(tiny_llama_dir, plan_for(tiny_llama_dir, scheme, method), tmp_path)
    assert sorted(p.name for p in streamed.iterdir()) == ["config.json", "model.safetensors"]
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(memory / name, streamed / name, shallow=False), name


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_streams_byte_for_byte(tmp_path, model_type):
    """Biases (Qwen2), fused q/k/v and gate/up stored fused (Phi-3), q/k norms (Qwen3), heads tied to the
    embedding and stored once, scaled embeddings and sliding windows (Gemma)."""
    from tiny_models import build_tiny_model

    folder = build_tiny_model(tmp_path / model_type, model_type)
    memory, streamed = both_ways(folder, plan_for(folder, "w4a16", "gptq"), tmp_path)
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(memory / name, streamed / name, shallow=False), name


@pytest.mark.parametrize(("scheme", "method", "budget_scheme"), [("w4a16", "gptq", "w8a16"),
                                                                 ("w8a8-int8", "rtn", "dense")])
def test_dense_budget_streams_with_the_in_memory_choice(tiny_llama_dir, tmp_path, scheme, method, budget_scheme):
    """The dense budget's costs measured layer by layer (forward, then backward from the last layer) are the
    in-memory ones within float rounding, keep the same linears, and the checkpoints are the same bytes."""
    from transformers import AutoTokenizer

    from advisor.compress import CompressReport, keep_sensitive_dense

    plan = plan_for(tiny_llama_dir, scheme, method, dense_budget=0.3, budget_scheme=budget_scheme)
    calibration = Calibration.of(plan.recipe, AutoTokenizer.from_pretrained(tiny_llama_dir))
    in_memory = CompressReport()
    keep_sensitive_dense(load_model(tiny_llama_dir), plan, calibration.windows, in_memory)
    out = tmp_path / "streamed"
    out.mkdir()
    _, streamed, streamed_plan = compress_streaming(tiny_llama_dir, plan, calibration, out, dtype=torch.bfloat16)
    assert streamed.kept_dense and streamed.kept_dense.keys() == in_memory.kept_dense.keys()
    for name, cost in in_memory.kept_dense.items():
        assert streamed.kept_dense[name] == pytest.approx(cost, rel=1e-4)
    assert streamed.quantization_cost == pytest.approx(in_memory.quantization_cost, rel=1e-4)
    assert sum(s is None or s.name != scheme for s in streamed_plan.linears.values()) > 0
    memory, _ = both_ways(tiny_llama_dir, plan, tmp_path / "both")
    assert filecmp.cmp(memory / "model.safetensors", out / "model.safetensors", shallow=False)
    assert (memory / "config.json").read_text() == (out / "config.json").read_text()


@pytest.mark.parametrize(("scheme", "method", "dense_budget"), [("w8a8-int8", "gptq", 0), ("w8a8-int8", "rtn", 0.3),
                                                                 ("w4a16", "gptq", 0)])
def test_smoothing_streams_byte_for_byte(tiny_llama_dir, tmp_path, scheme, method, dense_budget):
    """Smoothing searches each decoder layer on its full-precision inputs in both paths (the in-memory path one
    layer at a time too), so the factors, the report and the checkpoint are the same; with a dense budget the
    layers are read three times (budget forward and backward, quantization) and get the first read's factors
    folded again. W8A8: SmoothQuant; W4A16: activation-aware scaling."""
    from transformers import AutoTokenizer

    plan = plan_for(tiny_llama_dir, scheme, method, smoothing="search", dense_budget=dense_budget,
                    **({"budget_scheme": "dense"} if dense_budget else {}))
    calibration = Calibration.of(plan.recipe, AutoTokenizer.from_pretrained(tiny_llama_dir))
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    memory.mkdir()
    streamed.mkdir()
    compressed = compress(load_model(tiny_llama_dir), plan, calibration)
    write_checkpoint(compressed, memory, dtype=torch.bfloat16)
    _, report, _ = compress_streaming(tiny_llama_dir, plan, calibration, streamed, dtype=torch.bfloat16)
    fields = ("smoothing_groups", "smoothed", "alphas", "error_reduction", "kept_dense", "calibration_tokens")
    assert {f: getattr(report, f) for f in fields} == {f: getattr(compressed.report, f) for f in fields}
    assert report.smoothing_groups == 8 and report.smoothed > 0  # per layer: q/k/v, gate/up, v→o, up→down
    assert bool(report.kept_dense) == bool(dense_budget)
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(memory / name, streamed / name, shallow=False), name


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_smooths_the_same_streamed(tmp_path, model_type):
    """Gemma's (1 + weight) norms and sandwich norms, Qwen3's q/k norms, Phi-3's fused q/k/v and gate/up."""
    from tiny_models import build_tiny_model

    folder = build_tiny_model(tmp_path / model_type, model_type)
    memory, streamed = both_ways(folder, plan_for(folder, "w8a8-int8", "rtn", smoothing="search"), tmp_path)
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(memory / name, streamed / name, shallow=False), name


def test_smoothing_refuses_a_layer_whose_norm_lies_before_it(tiny_llama_dir):
    """A group spanning two decoder layers cannot be folded layer by layer: refused in one line, with the hint."""
    from transformers import AutoTokenizer

    from advisor.compress import LayerSmoothing
    from advisor.model import decoder_layers

    plan = plan_for(tiny_llama_dir, "w8a8-int8", "rtn", smoothing="search")
    windows = Calibration.of(plan.recipe, AutoTokenizer.from_pretrained(tiny_llama_dir)).windows
    model = load_model(tiny_llama_dir)
    layer = decoder_layers(model)[1][0]
    layer.input_layernorm = torch.nn.Identity()  # q/k/v read the layer's input as given
    with pytest.raises(AdvisorError, match="q_proj reads its layer's input") as caught:
        LayerSmoothing(model, plan, windows)(0, layer)
    assert "--smoothing none" in caught.value.hint


def test_sharded_stream_holds_the_same_tensors_with_an_index(tiny_llama_dir, tmp_path):
    """Shards of at most 64 KB: same tensors as the in-memory file, every one named in the index, and the
    checkpoint reads back."""
    from safetensors.torch import load_file

    memory, streamed = both_ways(tiny_llama_dir, plan_for(tiny_llama_dir, "w4a16", "gptq"), tmp_path,
                                 max_shard_bytes=64 * 1024)
    shards = sorted(streamed.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(s.stat().st_size for s in shards)
    expected = load_file(memory / "model.safetensors")
    got = {k: v for s in shards for k, v in load_file(s).items()}
    assert got.keys() == expected.keys() == index["weight_map"].keys()
    assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in got)
    for shard in shards:  # within the limit (plus a header), or one tensor larger than the limit
        held = [n for n, f in index["weight_map"].items() if f == shard.name]
        assert shard.stat().st_size <= 64 * 1024 + 8 * 1024 or len(held) == 1
    load_for_eval(streamed)


@pytest.mark.parametrize("folder_of", ["llama", "gemma2"])
def test_streamed_evaluation_equals_the_in_memory_one(tmp_path, folder_of):
    """Perplexity, KL and top-1 agreement within 0.1% of the in-memory evaluation, the head taken in chunks of
    300 entries (not a divisor of the 1024-token vocabulary); Gemma 2's sliding-window layers get their own masks
    (windows of 96 tokens, sliding window 64) and its logits are soft-capped. Models with peaked distributions
    (init std 0.2): at transformers' default init the KL is ~1e-6, below what float32 log-softmax resolves."""
    from helpers import build_tiny_llama
    from tiny_models import build_tiny_model
    from transformers import AutoTokenizer

    folder = build_tiny_llama(tmp_path / "llama") if folder_of == "llama" else build_tiny_model(tmp_path / "g2", "gemma2")
    _, variant = both_ways(folder, plan_for(folder, "w4a16", "gptq"), tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [ev.EvalText(n, ev.make_windows(tokenizer, ev.read_text(n)[1], 96, 2)) for n in ("wikitext2-test", "licenses")]
    base_model, variant_model = load_model(folder), load_for_eval(variant)
    streamed = score_streaming(folder, variant, texts, chunk=300)
    for text, (var_scores, base_scores) in zip(texts, streamed, strict=True):
        ref_var, ref_base = ev.score(variant_model, text.windows, "reference", reference=base_model)
        for got, want in ((base_scores, ref_base), (var_scores, ref_var)):
            g, w = ev.measure(got, text.name, "float32"), ev.measure(want, text.name, "float32")
            assert g.perplexity == pytest.approx(w.perplexity, rel=1e-3)
            if w.kl is not None:
                assert g.kl == pytest.approx(w.kl, rel=1e-3)
                assert g.top1_agreement == pytest.approx(w.top1_agreement, abs=1e-3)
            assert torch.equal(got.top1, want.top1)


def test_path_is_chosen_by_size_and_refused_with_its_reason(tiny_llama_dir):
    plain = plan_for(tiny_llama_dir, "w4a16", "gptq")
    assert not choose_path(None, plain, available=2**40).stream
    small = choose_path(None, plain, available=1000)
    assert small.stream and "bf16 weights" in small.reason
    assert not choose_path(False, plain, available=1000).stream
    assert choose_path(True, plan_for(tiny_llama_dir, "w8a8-int8", "rtn", smoothing="search")).stream
    removed = plan_for(tiny_llama_dir, "w4a16", "gptq", remove_layers=(1,), heal_minutes=0)
    fallback = choose_path(None, removed, available=1000)
    assert not fallback.stream and "pruning" in fallback.reason
    assert choose_path(True, plan_for(tiny_llama_dir, "w4a16", "gptq", dense_budget=0.1, budget_scheme="w8a16")).stream
    assert choose_path(True, plan_for(tiny_llama_dir, "w4a16", "autoround")).stream
    with pytest.raises(AdvisorError, match="pruning"):
        choose_path(True, plan_for(tiny_llama_dir, "w4a16", "gptq", remove_layers=(1,), heal_minutes=0))


def test_shard_writer_gives_oversized_tensors_a_shard_of_their_own(tmp_path):
    writer = ShardWriter(tmp_path, max_bytes=1000)
    writer.add({"a": torch.zeros(100), "b": torch.zeros(1000), "c": torch.zeros(10)})
    writer.close()
    reader = ShardReader(tmp_path)
    assert sorted(reader.names()) == ["a", "b", "c"]
    assert len({reader.file_of[n] for n in "abc"}) == 3
    assert not list(tmp_path.glob(".shard-*"))


def test_every_layer_is_calibrated_with_its_own_masks_and_positions(tmp_path):
    """Gemma 3's sixth layer is a global-attention layer: another mask and another rotary base than the sliding
    layers before it. Calibrated layer by layer (advisor.quantize.sequential, which streaming runs), its o_proj
    must see what it sees in the model's own forward pass."""
    import transformers
    from tiny_models import ARCHITECTURES, COMMON

    from advisor.model import decoder_layers
    from advisor.quantize.rtn import quantize_weight
    from advisor.quantize.sequential import quantize_sequential
    from advisor.schemes import get_scheme

    config_class, extra = ARCHITECTURES["gemma3_text"]
    config = getattr(transformers, config_class)(**{**COMMON, **extra, "num_hidden_layers": 6})
    assert config.layer_types[5] != config.layer_types[0]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    name = "model.layers.5.self_attn.o_proj"
    windows = [list(range(4, 100)), list(range(200, 296))]  # longer than the sliding window (64)
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.inference_mode():
        for w in windows:
            model(torch.tensor([w]))
    handle.remove()
    x = torch.cat(seen)
    expected = 2 / len(x) * x.T @ x
    got = {}
    args = get_scheme("w8a16").weights

    def record(n, weight, hessian):
        got[n] = hessian
        return quantize_weight(weight, args)

    assert decoder_layers(model)[0] == "model.layers"
    quantize_sequential(model, {name}, windows, record, bf16=False)
    torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-5)


def test_reshaped_hubc_architecture_streams_byte_for_byte(tiny_llama_dir, tmp_path):
    """A model pruned and factorized by an earlier run (hubc_llama: per-layer widths and heads, low-rank factors)
    compressed again."""
    import shutil

    from reshaped_models import reshape_every_way

    from advisor.architecture import adopt

    model = load_model(tiny_llama_dir)
    reshape_every_way(model)
    folder = tmp_path / "reshaped"
    adopt(model).save_pretrained(folder)
    for f in tiny_llama_dir.glob("tokenizer*"):
        shutil.copy(f, folder)
    memory, streamed = both_ways(folder, plan_for(folder, "w4a16", "gptq"), tmp_path)
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(memory / name, streamed / name, shallow=False), name
