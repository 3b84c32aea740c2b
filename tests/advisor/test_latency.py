"""The latency cost model: features read from a checkpoint's own files, a fit that recovers known coefficients from
stored measurements, the roofline where nothing was measured, and one-line errors where nothing can be predicted.

Checkpoints are tiny folders written here (config.json + safetensors, compressed-tensors layout for quantized
ones); measurements are `serving.store.Measurement` records in a results store under tmp_path, as `hubc bench`
writes them. Nothing is served.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from advisor.checkpoint_features import LatencyModelError, checkpoint_features
from advisor.errors import UnknownTargetError
from advisor.latency import LatencyModel, NoMeasurementsError, measured_on
from advisor.measurement import Traffic
from advisor.targets import get_target
from serving.store import LATENCY, Measurement, ResultsStore, describe

GPU = "NVIDIA H100 80GB HBM3"
TRAFFICS = [Traffic(64, 16, 1), Traffic(256, 32, 4), Traffic(512, 64, 8), Traffic(128, 128, 2)]
# The model the synthetic measurements follow: ms per byte, per FLOP, per step.
TPOT_TRUTH = {"weights dense": 1e-4, "weights w4a16": 3e-4, "kv": 1e-5, "compute": 5e-6, "overhead": 3.0,
              "layers": 0.7}
TTFT_TRUTH = {"prefill dense": 2e-8, "prefill w4a16": 4e-8, "overhead": 20.0, "weights": 5e-5}


def write_checkpoint(folder: Path, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                     head_dim: int = 16, mlp: int = 128, vocab: int = 256, tied: bool = True,
                     scheme: str | None = None, group: int = 32) -> Path:  # fmt: skip
    """A Llama-shaped checkpoint: zero weights, dense (float32, as GGUF-converted models are) or compressed-tensors
    w4a16 (int32-packed, group scales, `weight_shape`) or w8a8-int8 (int8 weights, channel scales)."""
    folder.mkdir(parents=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers,
              "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "head_dim": head_dim, "intermediate_size": mlp, "vocab_size": vocab, "tie_word_embeddings": tied}  # fmt: skip
    tensors = {"model.embed_tokens.weight": np.zeros((vocab, hidden), np.float32),
               "model.norm.weight": np.zeros(hidden, np.float32)}  # fmt: skip
    if not tied:
        tensors["lm_head.weight"] = np.zeros((vocab, hidden), np.float32)
    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
              "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
              "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp)}  # fmt: skip
    for i in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = np.zeros(hidden, np.float32)
        for name, (out, inp) in shapes.items():
            prefix = f"model.layers.{i}.{name}"
            if scheme == "w4a16":
                tensors[f"{prefix}.weight_packed"] = np.zeros((out, inp // 8), np.int32)
                tensors[f"{prefix}.weight_scale"] = np.zeros((out, inp // group), np.float32)
                tensors[f"{prefix}.weight_shape"] = np.array([out, inp], np.int64)
            elif scheme == "w8a8-int8":
                tensors[f"{prefix}.weight"] = np.zeros((out, inp), np.int8)
                tensors[f"{prefix}.weight_scale"] = np.zeros((out, 1), np.float32)
            else:
                tensors[f"{prefix}.weight"] = np.zeros((out, inp), np.float32)
    if scheme is not None:
        weights = {"num_bits": 4 if scheme == "w4a16" else 8, "type": "int", "symmetric": True,
                   "strategy": "group" if scheme == "w4a16" else "channel",
                   "group_size": group if scheme == "w4a16" else None}  # fmt: skip
        acts = (
            None
            if scheme == "w4a16"
            else {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
        )
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
        }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def truth(features, load: Traffic) -> tuple[float, float]:
    """(TTFT, TPOT) of the synthetic hardware, from the same roofline features the model fits on."""
    prefill = features.prefill_flops(load)
    ttft = (TTFT_TRUTH["overhead"] + TTFT_TRUTH["weights"] * sum(features.weight_bytes.values())
            + sum(TTFT_TRUTH[f"prefill {f}"] * flops for f, flops in prefill.items()))  # fmt: skip
    tpot = (TPOT_TRUTH["overhead"] + TPOT_TRUTH["kv"] * features.decode_kv_bytes(load)
            + TPOT_TRUTH["compute"] * sum(features.decode_flops(load).values())
            + TPOT_TRUTH["layers"] * features.layers
            + sum(TPOT_TRUTH[f"weights {f}"] * b for f, b in features.weight_bytes.items()))  # fmt: skip
    return ttft, tpot


def store_runs(store: ResultsStore, folder: Path, loads, hardware: str = GPU, dtype: str = "bfloat16",
               timing=None) -> None:  # fmt: skip
    """One latency record per traffic, as `hubc bench` stores them; times from `timing(features, load)`."""
    features = checkpoint_features(folder, dtype)
    for load in loads:
        ttft, tpot = (timing or truth)(features, load)
        store.add(Measurement(
            kind=LATENCY, checkpoint=describe(folder), traffic=str(load), hardware=hardware, engine_version="0.32.0",
            metrics={"ttft_ms_p50": ttft, "ttft_ms_p95": 1.2 * ttft, "tpot_ms_p50": tpot, "tpot_ms_p95": 1.2 * tpot},
            settings={"server": {"dtype": dtype}, "benchmark": {"tool": "vllm bench serve"}},
        ))  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> ResultsStore:
    return ResultsStore(tmp_path / "results.sqlite")


@pytest.fixture
def family(tmp_path: Path) -> dict[str, Path]:
    """Dense checkpoints of three sizes (one with a separate output head) and 4-bit versions of two of them."""
    return {
        "small": write_checkpoint(tmp_path / "small"),
        "large": write_checkpoint(tmp_path / "large", layers=4, hidden=128, kv_heads=4, mlp=256),
        "untied": write_checkpoint(tmp_path / "untied", layers=3, hidden=96, heads=6, mlp=192, tied=False),
        "small-w4": write_checkpoint(tmp_path / "small-w4", scheme="w4a16"),
        "large-w4": write_checkpoint(tmp_path / "large-w4", layers=4, hidden=128, kv_heads=4, mlp=256,
                                     scheme="w4a16"),
    }  # fmt: skip


def test_features_come_from_the_checkpoint_files(tmp_path: Path) -> None:
    dense = checkpoint_features(write_checkpoint(tmp_path / "d"))
    linear = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64)  # q, k, v, o, gate/up/down per layer
    norms = 64 + 2 * 2 * 64
    assert dense.tied_embeddings and dense.formats == () and dense.label == "bfloat16"
    assert dense.matmul_params == {"dense": linear + 256 * 64}  # the tied table is the output head
    assert dense.weight_bytes == {
        "dense": 2.0 * (linear + 256 * 64 + norms)
    }  # served in bf16, stored in fp32
    assert dense.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2  # K and V x layers x KV heads x head_dim x bf16
    assert (
        checkpoint_features(tmp_path / "d", "float32").weight_bytes["dense"]
        == 2 * dense.weight_bytes["dense"]
    )

    untied = checkpoint_features(write_checkpoint(tmp_path / "u", tied=False))
    assert (
        not untied.tied_embeddings
    )  # the input table is only gathered: read and multiplied once, as the head
    assert untied.matmul_params == dense.matmul_params and untied.weight_bytes == dense.weight_bytes

    w4 = checkpoint_features(write_checkpoint(tmp_path / "q", scheme="w4a16", group=32))
    assert w4.formats == ("w4a16",) and w4.matmul_params["w4a16"] == linear
    assert (
        w4.weight_bytes["w4a16"] == linear / 2 + 2 * linear / 32
    )  # 4 bits a weight + a bf16 scale per group
    assert w4.weight_bytes["dense"] == 2.0 * (256 * 64 + norms)
    assert w4.compute == {"dense": "bf16", "w4a16": "bf16"}
    w8 = checkpoint_features(write_checkpoint(tmp_path / "i", scheme="w8a8-int8"))
    assert (
        w8.compute["w8a8-int8"] == "int8"
        and w8.weight_bytes["w8a8-int8"] == linear + 2 * (64 + 32 + 32 + 64 + 128 * 2 + 64) * 2
    )


def test_fit_recovers_known_coefficients(store: ResultsStore, family: dict[str, Path]) -> None:
    for folder in family.values():
        store_runs(store, folder, TRAFFICS)
    model = LatencyModel.fit(store.records(kind=LATENCY, hardware=GPU), "h100", "bfloat16")
    coefficients = model.coefficients()
    assert coefficients["tpot_not_identifiable"] == [] and coefficients["ttft_not_identifiable"] == []
    assert coefficients["tpot"] == pytest.approx(TPOT_TRUTH, rel=1e-5)
    assert coefficients["ttft"] == pytest.approx(TTFT_TRUTH, rel=1e-5)
    ttft_error, tpot_error, count = model.loo_error()
    assert count == len(family) * len(TRAFFICS) and ttft_error < 1e-6 and tpot_error < 1e-6

    load = Traffic(1024, 256, 16)  # a traffic never measured
    prediction = model.predict(checkpoint_features(family["large-w4"]), load)
    assert (prediction.ttft_ms_p50, prediction.tpot_ms_p50) == pytest.approx(
        truth(checkpoint_features(family["large-w4"]), load), rel=1e-5)  # fmt: skip
    assert prediction.kind == "prediction" and prediction.basis == "measurements"
    assert prediction.measurements == 20 and prediction.hardware == [GPU] and prediction.measured is None
    assert prediction.roofline_tpot_ms is not None and prediction.roofline_tpot_ms < prediction.tpot_ms_p50

    measured = model.predict(checkpoint_features(family["small"]), TRAFFICS[1]).measured
    assert measured is not None and measured.traffic == str(TRAFFICS[1])
    assert measured.predicted_tpot_ms == pytest.approx(measured.tpot_ms, rel=1e-5)  # held out, still exact


def test_terms_the_data_cannot_separate_are_left_out(store: ResultsStore, family: dict[str, Path]) -> None:
    # One checkpoint per format and two traffic profiles: a fixed overhead cannot be told apart from the per-format
    # byte terms, nor decode compute from the KV read.
    for name in ("small", "small-w4"):
        store_runs(store, family[name], TRAFFICS[:2])
    model = LatencyModel.fit(store.records(kind=LATENCY), "h100", "bfloat16")
    coefficients = model.coefficients()
    assert set(coefficients["tpot"]) == {"weights dense", "weights w4a16", "kv"}
    assert set(coefficients["tpot_not_identifiable"]) == {"compute", "overhead", "layers"}
    for name in ("small", "small-w4"):  # the kept terms still reproduce what was measured
        features = checkpoint_features(family[name])
        for load in TRAFFICS[:2]:
            assert model.predict(features, load).tpot_ms_p50 == pytest.approx(
                truth(features, load)[1], rel=0.05
            )


def test_four_bit_is_faster_than_bf16_on_a_gpu_roofline_at_batch_1(tmp_path: Path) -> None:
    model = LatencyModel.fit([], "a10g", "bfloat16")
    load = Traffic(512, 128, 1)
    dense = model.predict(checkpoint_features(write_checkpoint(tmp_path / "d")), load)
    w4 = model.predict(checkpoint_features(write_checkpoint(tmp_path / "q", scheme="w4a16")), load)
    for p in (dense, w4):
        assert (
            p.kind == "prediction"
            and p.basis == "roofline"
            and p.measurements == 0
            and p.loo_tpot_error is None
        )
        assert (p.ttft_ms_p50, p.tpot_ms_p50) == (p.roofline_ttft_ms, p.roofline_tpot_ms)
    assert w4.tpot_ms_p50 < dense.tpot_ms_p50
    a10g = get_target("a10g")
    expected = sum(checkpoint_features(tmp_path / "d").weight_bytes.values()) + 2 * 2 * 2 * 16 * 2 * 576
    assert dense.tpot_ms_p50 == pytest.approx(expected / (a10g.memory_bandwidth_gbs * 1e9) * 1e3)


def test_a_format_without_measurements_falls_back_to_the_roofline_on_gpus(
    store: ResultsStore, family: dict[str, Path], tmp_path: Path
) -> None:
    store_runs(store, family["small"], TRAFFICS)
    model = LatencyModel.fit(store.records(kind=LATENCY), "h100", "bfloat16")
    int8 = checkpoint_features(write_checkpoint(tmp_path / "int8", scheme="w8a8-int8"))
    prediction = model.predict(int8, TRAFFICS[0])
    assert prediction.basis == "roofline" and prediction.measurements == 0
    assert model.predict(checkpoint_features(family["small"]), TRAFFICS[0]).basis == "measurements"


def test_cpu_without_measurements_says_to_run_bench(
    store: ResultsStore, family: dict[str, Path], tmp_path
) -> None:
    model = LatencyModel.fit([], "cpu", "bfloat16")
    with pytest.raises(NoMeasurementsError) as err:
        model.predict(checkpoint_features(family["small"]), Traffic())
    assert (
        "measurements only" in str(err.value)
        and "hubc bench" in str(err.value)
        and "\n" not in str(err.value)
    )

    store_runs(store, family["small"], TRAFFICS, hardware="Some CPU, 2 threads, AVX2")
    model = LatencyModel.fit(store.records(kind=LATENCY), "cpu", "bfloat16")
    assert model.predict(checkpoint_features(family["small"]), Traffic()).basis == "measurements"
    int8 = checkpoint_features(write_checkpoint(tmp_path / "int8", scheme="w8a8-int8"))
    with pytest.raises(NoMeasurementsError, match="w8a8-int8 checkpoints"):
        model.predict(int8, Traffic())


def test_records_of_another_dtype_or_a_missing_folder_are_left_out(
    store: ResultsStore, family: dict[str, Path]
) -> None:
    store_runs(store, family["small"], TRAFFICS[:2])
    store_runs(store, family["large"], TRAFFICS[:1], dtype="float32")
    gone = write_checkpoint(family["small"].parent / "gone")
    store_runs(store, gone, TRAFFICS[:1])
    for file in gone.iterdir():
        file.unlink()
    model = LatencyModel.fit(store.records(kind=LATENCY), "h100", "bfloat16")
    assert len(model.rows) == 2 and len(model.skipped) == 2
    assert any("float32" in s for s in model.skipped) and any("no config.json" in s for s in model.skipped)


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: d.mkdir(), "no config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("[1]")), "not a JSON object"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')),
     "hidden size"),
    (lambda d: (write_checkpoint(d), [f.unlink() for f in d.glob("*.safetensors")]), "no *.safetensors"),
    (lambda d: (write_checkpoint(d), (d / "model.safetensors").write_bytes(b"\x05")), "not a readable safetensors"),
    (lambda d: (write_checkpoint(d), (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "quantization_config": {"quant_method": "gptq"}}))),
     "quantization 'gptq'"),
])  # fmt: skip
def test_bad_checkpoints_give_one_line_errors(tmp_path: Path, setup, fragment: str) -> None:
    folder = tmp_path / "ckpt"
    setup(folder)
    with pytest.raises(LatencyModelError) as err:
        checkpoint_features(folder)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_target_and_bad_traffic_give_one_line_errors() -> None:
    with pytest.raises(UnknownTargetError) as err:
        LatencyModel.fit([], "tpu-v9", "bfloat16")
    assert (
        "unknown target 'tpu-v9'" in str(err.value)
        and "h100" in str(err.value)
        and "\n" not in str(err.value)
    )
    with pytest.raises(ValueError):
        Traffic.parse("in=512,batch=8")
    assert Traffic.parse("in=128,out=32,concurrency=1") == Traffic(128, 32, 1)


def test_gpu_records_are_matched_by_the_target_name() -> None:
    assert measured_on(get_target("a100-80gb"), "NVIDIA A100-SXM4-80GB")
    assert measured_on(get_target("h100"), GPU) and not measured_on(get_target("h200"), GPU)
    assert measured_on(get_target("l4"), "NVIDIA L4") and not measured_on(get_target("l4"), "NVIDIA L40S")
    assert not measured_on(get_target("cpu"), "AMD EPYC, 2 threads, AVX2")


def test_a_cost_per_layer_tells_depth_pruning_from_width_pruning(store: ResultsStore, tmp_path: Path) -> None:
    """On CPUs a decode step pays per decoder layer more than per byte: once the store holds checkpoints of other
    depths, removing layers is predicted faster than removing as many bytes across the width."""
    base = write_checkpoint(tmp_path / "base", layers=6, mlp=256)
    width = write_checkpoint(tmp_path / "width", layers=6, mlp=128)
    depth = write_checkpoint(tmp_path / "depth", layers=4, mlp=256)
    for folder in (base, width, depth):
        store_runs(store, folder, TRAFFICS, hardware="cpu-box", dtype="float32",
                   timing=lambda f, load: (10.0 + 1e-6 * sum(f.prefill_flops(load).values()),
                                           2.0 + 1e-5 * f.weight_bytes["dense"] + 4.0 * f.layers))
    model = LatencyModel.fit(store.records(kind=LATENCY, hardware="cpu-box"), "cpu", "float32")
    assert model.coefficients()["tpot"]["layers"] == pytest.approx(4.0, rel=1e-4)
    narrower = checkpoint_features(write_checkpoint(tmp_path / "narrower", layers=6, mlp=64), "float32")
    shallower = checkpoint_features(write_checkpoint(tmp_path / "shallower", layers=3, mlp=256), "float32")
    load = Traffic(64, 16, 1)
    for features in (narrower, shallower):
        assert model.predict(features, load).tpot_ms_p50 == pytest.approx(
            2.0 + 1e-5 * features.weight_bytes["dense"] + 4.0 * features.layers, rel=1e-4)
    assert model.predict(shallower, load).tpot_ms_p50 < model.predict(narrower, load).tpot_ms_p50
    assert shallower.weight_bytes["dense"] > narrower.weight_bytes["dense"]
