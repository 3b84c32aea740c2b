"""Quantize a linear layer with a scheme, or keep it dense (mixed precision)."""

from __future__ import annotations

from dataclasses import dataclass

from advisor.actions.base import Action, register
from advisor.errors import ShapeError


@register
@dataclass(frozen=True)
class Quantize(Action):
    """Store the linear's weights (and quantize its inputs where the scheme says) with `scheme`; the recipe's method
    rounds them."""

    kind = "quantize"
    unit = "linear"
    scheme: str = ""

    @classmethod
    def from_spec(cls, arg) -> Quantize:
        from advisor.schemes import SCHEMES

        if not isinstance(arg, str) or arg not in SCHEMES:
            raise ShapeError(f"quantize needs a scheme id, got {arg!r}", hint=f"schemes: {', '.join(SCHEMES)}")
        return cls(arg)

    def to_spec(self):
        return self.scheme

    def check(self, name, structure, target) -> None:
        target.require_scheme(self.scheme)


@register
@dataclass(frozen=True)
class KeepDense(Action):
    """Leave the linear unquantized (in the checkpoint's 16-bit dtype)."""

    kind = "dense"
    unit = "linear"
