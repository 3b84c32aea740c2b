"""Low-rank factorization of one linear layer: W ≈ u·v (advisor.lowrank.LowRankLinear), truncated where it costs
the layer's outputs least on calibration text.

Whitened SVD (SVD-LLM): with XᵀX = S·Sᵀ (Cholesky) over the calibration inputs, ‖(W − W′)·Xᵀ‖_F = ‖(W − W′)·S‖_F,
so truncating the SVD of W·S keeps the directions that matter for the inputs the layer actually sees; then
u = U_r·Σ_r^½ and v = Σ_r^½·V_rᵀ·S⁻¹ (a triangular solve, never an inverse). `whitening: false` truncates the SVD
of W itself (plain SVD: every input direction weighs the same).

Recipe form: `{factorize: 128}` or `{factorize: {rank: 128, whitening: true}}`. Ranks are multiples of 32 (vLLM's
CPU WNA16 kernels take only sizes that are multiples of 32, and the rank is u's input size) and must store fewer
weights than the dense matrix: r·(m+n) < m·n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advisor.actions.base import Action, register
from advisor.errors import ShapeError
from advisor.lowrank import LowRankLinear

RANK_MULTIPLE = 32
DAMPING = 0.01
"""Added to XᵀX as a share of its mean diagonal before Cholesky. Calibration covariances are ill-conditioned (some
channels are almost never active, and few windows give a rank-deficient XᵀX), so Cholesky can fail and S⁻¹ can
amplify directions calibration never saw; the damping makes the objective ‖ΔW·X‖² + λ‖ΔW‖², a ridge that keeps
such directions from being truncated for free, which is what another domain's activations need (GPTQ damps its
Hessian the same way, at the same 1%)."""


def largest_saving_rank(in_features: int, out_features: int, multiple: int = RANK_MULTIPLE) -> int:
    """The largest multiple of `multiple` with r·(m+n) < m·n (0 where none saves weights)."""
    rank = (in_features * out_features - 1) // (in_features + out_features)
    return rank // multiple * multiple


@register
@dataclass(frozen=True)
class Factorize(Action):
    kind = "factorize"
    unit = "linear"
    structural = True
    order = 20
    rank: int = 0
    whitening: bool = True

    @property
    def calibrates(self) -> bool:
        return self.whitening

    @classmethod
    def from_spec(cls, arg) -> Factorize:
        if isinstance(arg, dict):
            unknown = sorted(set(arg) - {"rank", "whitening"})
            if unknown:
                raise ShapeError(f"unknown factorize keys: {', '.join(unknown)}", hint="known: rank, whitening")
            rank, whitening = arg.get("rank"), arg.get("whitening", True)
        else:
            rank, whitening = arg, True
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or rank % RANK_MULTIPLE:
            raise ShapeError(f"factorize rank must be a positive multiple of {RANK_MULTIPLE}, got {rank!r}",
                             hint="e.g. {factorize: 128}")
        if not isinstance(whitening, bool):
            raise ShapeError(f"factorize whitening must be true or false, got {whitening!r}",
                             hint="{factorize: {rank: 128, whitening: true}}")
        return cls(rank, whitening)

    def to_spec(self):
        return {self.kind: self.rank if self.whitening else {"rank": self.rank, "whitening": False}}

    def check(self, name, structure, target) -> None:
        from advisor.architecture import check_reshape

        check_reshape(structure.model_type)  # factorized linears need hubc's own architecture for the base
        info = next((li for li in structure.linears if li.name == name), None)
        if info is None:
            return
        m, n = info.out_features, info.in_features
        if not LowRankLinear.saves_bytes(n, m, self.rank):
            best = largest_saving_rank(n, m)
            hint = f"use rank {best} or less" if best else f"leave {name} dense: no multiple of 32 saves weights"
            raise ShapeError(f"{name} ({m}×{n}) stores more at rank {self.rank} than dense", hint=hint)

    @classmethod
    def apply(cls, model, units, ctx) -> dict[str, str | None]:
        from advisor.importance import input_statistics

        whitened = sorted(n for n, a in units.items() if a.whitening)
        stats = input_statistics(model, ctx.windows, ctx.cache, covariance=whitened) if whitened else {}
        notes = ctx.notes.setdefault(cls.kind, {})
        for name, action in units.items():
            linear = model.get_submodule(name)
            w = linear.weight.detach().double()
            gram = stats[name].gram if action.whitening else None
            u, v, error = factorize(w, action.rank, gram)
            bias = None if linear.bias is None else linear.bias.detach()
            module = LowRankLinear.from_factors(u.to(w.device, linear.weight.dtype),
                                                v.to(w.device, linear.weight.dtype), bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
            notes[name] = {"rank": action.rank, "whitening": action.whitening, "truncation_error": error}
            ctx.reshaped = True
        return {}


def whitening_factor(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """S, lower triangular, with S·Sᵀ = XᵀX + λ·I (λ = `damping` × mean diagonal)."""
    gram = gram.double()
    lam = damping * gram.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.cholesky(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype))


def spectrum(w: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """Singular values of W·S (of W without `gram`): their squared tail beyond r is the rank-r output error."""
    w = w.double()
    return torch.linalg.svdvals(w if gram is None else w @ whitening_factor(gram))


def factorize(w: torch.Tensor, rank: int, gram: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(u [out, rank], v [rank, in], relative error) with W ≈ u·v: the rank-`rank` truncation minimizing the output
    error on inputs of covariance `gram` (plain SVD without one). The error is Σ_{i>r}σᵢ²/Σσᵢ², in the whitened
    norm when whitened."""
    w = w.double()
    s = whitening_factor(gram) if gram is not None else None
    U, sigma, Vh = torch.linalg.svd(w if s is None else w @ s, full_matrices=False)
    root = sigma[:rank].sqrt()
    u = U[:, :rank] * root
    v = root[:, None] * Vh[:rank]
    if s is not None:
        # v·S = Σ^½·Vᵀ  →  v = Σ^½·Vᵀ·S⁻¹, solved against the triangular S.
        v = torch.linalg.solve_triangular(s, v, upper=False, left=False)
    energy = sigma.pow(2)
    return u, v, (energy[rank:].sum() / energy.sum().clamp_min(1e-300)).item()
