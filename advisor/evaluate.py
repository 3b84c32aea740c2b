"""Quality of a compressed model against its base, teacher-forced on held-out text: perplexity, KL divergence of
next-token distributions, top-1 agreement and expected calibration error."""

from __future__ import annotations

import itertools
import math
import platform
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from advisor.errors import AdvisorError

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
    windows: int = 4
    """Windows per text, taken from its start."""


@dataclass
class EvalText:
    name: str
    windows: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(w) - 1 for w in self.windows)


@dataclass
class Measurement:
    """A number with its provenance: which engine computed it, in what precision, on what text."""

    engine: str
    engine_version: str
    dtype: str
    hardware: str
    text: str
    tokens: int
    perplexity: float
    kl: float | None = None
    top1_agreement: float | None = None
    ece: float | None = None
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


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
    """CPU model name (Linux), for provenance."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.inference_mode()
def logits_of(model, windows: list[list[int]], desc: str) -> list[torch.Tensor]:
    """Next-token log-probabilities for positions 0..n-2 of each window, kept as float32 on the CPU."""
    out = []
    for w in tqdm(windows, desc=desc, unit="window", leave=False):
        logits = model(torch.tensor([w])).logits[0, :-1].float()
        out.append(torch.log_softmax(logits, dim=-1))
    return out


def perplexity(logprobs: list[torch.Tensor], windows: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for lp, w in zip(logprobs, windows):
        target = torch.tensor(w[1:])
        nll -= lp.gather(1, target[:, None]).sum().item()
        n += len(target)
    return math.exp(nll / n)


def expected_calibration_error(logprobs: list[torch.Tensor], windows: list[list[int]], bins: int = 15) -> float:
    """How far the model's top-1 confidence is from its top-1 accuracy, binned by confidence (Guo et al., 2017)."""
    conf = torch.cat([lp.max(-1).values.exp() for lp in logprobs])
    correct = torch.cat([(lp.argmax(-1) == torch.tensor(w[1:])).float() for lp, w in zip(logprobs, windows)])
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.float().mean().item() * abs(conf[mask].mean().item() - correct[mask].mean().item())
    return ece


def compare(base: list[torch.Tensor], variant: list[torch.Tensor]) -> tuple[float, float]:
    """Mean KL(base || variant) per token, and the share of positions where both pick the same top-1 token."""
    kl_sum, agree, n = 0.0, 0, 0
    for b, v in zip(base, variant):
        kl_sum += (b.exp() * (b - v)).sum(-1).sum().item()
        agree += (b.argmax(-1) == v.argmax(-1)).sum().item()
        n += b.shape[0]
    return kl_sum / n, agree / n


def measure(logprobs, windows, text: str, engine_dtype: str, reference=None, note=None) -> Measurement:
    import transformers

    kl = top1 = None
    if reference is not None:
        kl, top1 = compare(reference, logprobs)
    return Measurement(
        engine="transformers",
        engine_version=transformers.__version__,
        dtype=engine_dtype,
        hardware=hardware_name(),
        text=text,
        tokens=sum(len(w) - 1 for w in windows),
        perplexity=perplexity(logprobs, windows),
        kl=kl,
        top1_agreement=top1,
        ece=expected_calibration_error(logprobs, windows),
        note=note,
    )
