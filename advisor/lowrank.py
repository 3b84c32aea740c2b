"""A linear layer stored as two: W ≈ U·V (low-rank factorization), named so the checkpoint and vLLM agree.

`x → v(x) → u(·)`: `v` maps the input to `rank` features (no bias), `u` maps them to the output (with the original
bias). Both are plain `nn.Linear`s, so every quantization scheme, the calibration hooks and the export treat them as
linears of their own (`...down_proj.v`, `...down_proj.u`). The module deliberately has no `weight`: code that reads a
linear's weight must not mistake a factorized one for a dense one.
"""

from __future__ import annotations

import torch


class LowRankLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = torch.nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = torch.nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """`u`: (out, rank), `v`: (rank, in), so that W ≈ u @ v."""
        module = cls(v.shape[1], u.shape[0], v.shape[0], bias is not None, device=u.device, dtype=u.dtype)
        with torch.no_grad():
            module.u.weight.copy_(u)
            module.v.weight.copy_(v)
            if bias is not None:
                module.u.bias.copy_(bias)
        return module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    @staticmethod
    def saves_bytes(in_features: int, out_features: int, rank: int) -> bool:
        """Whether rank `rank` stores fewer weights than the dense matrix: r·(m+n) < m·n."""
        return rank * (in_features + out_features) < in_features * out_features
