"""Checkpoint schemes hubc can emit, as data: how weights and activations are quantized and which
compressed-tensors format stores them. A new scheme is one `register(...)` call."""

from __future__ import annotations

from dataclasses import dataclass

from advisor.errors import UnsupportedSchemeError


@dataclass(frozen=True)
class QuantArgs:
    """How one tensor is quantized (mirrors compressed-tensors' QuantizationArgs)."""

    num_bits: int
    type: str = "int"
    """`int` or `float` (FP8 e4m3)."""
    symmetric: bool = True
    strategy: str = "channel"
    """`channel`, `group` (weights) or `token` (activations)."""
    group_size: int | None = None
    dynamic: bool = False
    """Activations quantized at run time from each token's own range."""

    def to_ct(self) -> dict:
        """The compressed-tensors QuantizationArgs fields vLLM reads."""
        return {
            "num_bits": self.num_bits,
            "type": self.type,
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "group_size": self.group_size,
            "dynamic": self.dynamic,
        }


@dataclass(frozen=True)
class Scheme:
    """One checkpoint scheme: weight and (optional) input-activation quantization and its CT format."""

    name: str
    description: str
    weights: QuantArgs
    input_activations: QuantArgs | None
    ct_format: str
    """compressed-tensors format: `int-quantized`, `pack-quantized` or `float-quantized`."""

    @property
    def grouped(self) -> bool:
        return self.weights.strategy == "group"

    def with_group_size(self, group_size: int | None) -> Scheme:
        if not self.grouped:
            return self
        w = self.weights
        return Scheme(
            self.name,
            self.description,
            QuantArgs(w.num_bits, w.type, w.symmetric, "group", group_size, w.dynamic),
            self.input_activations,
            self.ct_format,
        )

    def with_activations(self, symmetric: bool) -> Scheme:
        """The scheme with its int8 activations quantized symmetrically, or asymmetrically (a per-token zero point:
        each token's [min, max] gets all 256 steps)."""
        acts = self.input_activations
        if acts is None or acts.symmetric == symmetric:
            return self
        if acts.type != "int":
            raise UnsupportedSchemeError(f"{self.name} quantizes activations to FP8, which has no zero point",
                                         hint="use --activations symmetric with fp8")
        return Scheme(self.name, self.description, self.weights,
                      QuantArgs(acts.num_bits, acts.type, symmetric, acts.strategy, acts.group_size, acts.dynamic),
                      self.ct_format)

    @property
    def weight_bits(self) -> int:
        return self.weights.num_bits


SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name.lower()]
    except KeyError:
        raise UnsupportedSchemeError(f"unknown scheme '{name}'", hint=f"known schemes: {', '.join(SCHEMES)}") from None


register(
    Scheme(
        "w8a8-int8",
        "int8 weights per output channel, int8 activations per token (dynamic)",
        QuantArgs(8, "int", True, "channel"),
        QuantArgs(8, "int", True, "token", dynamic=True),
        "int-quantized",
    )
)
register(
    Scheme(
        "w4a16",
        "int4 weights per group, 16-bit activations",
        QuantArgs(4, "int", True, "group", group_size=128),
        None,
        "pack-quantized",
    )
)
register(
    Scheme(
        "w8a16",
        "int8 weights per output channel, 16-bit activations",
        QuantArgs(8, "int", True, "channel"),
        None,
        "pack-quantized",
    )
)
register(
    Scheme(
        "fp8",
        "FP8 e4m3 weights per output channel, FP8 activations per token (dynamic)",
        QuantArgs(8, "float", True, "channel"),
        QuantArgs(8, "float", True, "token", dynamic=True),
        "float-quantized",
    )
)


# No quantization: every linear keeps the checkpoint's dtype. For variants whose size and speed come from structure
# alone (pruning, factorization, fewer layers): on CPUs without fast int8 or int4 kernels the dense GEMM is the fastest.
register(
    Scheme(
        "dense",
        "no quantization: weights in the serving dtype",
        QuantArgs(16, "float", True, "channel"),
        None,
        "dense",
    )
)


def is_dense(name: str) -> bool:
    return name == "dense"


def pair_limit(scheme: Scheme, pair_sum: int | None) -> int | None:
    """A recipe's int8 pair limit applies to int8 GEMMs (W8A8) only, not to weight-only kernels."""
    if pair_sum is None or scheme.input_activations is None or scheme.weights.type != "int":
        return None
    return int(pair_sum)
