"""Calibration text for structure and healing: windows the base model samples itself, sampled once and shared."""

from __future__ import annotations

import pytest
from helpers import build_tiny_llama
from transformers import AutoTokenizer

from advisor import calibrate
from advisor.calibrate import Calibration, cached_windows, generate_windows
from advisor.model import load_model
from advisor.recipe import Recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_llama(tmp_path_factory.mktemp("m"))
    return load_model(folder), AutoTokenizer.from_pretrained(folder)


def test_self_generated_windows_are_whole_bos_led_and_repeat_with_their_seed(tiny):
    model, tokenizer = tiny
    windows = generate_windows(model, tokenizer, 3, 24, seed=5)
    assert len(windows) == 3 and all(len(w) == 24 for w in windows)
    assert all(w[0] == tokenizer.bos_token_id for w in windows)
    assert generate_windows(model, tokenizer, 3, 24, seed=5) == windows
    assert generate_windows(model, tokenizer, 3, 24, seed=6) != windows


def test_a_second_run_reads_the_samples_of_the_first_and_redraws_a_damaged_file(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    folder = tmp_path / "samples" / "abc123"
    drawn = cached_windows(folder, model, tokenizer, 3, 24)
    assert drawn == generate_windows(model, tokenizer, 3, 24)
    [file] = folder.iterdir()
    assert not [f for f in folder.iterdir() if f.name.startswith(".")]  # nothing half-written left

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(calibrate, "generate_windows", no_sampling)
    assert cached_windows(folder, model, tokenizer, 3, 24) == drawn
    with pytest.raises(AssertionError, match="sampled again"):  # other settings: another draw
        cached_windows(folder, model, tokenizer, 3, 24, temperature=0.7)
    monkeypatch.undo()
    for damage in ("[[1, 2", "[[1, 2, 3]]", "[" + ",".join(["[" + ",".join(["999999"] * 24) + "]"] * 3) + "]"):
        file.write_text(damage)
        assert cached_windows(folder, model, tokenizer, 3, 24) == drawn
    assert cached_windows(None, model, tokenizer, 3, 24) == drawn


def test_sampling_leaves_the_model_it_samples_untouched(tiny, monkeypatch):
    """Where bf16 is native, samples come from a bf16 copy: the float32 model that is then pruned and used as the
    healing teacher keeps its dtype and its weights."""
    import torch

    import advisor.heal

    model, tokenizer = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for dtype in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(advisor.heal, "fast_dtype", lambda dtype=dtype: dtype)
        windows = generate_windows(model, tokenizer, 2, 12, seed=3)
        assert len(windows) == 2 and all(len(w) == 12 for w in windows)
        assert generate_windows(model, tokenizer, 2, 12, seed=3) == windows
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], w) for n, w in before.items())


def test_self_generated_windows_start_from_random_ordinary_tokens(tiny):
    """Each sample starts from its own token, never a special one: a small model sampled from BOS alone drifts into
    the same few registers."""
    model, tokenizer = tiny
    windows = generate_windows(model, tokenizer, 8, 6, seed=1)
    firsts = [w[1] for w in windows]
    assert not set(firsts) & set(tokenizer.all_special_ids)
    assert len(set(firsts)) >= 6
    assert all(len(w) == 6 for w in generate_windows(model, tokenizer, 2, 6, start="bos"))
    with pytest.raises(ValueError):
        generate_windows(model, tokenizer, 1, 6, start="middle")


def test_healing_text_takes_bos_led_pieces_of_the_calibration_samples(tiny):
    model, tokenizer = tiny
    recipe = Recipe(scheme="dense", target="cpu",
                    calibration={"text": "wikitext2-valid", "windows": 2, "seq_len": 32, "self_generated": 2},
                    heal={"steps": 1, "seq_len": 16, "windows": 3, "self_generated": 4})
    calib = Calibration.of(recipe, tokenizer, model)
    sampled = calib.windows[2:]
    assert len(calib.windows) == 4 and [len(w) for w in sampled] == [32, 32]
    text, own = calib.heal[:3], calib.heal[3:]
    assert len(text) == 3 and len(own) == 4 and all(len(w) == 16 for w in calib.heal)
    assert all(w[0] == tokenizer.bos_token_id for w in own)
    # The first piece of each sample is its head; the second continues it after a BOS.
    assert own[0] == sampled[0][:16] and own[1][1:] == sampled[0][17:32]


def test_several_calibration_texts_are_taken_in_turn(tmp_path):
    """Windows come from each text in turn (half each of two), a short text leaves the rest to the others (or, as
    healing takes them, limits every text to its count), and a text that fills no window is named."""
    from helpers import tiny_tokenizer

    from advisor.calibrate import text_windows
    from advisor.errors import AdvisorError

    tokenizer = tiny_tokenizer(1024)
    a, b, short, empty = (tmp_path / n for n in ("a.txt", "b.txt", "short.txt", "empty.txt"))
    a.write_text(" ".join(f"w{i % 200}" for i in range(400)))  # windows differ from each other
    b.write_text(" ".join(f"w{200 + i % 50}" for i in range(400)))
    short.write_text("the quick brown fox " * 10)
    empty.write_text("paris")
    only_a = text_windows(tokenizer, [str(a)], 32, 6)
    only_b = text_windows(tokenizer, [str(b)], 32, 6)
    both = text_windows(tokenizer, [str(a), str(b)], 32, 6)
    assert both == [only_a[0], only_b[0], only_a[1], only_b[1], only_a[2], only_b[2]]
    filled = text_windows(tokenizer, [str(short), str(a)], 32, 6)
    assert len(filled) == 6 and sum(w in only_a for w in filled) == 5
    balanced = text_windows(tokenizer, [str(short), str(a)], 32, 6, balanced=True)  # healing: as much of each
    assert len(balanced) == 2 and balanced[1] == only_a[0]
    with pytest.raises(AdvisorError, match="calibration text empty.txt is shorter than one window"):
        text_windows(tokenizer, [str(a), str(empty)], 32, 6)
