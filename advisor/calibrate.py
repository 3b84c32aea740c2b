"""Calibration: run text through the full-precision model and record what each linear layer sees.

Per input channel absolute maxima (for outlier smoothing), mean magnitudes (for activation-aware scaling) and a fixed random sample of input rows (to score
candidate transforms against the layer's real inputs) are kept per linear layer.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm


def text_names(text) -> list[str]:
    """A calibration `text` (one name, or a list or tuple of them) as a list of names."""
    return list(text) if isinstance(text, (list, tuple)) else [text]


@dataclass
class CalibConfig:
    """Which text calibrates, and how much of it."""

    text: str | list[str] = "wikitext2-valid"
    """A shipped text name (wikitext2-valid) or a path to a UTF-8 file, or a list of them (their windows taken in
    turn); never the evaluation text."""
    windows: int = 16
    seq_len: int = 512
    sample_rows: int = 2048
    """Input rows kept per linear layer for scoring transforms (smoothing's choice of strength, scored on these rows). On
    the demo's AVX2 W8A8 default, 2048 rows against 512: Δppl +0.70% / +0.99% against +1.12% / +1.58% (wikitext-2 /
    licenses.txt) at the same quantization time; 8192 gained nothing more (benchmarks/results/default_method_cpu.md,
    rows gptq-rows512, gptq-rows2048, gptq-rows8192 on AMD EPYC)."""
    self_generated: int = 0
    """Windows of text the base model samples itself, added to `text`'s. Structure chosen on one domain overfits it
    (benchmarks/results/structure_calibration.md): the model's own text covers what it knows, with no dataset."""

    @property
    def texts(self) -> list[str]:
        return text_names(self.text)

    @classmethod
    def from_dict(cls, data) -> CalibConfig:
        """A recipe's `calibration` block, checked field by field (before any model is loaded)."""
        from advisor.errors import AdvisorError

        if not isinstance(data, dict):
            raise AdvisorError(f"recipe `calibration` must be a mapping {{text, windows, seq_len}}, not {data!r}")
        known = {"text", "windows", "seq_len", "sample_rows", "self_generated"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdvisorError(f"unknown calibration keys: {', '.join(unknown)}", hint=f"known: {', '.join(sorted(known))}")
        config = cls(**data)
        texts = config.texts
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise AdvisorError(f"calibration `text` must name a text or a file (or a list of them), not "
                               f"{config.text!r}")
        for key in ("windows", "seq_len", "sample_rows", "self_generated"):
            value = getattr(config, key)
            low = 0 if key == "self_generated" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AdvisorError(f"calibration `{key}` must be a whole number ≥ {low}, not {value!r}")
        return config


@dataclass
class Calibration:
    """The calibration text, tokenised once and shared by every step that calibrates."""

    config: CalibConfig
    windows: list[list[int]]
    heal: list[list[int]] = field(default_factory=list)
    """Training windows for distillation healing (the recipe's `heal` block): the calibration text and the base
    model's own samples, mixed."""

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    @classmethod
    def of(cls, recipe, tokenizer, model=None, samples_cache: Path | None = None) -> Calibration | None:
        """The recipe's calibration windows, or None when the recipe calibrates nothing. `model` (the unchanged base)
        samples the self-generated windows when the recipe asks for them; `samples_cache`: a folder of this base
        model's earlier samples (`cached_windows`)."""
        if not recipe.calibration:
            return None
        config = CalibConfig.from_dict(recipe.calibration)
        windows = calibration_windows(tokenizer, config)
        hc = None
        if recipe.heal:
            from advisor.heal import HealConfig

            hc = HealConfig.from_dict(recipe.heal)
        wanted_heal = hc.self_generated if hc else 0
        samples: list[list[int]] = []
        if config.self_generated or wanted_heal:
            if model is None:
                from advisor.errors import AdvisorError

                raise AdvisorError("self-generated calibration text needs the base model",
                                   hint="pass the model to Calibration.of")
            # Sampled once, at the longer length, and shared: sampling is the slow part (one forward per token), a
            # long sample cut in pieces gives healing several windows, and both uses want the base model's own
            # distribution.
            length = max(config.seq_len if config.self_generated else 0, hc.seq_len if wanted_heal else 0)
            pieces = max(1, length // hc.seq_len) if wanted_heal else 1
            count = max(config.self_generated, -(-wanted_heal // pieces))
            samples = cached_windows(samples_cache, model, tokenizer, count, length)
        windows += [s[: config.seq_len] for s in samples[: config.self_generated]]
        heal = []
        if hc:

            # Healing trains on every text equally: a short text of the user's domain is not drowned by a long
            # general one (the calibration windows take what each text has).
            heal = text_windows(tokenizer, config.texts, hc.seq_len, hc.windows, balanced=True)
            heal += heal_pieces(samples, hc.seq_len)[:wanted_heal]
        return cls(config, windows, heal)


def heal_pieces(samples: list[list[int]], seq_len: int) -> list[list[int]]:
    """Self-generated samples cut into healing windows of `seq_len` tokens, each led by BOS like the text windows
    (the samples' own first token; later pieces give up one sampled token for it)."""
    pieces = []
    for sample in samples:
        bos = sample[0]
        for j in range(0, len(sample) - seq_len + 1, seq_len):
            pieces.append(sample[j: j + seq_len] if j == 0 else [bos] + sample[j + 1: j + seq_len])
    return pieces


@dataclass
class LinearStats:
    absmax: torch.Tensor
    """Per input channel max |x| over every calibration token."""
    abssum: torch.Tensor
    """Per input channel sum of |x| over every calibration token (with `rows`: the mean magnitude AWQ scales by)."""
    rows: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)


def calibration_windows(tokenizer, config: CalibConfig) -> list[list[int]]:
    """The calibration text's windows (fewer than `windows` where the text is shorter; an error where it does not
    fill one)."""
    return text_windows(tokenizer, config.texts, config.seq_len, config.windows)


def text_windows(tokenizer, texts: list[str], seq_len: int, count: int, balanced: bool = False) -> list[list[int]]:
    """Up to `count` windows of `seq_len` tokens from the texts, taken from each in turn (two texts: half each,
    where both are long enough; a shorter one leaves the rest to the others, unless `balanced`: then every text
    gives as many windows as the shortest, so none outweighs another). A text that does not fill one window is an
    error naming it."""
    from advisor.errors import AdvisorError
    from advisor.evaluate import make_windows, read_text, text_label

    per_text = []
    for name in texts:
        _, text = read_text(name)
        try:
            per_text.append(make_windows(tokenizer, text, seq_len, count))
        except AdvisorError:
            raise AdvisorError(f"the calibration text {text_label(name)} is shorter than one window of {seq_len} "
                               "tokens", hint=f"calibrate on a longer text (hubc reads up to {count} × {seq_len} "
                                              "tokens)") from None
    if balanced:
        shortest = min(len(windows) for windows in per_text)
        per_text = [windows[:shortest] for windows in per_text]
    taken = [w for row in itertools.zip_longest(*per_text) for w in row if w is not None]
    return taken[:count]


# How the base model samples its own text. Sampled from BOS alone at temperature 1 over the whole vocabulary, a small
# model drifts into a few registers and into noise; a random first token and nucleus sampling (top-p 0.95) spread the
# samples over what the model knows. Demo model, 20% pruned on 16 windows of wikitext-2 valid + 16 sampled
# (benchmarks/results/structure_calibration.md): licenses.txt +135.8% → +115.3% before healing and +87.8% →
# +80.8% after 30 steps of it, wikitext-2 test unchanged (+36.5% / +36.6%, +4.4% / +4.3%).
SAMPLE_TOP_P = 0.95
SAMPLE_START = "random"


@torch.inference_mode()
def generate_windows(model, tokenizer, count: int, seq_len: int, seed: int = 0, batch: int = 16,
                     start: str = SAMPLE_START, top_p: float = SAMPLE_TOP_P,
                     temperature: float = 1.0) -> list[list[int]]:
    """`count` windows of `seq_len` tokens the model samples itself (at `temperature`, nucleus `top_p`), each led by BOS
    like the text windows; `start` `random`: BOS then a token drawn uniformly from the vocabulary (special tokens
    excepted), `bos`: BOS alone. Seeded: the same model gives the same windows."""
    from advisor.heal import fast_dtype

    if start not in ("random", "bos"):
        raise ValueError(f"start must be random or bos, not {start!r}")
    dtype = fast_dtype()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    vocab = min(len(tokenizer), model.config.vocab_size)
    special = torch.tensor(sorted({i for i in tokenizer.all_special_ids if i < vocab}), dtype=torch.long)
    ordinary = torch.ones(vocab, dtype=torch.bool)
    ordinary[special] = False
    firsts = ordinary.nonzero().flatten()
    sampler = bf16_sampler(model) if dtype == torch.bfloat16 else model
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out: list[list[int]] = []
    try:
        with tqdm(total=count, desc="sampling self-generated calibration text", unit="window", leave=False) as bar:
            while len(out) < count:
                n = min(batch, count - len(out))
                ids = torch.full((n, 1), bos, dtype=torch.long)
                if start == "random":
                    ids = torch.cat([ids, firsts[torch.randint(0, len(firsts), (n, 1))]], 1)
                new = seq_len - ids.shape[1]
                # No early stop: an EOS mid-sample is kept (the model continues after it, as it would in a stream).
                # In bf16 where this CPU computes bf16 natively (one forward per token: the slow part of structure
                # calibration); the samples are training text, not a measurement. Autocast covers a model that stayed
                # float32.
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    sampled = sampler.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                             temperature=temperature,
                                             top_k=0, top_p=top_p, max_new_tokens=new, min_new_tokens=new,
                                             pad_token_id=bos, eos_token_id=None) if new > 0 else ids
                out += [row.tolist() for row in sampled[:, :seq_len]]
                bar.update(n)
    finally:
        torch.random.set_rng_state(gen_state)
    return out


def cached_windows(folder: Path | None, model, tokenizer, count: int, seq_len: int, **sampling) -> list[list[int]]:
    """`generate_windows(model, tokenizer, count, seq_len, **sampling)`, kept in `folder` (one per base checkpoint,
    named by its content fingerprint) under every setting the draw depends on: a second variant of the same model
    (`hubc watch` builds several per upload) reads the first's samples instead of sampling again, one forward per
    token, minutes on a CPU. A file that does not read back as `count` windows of `seq_len` token ids is drawn
    again and replaced; it is written whole or not at all."""
    from advisor.heal import fast_dtype

    if folder is None:
        return generate_windows(model, tokenizer, count, seq_len, **sampling)
    settings = {"seed": 0, "start": SAMPLE_START, "top_p": SAMPLE_TOP_P, "temperature": 1.0, **sampling}
    name = "-".join([f"{count}x{seq_len}", *(f"{k}{v}" for k, v in sorted(settings.items())),
                     str(fast_dtype()).removeprefix("torch.")]) + ".json"
    path = Path(folder) / name
    vocab = max(len(tokenizer), model.config.vocab_size)
    try:
        windows = json.loads(path.read_text())
        if isinstance(windows, list) and len(windows) == count and all(
                isinstance(w, list) and len(w) == seq_len
                and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in w)
                for w in windows):
            return windows
    except (OSError, ValueError):
        pass
    windows = generate_windows(model, tokenizer, count, seq_len, **settings)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(windows))
        os.replace(partial, path)
    except OSError:
        pass  # a cache that cannot be written only costs the next run its sampling time
    return windows


def bf16_sampler(model):
    """A bf16 copy of a float32 `model` to sample from, where it fits: autocast would recast every weight at every
    generated token. The model itself where it is bf16 already, or where the copy would take more than a quarter of
    the free memory."""
    import copy

    import psutil

    if not any(p.dtype == torch.float32 for p in model.parameters()):
        return model
    copy_bytes = sum(p.numel() for p in model.parameters()) * 2
    if copy_bytes * 4 > psutil.virtual_memory().available:
        return model
    return copy.deepcopy(model).to(torch.bfloat16)


@torch.inference_mode()
def collect(model, names: list[str], windows: list[list[int]], sample_rows: int, seed: int = 0) -> dict[str, LinearStats]:
    """One forward pass per window with hooks on the named linear layers."""
    modules = dict(model.named_modules())
    stats: dict[str, LinearStats] = {}
    per_window = max(1, sample_rows // max(1, len(windows)))
    gen = torch.Generator().manual_seed(seed)
    handles = []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            ax = x.abs()
            amax, asum = ax.amax(0), ax.sum(0)
            st = stats.get(name)
            if st is None:
                stats[name] = st = LinearStats(amax, asum)
            else:
                torch.maximum(st.absmax, amax, out=st.absmax)
                st.abssum += asum
            st.rows += x.shape[0]
            idx = torch.randint(0, x.shape[0], (min(per_window, x.shape[0]),), generator=gen)
            st.sample.append(x[idx].clone())

        return fn

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        for w in tqdm(windows, desc="calibrating", unit="window", leave=False):
            model(torch.tensor([w]))
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        st.sample = [torch.cat(st.sample)]
    return stats
