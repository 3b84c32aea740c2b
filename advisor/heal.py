"""Distillation healing: after pruning or factorization, train the student's decoder layers to match the base model.

Loss per token: `kl_weight · T² · KL(teacher_T ‖ student_T) + (1 − kl_weight) · CE(student, text)`, where `_T` are the
next-token distributions softened by temperature T (Hinton et al.; T² keeps the gradient scale independent of T).
The teacher is the unchanged base model. The budget is wall-clock minutes, a step count or a number of passes over the
training windows, whichever ends first; the learning rate warms up, then decays linearly to zero at the budget's end
(estimated from the measured step time, so a minutes budget ends with a decayed rate instead of being cut
mid-schedule).

What trains: every parameter of the decoder layers (norms included); the embeddings and the output head stay frozen
(they are tied in many models, and a pruned layer shifts the residual stream that every later layer reads, so
training only the pruned layers leaves the later ones reading a distribution they were not trained on). With
`lora_rank` r, each decoder linear trains a rank-r update instead (LoRA, Hu et al. 2021: W + (α/r)·B·A, B from zero),
merged into the weight when healing ends, so the checkpoint keeps its shapes; the norms still train in full. The
update is a `torch.nn.utils.parametrize` parametrization of the linear's weight: it needs no module replaced, so it
reaches hubc's own modules (a factorized linear's two factors) and leaves the model's class and parameter names as
they were once removed (a LoRA library would wrap the model and rename its parameters for a few lines of algebra).

Healing is judged on held-out text (never its training text): the report gives perplexity before and after on each
held-out text, and flags a text whose perplexity rose while the training text's fell.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from advisor.errors import AdvisorError


@dataclass
class HealConfig:
    """A recipe's `heal` block."""

    minutes: float | None = None
    """Wall-clock budget of the training loop (evaluation before and after not counted)."""
    steps: int | None = None
    """Step budget (whichever of minutes and steps ends first)."""
    temperature: float = 1.0
    kl_weight: float = 0.9
    """Share of the distillation term; the rest is cross-entropy on the text."""
    lr: float | None = None
    """Peak learning rate; default LR (full fine-tuning) or LORA_LR (with `lora_rank`)."""
    lora_rank: int = 0
    """0: train every decoder-layer weight; r > 0: train a rank-r update of each decoder linear (LoRA), merged back."""
    lora_alpha: float | None = None
    """LoRA's scale numerator (the update is α/r·B·A); default 2r."""
    batch: int = 4
    """Windows per step."""
    seq_len: int = 256
    windows: int = 512
    """Training windows of the calibration text (cycled when the budget outlasts them)."""
    self_generated: int = 32
    """Training windows the base model samples itself, mixed in with the text's."""
    epochs: float = 4.0
    """At most this many passes over the training windows: a small model on a fast machine stops when more steps
    would only repeat its text (overfitting it), not when the minutes run out."""
    seed: int = 0

    @classmethod
    def from_dict(cls, data) -> HealConfig:
        if not isinstance(data, dict):
            raise AdvisorError(f"recipe `heal` must be a mapping (minutes, steps, ...), not {data!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdvisorError(f"unknown heal keys: {', '.join(unknown)}", hint=f"known: {', '.join(sorted(known))}")
        config = cls(**data)
        if config.minutes is None and config.steps is None:
            raise AdvisorError("healing needs a budget", hint="give `minutes` (e.g. --heal-minutes 15) or `steps`")
        for key in ("minutes", "temperature", "lr", "epochs", "lora_alpha"):
            value = getattr(config, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise AdvisorError(f"heal `{key}` must be a positive number, not {value!r}")
        for key in ("steps", "batch", "seq_len", "windows"):
            value = getattr(config, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise AdvisorError(f"heal `{key}` must be a positive whole number, not {value!r}")
        for key in ("self_generated", "lora_rank"):
            value = getattr(config, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AdvisorError(f"heal `{key}` must be a whole number ≥ 0, not {value!r}")
        if not 0 <= config.kl_weight <= 1:
            raise AdvisorError(f"heal `kl_weight` must be between 0 and 1, not {config.kl_weight!r}")
        return config

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else LORA_LR if self.lora_rank else LR


LR = 3e-4
"""Full fine-tuning's peak learning rate. Minutes of healing on a CPU are tens of steps: at 30 steps 3e-4 recovered
more than 1e-4 on both held-out texts, the training domain and another (benchmarks/results/heal_settings.md)."""
LORA_LR = 1e-3
"""LoRA's peak learning rate: at 30 steps rank 16 recovered more at 1e-3 than at 3e-4 on both held-out texts, yet
less than full training (benchmarks/results/heal_settings.md)."""


@dataclass
class HealReport:
    steps: int
    seconds: float
    tokens: int
    dtype: str
    """What the matrix products ran in (bf16 autocast where the CPU computes bf16 natively, else float32)."""
    kl_start: float
    """Mean distillation KL (nats/token, at temperature 1) over the first steps, and over the last."""
    kl_end: float
    held_out: dict = field(default_factory=dict)
    """Text → {base, before, after}: perplexity of the base, of the student before healing and after."""
    flags: list[str] = field(default_factory=list)
    lr: float | None = None
    """Peak learning rate of the schedule."""
    lora_rank: int = 0
    """Rank of the merged-back LoRA updates; 0: every decoder-layer weight trained."""

    def to_dict(self) -> dict:
        return asdict(self)


def fast_dtype() -> torch.dtype:
    """bf16 where this CPU multiplies bf16 natively (AVX-512 BF16 or AMX); float32 elsewhere, where bf16 matmuls are
    emulated and slower than float32."""
    if torch.cuda.is_available():
        return torch.bfloat16
    from advisor.measurement import cpuinfo

    flags = set(cpuinfo().get("flags", "").split())
    return torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else torch.float32


def trainable_parameters(student) -> list[torch.nn.Parameter]:
    from advisor.model import decoder_layers

    _, layers = decoder_layers(student)
    return [p for p in layers.parameters()]


class LoraUpdate(torch.nn.Module):
    """The parametrization W ↦ W + scale·B·A of one linear's weight (B starts at zero: training starts from W)."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        bound = 1 / math.sqrt(in_features)  # as nn.Linear initializes a weight of this fan-in
        a = (torch.rand(rank, in_features, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        self.a = torch.nn.Parameter(a.to(weight.device))
        self.b = torch.nn.Parameter(torch.zeros(out_features, rank, device=weight.device))
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * self.b @ self.a).to(weight.dtype)


def attach_lora(student, rank: int, alpha: float | None, generator: torch.Generator) -> list[torch.nn.Parameter]:
    """Parametrize every decoder linear's weight with a rank-`rank` update (at most the weight's smaller side);
    returns what trains: the updates' factors and every decoder-layer parameter outside a linear (norms)."""
    from torch.nn.utils import parametrize

    from advisor.model import decoder_layers

    _, layers = decoder_layers(student)
    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    in_linears = {id(p) for m in linears for p in m.parameters(recurse=False)}
    rest = [p for p in layers.parameters() if id(p) not in in_linears]
    params: list[torch.nn.Parameter] = []
    for module in linears:
        r = min(rank, *module.weight.shape)
        update = LoraUpdate(module.weight, r, (alpha if alpha is not None else 2 * rank) / rank, generator)
        parametrize.register_parametrization(module, "weight", update)
        params += [update.a, update.b]
    return params + rest


def merge_lora(student) -> None:
    """Fold every LoRA update into its weight and remove the parametrizations (the model's parameters are then
    named and shaped as before healing)."""
    from torch.nn.utils import parametrize

    for module in student.modules():
        if parametrize.is_parametrized(module, "weight") \
                and any(isinstance(f, LoraUpdate) for f in module.parametrizations.weight):
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def distill_loss(student_logits, teacher_logits, labels, temperature: float, kl_weight: float):
    """(loss, KL at T=1 for the progress bar), both per token; logits (tokens, vocab)."""
    s = student_logits.float()
    t = teacher_logits.float()
    log_s_t = F.log_softmax(s / temperature, -1)
    log_t_t = F.log_softmax(t / temperature, -1)
    kl = (log_t_t.exp() * (log_t_t - log_s_t)).sum(-1).mean() * temperature ** 2
    ce = F.cross_entropy(s, labels)
    with torch.no_grad():
        log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        kl1 = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return kl_weight * kl + (1 - kl_weight) * ce, kl1.item()


def perplexities(model, texts: dict[str, list[list[int]]]) -> dict[str, float]:
    from advisor.evaluate import perplexity, score

    return {name: perplexity(score(model, windows, f"perplexity on {name}")[0]) for name, windows in texts.items()}


def heal(student, teacher, windows: list[list[int]], config: HealConfig, held_out: dict[str, list[list[int]]],
         progress: Callable[[str], None] = lambda message: None) -> HealReport:
    """Train `student` in place towards `teacher` on `windows` (token ids, each trained on whole) within the
    budget. `held_out`: text name → evaluation windows, scored before and after (never trained on)."""
    from tqdm import tqdm

    if not windows:
        raise AdvisorError("healing got no training text", hint="give the recipe a calibration text")
    base = perplexities(teacher, held_out)
    before = perplexities(student, held_out)
    gen = torch.Generator().manual_seed(config.seed)
    for p in student.parameters():
        p.requires_grad_(False)
    teacher.eval()
    dtype = fast_dtype()
    peak_lr = config.peak_lr
    order: list[int] = []
    budget_s = config.minutes * 60 if config.minutes is not None else math.inf
    max_steps = min(config.steps or 10**9, max(1, math.ceil(config.epochs * len(windows) / config.batch)))
    warmup = 10
    step, tokens, kls = 0, 0, []
    planned = max_steps if config.steps else None  # a minutes budget plans its length after warm-up
    bar = tqdm(total=planned or None, desc="healing (distillation)", unit="step", leave=False)
    try:  # from here on, whatever happens, the student is left merged, frozen and in eval mode
        params = attach_lora(student, config.lora_rank, config.lora_alpha,
                             torch.Generator().manual_seed(config.seed)) if config.lora_rank \
            else trainable_parameters(student)
        for p in params:
            p.requires_grad_(True)
        student.train()
        optimizer = torch.optim.AdamW(params, lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.0)
        started = time.monotonic()
        while step < max_steps and time.monotonic() - started < budget_s:
            if len(order) < config.batch:
                order += torch.randperm(len(windows), generator=gen).tolist()
            batch = torch.tensor([windows[order.pop()] for _ in range(config.batch)])
            inputs, labels = batch[:, :-1], batch[:, 1:].reshape(-1)
            if planned is None and step == warmup:
                # The schedule's length, from the measured step time once the first steps have run.
                per_step = (time.monotonic() - started) / step
                planned = min(max_steps, max(step + 1, int(budget_s / per_step)))
                bar.total = planned
                bar.refresh()
            total = planned or max_steps
            lr = peak_lr * min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                with torch.no_grad():
                    t_logits = teacher(inputs).logits
                s_logits = student(inputs).logits
            loss, kl = distill_loss(s_logits.reshape(-1, s_logits.shape[-1]),
                                    t_logits.reshape(-1, t_logits.shape[-1]), labels,
                                    config.temperature, config.kl_weight)
            if not math.isfinite(loss.item()):
                raise AdvisorError(f"healing diverged at step {step} (loss {loss.item()})",
                                   hint="lower the heal learning rate (recipe heal.lr), or heal fewer minutes")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            tokens += labels.numel()
            kls.append(kl)
            bar.update(1)
            bar.set_postfix(kl=f"{kl:.4f}")
            if step % 10 == 0:
                left = budget_s - (time.monotonic() - started)
                progress(f"healing: step {step}, KL {sum(kls[-10:]) / len(kls[-10:]):.4f}"
                         + (f", {left / 60:.1f} min left" if math.isfinite(left) else ""))
    finally:
        bar.close()
        merge_lora(student)
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
    seconds = time.monotonic() - started
    after = perplexities(student, held_out)
    head = kls[: max(1, min(10, len(kls) // 4))]
    tail = kls[-max(1, min(10, len(kls) // 4)):]
    report = HealReport(steps=step, seconds=round(seconds, 1), tokens=tokens, dtype=str(dtype).removeprefix("torch."),
                        kl_start=sum(head) / len(head) if head else float("nan"),
                        kl_end=sum(tail) / len(tail) if tail else float("nan"),
                        held_out={n: {"base": base[n], "before": before[n], "after": after[n]} for n in held_out},
                        lr=peak_lr, lora_rank=config.lora_rank)
    report.flags = judge(report.held_out, report.kl_start, report.kl_end)
    return report


def judge(held_out: dict[str, dict], kl_start: float, kl_end: float) -> list[str]:
    """Flags for texts healing made worse while it fit its training text."""
    flags = []
    for name, r in held_out.items():
        if r["after"] > r["before"] * 1.005 and kl_end < kl_start:
            flags.append(f"healing fit its training text (KL {kl_start:.3f} → {kl_end:.3f}) but raised perplexity on "
                         f"{name} ({r['before']:.2f} → {r['after']:.2f}): heal on text closer to {name} or heal less")
    return flags
