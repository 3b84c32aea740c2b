"""Quality of a compressed model against its base, teacher-forced on held-out text: perplexity, KL divergence of
next-token distributions, top-1 agreement and expected calibration error."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from advisor.errors import AdvisorError
from advisor.measurement import QualityMeasurement, hardware

SHIPPED_TEXTS = {
    "wikitext2-test": "wikitext2-test.txt",
    "licenses": "licenses.txt",
    "wikitext2-valid": "wikitext2-valid.txt",  # calibration text: never evaluate on it
}
CALIBRATION_TEXT = "wikitext2-valid.txt"


@dataclass
class EvalConfig:
    """Which text, and how much of it, quality is measured on."""

    texts: tuple[str, ...] = ("wikitext2-test", "licenses")
    """Names of texts shipped with hubc (wikitext2-test, licenses) or paths to UTF-8 text files."""
    seq_len: int = 512
    """Tokens per window (each window is scored independently, teacher-forced)."""
    windows: int = 16
    """Windows per text, taken from its start. 4 are too few to judge a 1% change: on the demo model's W8A8 variant
    licenses.txt was served at +1.08% and evaluated at +0.60% on 4 windows, +0.59% and +0.58% on 40."""


@dataclass
class EvalText:
    name: str
    windows: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(w) - 1 for w in self.windows)


# The quality kind of hubc's one measurement record (advisor.measurement), under the name callers of this module use.
Measurement = QualityMeasurement


@dataclass
class TextResult:
    """The base and variant measured on one text, side by side."""

    text: str
    base: Measurement
    variant: Measurement
    served_base: Measurement | None = None
    served_variant: Measurement | None = None
    extra: dict = field(default_factory=dict)

    @property
    def delta_ppl(self) -> float:
        return self.variant.perplexity / self.base.perplexity - 1.0


def text_label(name: str | list[str]) -> str:
    """What a card or summary calls a text (or several): a shipped text's name, a file's name (never the local
    path)."""
    if isinstance(name, (list, tuple)):
        return " + ".join(text_label(n) for n in name)
    return name if name in SHIPPED_TEXTS else Path(name).name


def read_text(name: str) -> tuple[str, str]:
    """A shipped text by name, or a user file; returns (label, content)."""
    if name in SHIPPED_TEXTS:
        return name, resources.files("advisor").joinpath("data", SHIPPED_TEXTS[name]).read_text(encoding="utf-8")
    path = Path(name).expanduser()
    try:
        return path.name, path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdvisorError(
            f"cannot read text '{name}' ({exc.__class__.__name__})",
            hint=f"use one of {', '.join(SHIPPED_TEXTS)} or a path to a UTF-8 text file",
        ) from exc


def make_windows(tokenizer, text: str, seq_len: int, windows: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of `seq_len` tokens from the start of the text, each led by BOS when the
    tokenizer has one (so every engine sees the same ids)."""
    if windows < 1 or seq_len < 2:
        raise AdvisorError(f"cannot evaluate {windows} window(s) of {seq_len} tokens",
                           hint="use at least 1 window of at least 2 tokens")
    # Tokenize only as much text as the windows need (a whole corpus takes long on big vocabularies).
    budget = seq_len * windows * 8
    ids = tokenizer(text[:budget], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    body = seq_len - (1 if bos is not None else 0)
    out = []
    for i in range(windows):
        chunk = ids[i * body : (i + 1) * body]
        if len(chunk) < body:
            break
        out.append(([bos] if bos is not None else []) + chunk)
    if not out:
        raise AdvisorError(f"the text is shorter than one window of {seq_len} tokens",
                           hint="use a longer text or a smaller --seq-len")
    return out


def hardware_name() -> str:
    """The hardware transformers evaluates on (advisor.measurement.hardware), with torch's thread count."""
    return hardware(threads=torch.get_num_threads())


@dataclass
class TokenScores:
    """What a Measurement needs from one model on one text: a few numbers per scored position. The next-token
    distributions themselves (positions × vocabulary: 4 GB for 40×512 tokens of a 49k vocabulary, 21 GB with a 256k
    one) are never kept; KL is taken window by window while both distributions exist (`score`)."""

    targets: torch.Tensor
    """[N] the text's actual next tokens."""
    target_logprob: torch.Tensor
    """[N] the model's log-probability of each of them."""
    top1: torch.Tensor
    """[N] the model's most likely next token."""
    top1_logprob: torch.Tensor
    """[N] its log-probability (the model's confidence)."""
    kl: torch.Tensor | None = None
    """[N] KL(reference ‖ model) at each position, when scored against a reference."""
    agrees: torch.Tensor | None = None
    """[N] whether the model's top-1 equals the reference's."""

    @classmethod
    def of(cls, logprobs: torch.Tensor, window: list[int], reference: torch.Tensor | None = None) -> TokenScores:
        """From one window's next-token log-probabilities [n-1, vocab] (and the reference's, same shape)."""
        targets = torch.tensor(window[1:])
        top = logprobs.max(-1)
        kl = agrees = None
        if reference is not None:
            kl = (reference.exp() * (reference - logprobs)).sum(-1)
            agrees = reference.argmax(-1) == top.indices
        return cls(targets, logprobs.gather(1, targets[:, None])[:, 0], top.indices, top.values, kl, agrees)

    @classmethod
    def cat(cls, parts: list[TokenScores]) -> TokenScores:
        def joined(name):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        return cls(*(joined(f) for f in ("targets", "target_logprob", "top1", "top1_logprob", "kl", "agrees")))

    def top1_per_window(self, windows: list[list[int]]) -> list[list[int]]:
        return [t.tolist() for t in self.top1.split([len(w) - 1 for w in windows])]


@torch.inference_mode()
def next_token_logprobs(model, window: list[int]) -> torch.Tensor:
    """Log-probabilities of every next token at positions 0..n-2 of one window, float32 on the CPU."""
    return torch.log_softmax(model(torch.tensor([window])).logits[0, :-1].float(), dim=-1)


def score(model, windows: list[list[int]], desc: str, reference=None) -> tuple[TokenScores, TokenScores | None]:
    """Score `model` on the windows; with a `reference` model, score both in lockstep, window by window, so KL and
    top-1 agreement are exact over the full vocabulary while memory holds one window's distributions. Returns the
    model's scores and the reference's (None without one)."""
    parts, ref_parts = [], []
    for w in tqdm(windows, desc=desc, unit="window", leave=False):
        lp = next_token_logprobs(model, w)
        ref_lp = None if reference is None else next_token_logprobs(reference, w)
        parts.append(TokenScores.of(lp, w, ref_lp))
        if ref_lp is not None:
            ref_parts.append(TokenScores.of(ref_lp, w))
        del lp, ref_lp
    return TokenScores.cat(parts), (TokenScores.cat(ref_parts) if ref_parts else None)


def logits_of(model, windows: list[list[int]], desc: str) -> list[torch.Tensor]:
    """Full next-token log-probabilities of each window, kept (vocabulary × tokens of float32: for callers that
    store a reference on disk and score many variants against it, chunk by chunk)."""
    return [next_token_logprobs(model, w) for w in tqdm(windows, desc=desc, unit="window", leave=False)]


def scores_of(logprobs: list[torch.Tensor], windows: list[list[int]], reference: list[torch.Tensor] | None = None
              ) -> TokenScores:
    refs = reference if reference is not None else [None] * len(windows)
    return TokenScores.cat([TokenScores.of(lp, w, r) for lp, w, r in zip(logprobs, windows, refs)])


def perplexity(scores: TokenScores) -> float:
    return math.exp(-scores.target_logprob.double().mean().item())


def expected_calibration_error(scores: TokenScores, bins: int = 15) -> float:
    """How far the model's top-1 confidence is from its top-1 accuracy, binned by confidence (Guo et al., 2017)."""
    conf = scores.top1_logprob.exp()
    correct = (scores.top1 == scores.targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.float().mean().item() * abs(conf[mask].mean().item() - correct[mask].mean().item())
    return ece


def measure(scores: TokenScores, text: str, engine_dtype: str, note=None) -> Measurement:
    """A Measurement of transformers' numbers; KL and top-1 agreement when `scores` were taken against a reference."""
    import transformers

    return Measurement(
        engine="transformers",
        engine_version=transformers.__version__,
        dtype=engine_dtype,
        hardware=hardware_name(),
        text=text,
        tokens=len(scores.targets),
        perplexity=perplexity(scores),
        kl=None if scores.kl is None else scores.kl.double().mean().item(),
        top1_agreement=None if scores.agrees is None else scores.agrees.float().mean().item(),
        ece=expected_calibration_error(scores),
        note=note,
    )
