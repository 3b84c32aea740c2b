"""Low-rank factorization: whitened SVD at full rank is the layer itself, at low rank it loses less than plain SVD on
the activations it was calibrated on, the model runs with factorized linears, and ranks that save nothing are
refused in one line with the largest rank that does."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_llama

from advisor.actions import Factorize, StructureContext, parse_action
from advisor.actions.factorize import factorize, largest_saving_rank
from advisor.errors import ShapeError
from advisor.importance import input_statistics
from advisor.lowrank import LowRankLinear
from advisor.model import load_model, structure_of

DOWN = "model.layers.0.mlp.down_proj"


def _model(tmp_path):
    model = load_model(build_tiny_llama(tmp_path / "m"))
    structure_of(model)  # settles the attention implementation (see test_prune._model)
    return model


def _windows(n=4, length=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 1000, (length,), generator=gen).tolist() for _ in range(n)]


def _inputs(model, name, windows):
    """Every row the linear reads on `windows`."""
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.inference_mode():
        for w in windows:
            model(torch.tensor([w]), use_cache=False)
    handle.remove()
    return torch.cat(rows).double()


def test_whitened_full_rank_reproduces_the_layer(tmp_path):
    model = _model(tmp_path)
    windows = _windows()
    before = model(torch.tensor(windows[:1])).logits.detach()
    linear = model.get_submodule(DOWN)
    units = {DOWN: Factorize(rank=min(linear.in_features, linear.out_features))}
    ctx = StructureContext(windows=windows, structure=structure_of(model))
    Factorize.apply(model, units, ctx)
    assert isinstance(model.get_submodule(DOWN), LowRankLinear) and ctx.reshaped
    assert ctx.notes["factorize"][DOWN]["truncation_error"] < 1e-12
    torch.testing.assert_close(model(torch.tensor(windows[:1])).logits.detach(), before, rtol=1e-4, atol=1e-4)


def test_whitened_svd_beats_plain_svd_on_calibration_activations(tmp_path):
    model = _model(tmp_path)
    windows = _windows()
    x = _inputs(model, DOWN, windows)
    w = model.get_submodule(DOWN).weight.detach().double()
    gram = input_statistics(model, windows, {}, covariance=[DOWN])[DOWN].gram
    torch.testing.assert_close(gram, x.T @ x)
    errors = {}
    for whitened in (True, False):
        u, v, _ = factorize(w, 16, gram if whitened else None)
        errors[whitened] = (x @ (w - u @ v).T).pow(2).sum().item()
    assert errors[True] < 0.8 * errors[False]


def test_factorized_model_runs_and_notes_ranks(tmp_path):
    model = _model(tmp_path)
    names = [li.name for li in structure_of(model).linears if li.name.endswith(("gate_proj", "up_proj", "o_proj"))]
    ctx = StructureContext(windows=_windows(), structure=structure_of(model))
    Factorize.apply(model, {n: Factorize(rank=32, whitening=n.endswith("o_proj")) for n in names}, ctx)
    notes = ctx.notes["factorize"]
    assert set(notes) == set(names) and all(0 < n["truncation_error"] < 1 for n in notes.values())
    assert model.get_submodule("model.layers.0.mlp.gate_proj").v.weight.shape == (32, 64)
    assert torch.isfinite(model(torch.tensor(_windows(1))).logits).all()


def test_plain_svd_needs_no_calibration(tmp_path):
    model = _model(tmp_path)
    ctx = StructureContext(windows=None, structure=structure_of(model))
    Factorize.apply(model, {DOWN: Factorize(rank=32, whitening=False)}, ctx)
    with pytest.raises(Exception, match="calibration"):
        Factorize.apply(model, {"model.layers.1.mlp.down_proj": Factorize(rank=32)}, ctx)


def test_specs_round_trip_and_bad_ranks_are_refused(tmp_path):
    assert parse_action({"factorize": 64}) == Factorize(64, True)
    plain = parse_action({"factorize": {"rank": 64, "whitening": False}})
    assert plain == Factorize(64, False) and not plain.calibrates and parse_action(plain.to_spec()) == plain
    for bad in (0, -32, 48, True, "64", {"rank": 64, "whiten": True}, {"rank": 64, "whitening": "yes"}):
        with pytest.raises(ShapeError):
            parse_action({"factorize": bad})
    structure = structure_of(_model(tmp_path))
    Factorize(32).check(DOWN, structure, None)  # 64×128: 32·192 < 8192
    with pytest.raises(ShapeError, match="stores more") as err:
        Factorize(64).check(DOWN, structure, None)
    assert "use rank 32 or less" in str(err.value) and "\n" not in str(err.value)


def test_largest_saving_rank():
    assert largest_saving_rank(576, 1536) == 416 and largest_saving_rank(576, 576) == 256
    assert largest_saving_rank(32, 32) == 0
    assert not LowRankLinear.saves_bytes(576, 576, 288) and LowRankLinear.saves_bytes(576, 576, 256)


def test_prune_and_factorize_through_compress(tmp_path):
    """The recipe path: resolve a plan with prune and factorize actions, compress applies them (pruning first) and
    rebuilds the model in the architecture that states its per-layer shapes."""
    from advisor.calibrate import CalibConfig, Calibration
    from advisor.compress import compress
    from advisor.plan import resolve
    from advisor.recipe import Recipe
    from advisor.targets import get_target

    model = _model(tmp_path)
    windows = _windows()
    actions = {"model.layers.0": {"prune": {"mlp": 0.25, "heads": 0.5}}, DOWN.replace(".0.", ".1."): {"factorize": 32}}
    recipe = Recipe(scheme="dense", target="cpu", actions=actions, calibration={"windows": 4, "seq_len": 64})
    plan = resolve(recipe, structure_of(model), get_target("cpu"))
    done = compress(model, plan, Calibration(CalibConfig(windows=4, seq_len=64), windows))
    new = done.model
    assert new.config.model_type == "hubc_llama"
    assert new.model.layers[0].mlp.down_proj.in_features == 96 and new.model.layers[1].mlp.down_proj.in_features == 128
    assert new.model.layers[0].self_attn.q_proj.out_features == 64
    assert isinstance(new.get_submodule("model.layers.1.mlp.down_proj"), LowRankLinear)
    assert set(done.report.structure) == {"prune", "factorize"}
    assert torch.isfinite(new(torch.tensor(windows[:1])).logits).all()


def test_the_search_factorizes_as_asked(tmp_path):
    """A factorize request keeps its whitening choice in every action it makes (a plain-SVD request must not come
    back whitened), and a uniform allocation removes about the same share of every linear it factorizes."""
    from advisor.actions.base import parse_action as parse
    from advisor.structure_search import choose

    model = _model(tmp_path)
    structure = structure_of(model)
    windows = _windows()
    plain = choose(model, structure, {"factorize": 0.2, "whitening": False}, windows, {})
    assert plain and all(not parse(a).whitening for a in plain.values())
    whitened = choose(model, structure, {"factorize": 0.2}, windows, {})
    assert whitened and all(parse(a).whitening for a in whitened.values())
    uniform = choose(model, structure, {"factorize": 0.5, "allocation": "uniform"}, windows, {})
    sizes = {li.name: (li.out_features, li.in_features) for li in structure.linears}
    assert len(uniform) > 2
    for name, action in uniform.items():
        m, n = sizes[name]
        rank = parse(action).rank
        assert rank % 32 == 0 and rank * (m + n) < m * n
        assert abs(rank * (m + n) / (m * n) - 0.5) <= 32 * (m + n) / (m * n)  # within one rank step of the share
