"""Distillation healing: it brings a damaged student back toward its teacher on held-out text, stops at its budget
(steps, or passes over its text), and refuses a bad heal block in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import build_tiny_llama

from advisor.errors import AdvisorError
from advisor.heal import HealConfig, heal
from advisor.model import load_model


def _windows(n, length=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 1000, (length,), generator=gen).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_model(build_tiny_llama(tmp_path_factory.mktemp("m")))


def _damaged(teacher):
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        mlp = student.model.layers[0].mlp
        mlp.down_proj.weight[:, : mlp.down_proj.weight.shape[1] // 2] = 0  # half the channels cut, not refitted
    return student


def test_healing_brings_the_student_back_toward_the_teacher(teacher):
    student = _damaged(teacher)
    # The teacher's own text (a random model's): what the student must reproduce is the teacher, not random tokens.
    torch.manual_seed(0)
    own = [teacher.generate(torch.tensor([[1]]), do_sample=True, max_new_tokens=31, min_new_tokens=31,
                            pad_token_id=0)[0].tolist() for _ in range(20)]
    train, held_out = own[:16], {"held": own[16:]}
    report = heal(student, teacher, train, HealConfig(steps=40, lr=3e-3, batch=4, epochs=10), held_out)
    assert report.steps == 40 and report.tokens == 40 * 4 * 31
    assert report.kl_end < report.kl_start
    r = report.held_out["held"]
    assert abs(r["after"] - r["base"]) < abs(r["before"] - r["base"])
    assert all(not p.requires_grad for p in student.parameters())  # left as it was found: for inference


def test_lora_healing_merges_a_low_rank_update_into_the_same_parameters(teacher):
    student = _damaged(teacher)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    torch.manual_seed(0)
    own = [teacher.generate(torch.tensor([[1]]), do_sample=True, max_new_tokens=31, min_new_tokens=31,
                            pad_token_id=0)[0].tolist() for _ in range(20)]
    report = heal(student, teacher, own[:16], HealConfig(steps=40, lr=1e-2, batch=4, epochs=10, lora_rank=2),
                  {"held": own[16:]})
    assert report.lora_rank == 2 and report.kl_end < report.kl_start
    r = report.held_out["held"]
    assert abs(r["after"] - r["base"]) < abs(r["before"] - r["base"])
    # The checkpoint keeps its parameter names and shapes (nothing of the adapters is left to export).
    after = dict(student.named_parameters())
    assert list(after) == list(before) and all(after[n].shape == before[n].shape for n in before)
    assert type(student.model.layers[0].mlp.down_proj) is torch.nn.Linear
    moved = 0
    for name, p in after.items():
        delta = (p.detach().double() - before[name].double())
        if "layers." in name and name.endswith("proj.weight"):
            s = torch.linalg.svdvals(delta)
            assert s[2] <= 1e-4 * s[0], f"{name}: update of rank above 2"
            moved += s[0] > 0
        elif "layers." not in name:
            assert torch.equal(p, before[name]), f"{name} is outside the decoder layers and must stay frozen"
    assert moved > 0
    assert all(not p.requires_grad for p in student.parameters())


def test_a_healing_stopped_by_an_error_leaves_no_adapter_on_the_student(teacher, monkeypatch):
    student = _damaged(teacher)
    names = [n for n, _ in student.named_parameters()]

    def broken(*args, **kwargs):
        raise RuntimeError("optimizer failed")

    monkeypatch.setattr(torch.optim, "AdamW", broken)
    with pytest.raises(RuntimeError, match="optimizer failed"):
        heal(student, teacher, _windows(8), HealConfig(steps=2, lora_rank=2), {"held": _windows(1)})
    assert [n for n, _ in student.named_parameters()] == names
    assert all(not p.requires_grad for p in student.parameters()) and not student.training


def test_healing_stops_after_its_passes_over_the_text(teacher):
    student = _damaged(teacher)
    report = heal(student, teacher, _windows(8), HealConfig(minutes=10, batch=4, epochs=2), {"held": _windows(1)})
    assert report.steps == 4  # 2 passes × 8 windows / 4 per step, long before 10 minutes


@pytest.mark.parametrize("block, fragment", [
    ({}, "budget"),
    ({"minutes": -1}, "minutes"),
    ({"steps": 10, "kl_weight": 2}, "kl_weight"),
    ({"steps": 10, "epochs": 0}, "epochs"),
    ({"steps": 10, "learning_rate": 1}, "unknown heal keys"),
    ({"minutes": float("nan")}, "minutes"),
    ({"steps": 10, "lr": float("inf")}, "lr"),
    ({"steps": 10, "lora_rank": -4}, "lora_rank"),
    ({"steps": 10, "lora_rank": 8.5}, "lora_rank"),
])
def test_a_bad_heal_block_is_refused_in_one_line(block, fragment):
    with pytest.raises(AdvisorError, match=fragment):
        HealConfig.from_dict(block)
