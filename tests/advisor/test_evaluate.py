"""Evaluation against the base: the lockstep scoring `hubc optimize` uses gives the exact numbers of the full
next-token distributions, and only per-position numbers are kept."""

from __future__ import annotations

import math

import pytest
import torch

from advisor import evaluate as ev


def _pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=300, head_dim=16)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    variant = LlamaForCausalLM(cfg).eval()
    variant.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in variant.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return base, variant


def _windows(n=3, length=40):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (length,), generator=g).tolist() for _ in range(n)]


def test_lockstep_scores_equal_the_full_distribution_numbers():
    base, variant = _pair()
    windows = _windows()
    var_scores, base_scores = ev.score(variant, windows, "pair", reference=base)

    # The same numbers computed the direct way, from every window's full distributions at once.
    b = [ev.next_token_logprobs(base, w) for w in windows]
    v = [ev.next_token_logprobs(variant, w) for w in windows]
    kl = sum((bl.exp() * (bl - vl)).sum().item() for bl, vl in zip(b, v)) / sum(len(w) - 1 for w in windows)
    agree = torch.cat([bl.argmax(-1) == vl.argmax(-1) for bl, vl in zip(b, v)]).float().mean().item()
    nll = -sum(vl.gather(1, torch.tensor(w[1:])[:, None]).sum().item() for vl, w in zip(v, windows))

    m = ev.measure(var_scores, "random", "float32")
    assert m.kl == pytest.approx(kl, rel=1e-5) and m.kl > 0
    assert m.top1_agreement == pytest.approx(agree)
    assert m.perplexity == pytest.approx(math.exp(nll / m.tokens), rel=1e-6)
    assert m.tokens == sum(len(w) - 1 for w in windows)

    # The reference's own scores are those of scoring it alone, and agree with the kept-logprobs path.
    alone, _ = ev.score(base, windows, "base")
    assert torch.equal(base_scores.top1, alone.top1)
    assert ev.perplexity(base_scores) == pytest.approx(ev.perplexity(alone))
    assert ev.measure(ev.scores_of(v, windows, reference=b), "random", "float32").kl == pytest.approx(m.kl, rel=1e-6)
    assert base_scores.top1_per_window(windows) == [bl.argmax(-1).tolist() for bl in b]


def test_a_model_scored_against_itself_has_no_divergence():
    base, _ = _pair()
    scores, _ = ev.score(base, _windows(2), "self", reference=base)
    m = ev.measure(scores, "random", "float32")
    assert m.kl == pytest.approx(0.0, abs=1e-6)
    assert m.top1_agreement == 1.0
    assert 0.0 <= m.ece <= 1.0


def test_scores_keep_a_few_numbers_per_position_not_the_distributions():
    base, variant = _pair()
    windows = _windows(2)
    scores, ref = ev.score(variant, windows, "pair", reference=base)
    n = sum(len(w) - 1 for w in windows)
    for s in (scores, ref):
        for name in ("targets", "target_logprob", "top1", "top1_logprob"):
            assert getattr(s, name).shape == (n,)
    assert scores.kl.shape == (n,) and scores.agrees.shape == (n,)
    assert ref.kl is None and ev.measure(ref, "random", "float32").kl is None
