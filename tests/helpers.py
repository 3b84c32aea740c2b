"""Test helpers shared across the test tree: the tiny Llama every test builds, a noisy copy of it, and the scan for
vLLM processes a test left behind.

tests/ is on sys.path (pytest inserts the folder of the rootdir-less conftest.py), so tests import this as `helpers`.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

VOCAB = 1024


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A word-level tokenizer built in code (no downloads): special tokens, the words of a small text, then letters,
    letter pairs and w<N> words until it has exactly `vocab_size` entries, so every id the model can emit decodes to
    text. Ids 0-3 are <unk>, <s>, </s>, <pad>; encoding prepends <s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    text = (
        "the quick brown fox jumps over the lazy dog . a model is compressed to run on a small gpu , "
        "and its quality is measured before it is pushed to the hub ! what is the capital of france ? "
        "paris is the capital of france . one two three four five six seven eight nine ten"
    )
    words = list(dict.fromkeys(text.split()))
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    fillers = letters + [a + b for a in letters for b in letters] + [f"w{i}" for i in range(vocab_size)]
    tokens = list(dict.fromkeys(specials + words + fillers))[:vocab_size]
    assert len(tokens) == vocab_size
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_tiny_llama(folder: Path, head_dim: int = 32, initializer_range: float = 0.2) -> Path:
    """A complete LlamaForCausalLM folder that transformers loads and vLLM serves on CPU: random weights (seed 0),
    hidden 64, MLP 128, 2 layers, 4 heads, 2 KV heads, vocab 1024, safetensors and a word-level tokenizer; < 1 MB.

    head_dim is 32, not 64/4 = 16: vLLM's CPU attention supports head sizes 32, 64, 80, ... and fails on 16 only at
    the first forward (a test builds one with head_dim=16 on purpose). The init is wider than transformers' default
    (std 0.2, not 0.02) so next-token distributions are peaked: the argmax is not decided by float noise, and a
    perturbed copy has a measurably worse perplexity.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
        initializer_range=initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # safetensors is the only format transformers 5 writes
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tiny_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


def trained_copy(base: Path, folder: Path, steps: int = 200) -> Path:
    """The base trained (Adam, next-token loss) until it has nearly memorised the first 64-token windows of both
    shipped evaluation texts: near its optimum there, any change to its weights raises its perplexity on them, as
    quantization does a real model's (a random model's perplexity may as well fall). About 10 s on 2 cores."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from advisor.evaluate import make_windows, read_text

    shutil.copytree(base, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = torch.tensor([w for name in ("wikitext2-test", "licenses")
                            for w in make_windows(tokenizer, read_text(name)[1], 64, 4)])
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(windows, labels=windows).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(folder)
    return folder


def perturbed_copy(base: Path, folder: Path, scale: float) -> Path:
    """The base with noise added to every weight: a 'variant' with the same tokenizer and a worse perplexity."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, folder)
    weights = load_file(base / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    noisy = {k: v + scale * torch.randn(v.shape, generator=generator) * v.std() for k, v in weights.items()}
    save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def tree_of(pid: int) -> list[psutil.Process]:
    """The process and all its descendants, now (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def leftovers(
    snapshot: list[psutil.Process],
    *,
    pgid: int | None = None,
    port: int | None = None,
    paths: tuple[Path, ...] = (),
) -> list[str]:
    """Processes still running (zombies aside) that a test must not leave behind, as 'PID NAME' lines: any of the
    snapshot, any in process group `pgid`, and any whose command line names `--port PORT` or one of `paths`.

    A snapshot alone misses children started after it was taken (or reparented to init), hence the scan of every
    process for the server's group, port and model folders.
    """
    found = {}
    for proc in snapshot:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                found[proc.pid] = proc.name()
        except psutil.Error:
            pass
    needles = [f"--port {port}"] if port is not None else []
    needles += [str(p) for p in paths]
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            in_group = pgid is not None and os.getpgid(proc.pid) == pgid
            if in_group or any(needle in cmdline for needle in needles):
                found[proc.pid] = proc.info["name"]
        except (psutil.Error, ProcessLookupError):
            pass
    return [f"{pid} {name}" for pid, name in sorted(found.items())]


def cpu_served_hardware() -> str:
    """This machine as the `cpu` target's vLLM servers run on it (oneDNN capped where the target or $HUBC_CPU_ISA
    needs it): the hardware `hubc optimize` and `hubc predict` store and look up latency records under."""
    from advisor.targets import get_target
    from serving.store import hardware

    return hardware(env=get_target("cpu").serve_env)
