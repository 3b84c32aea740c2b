"""The action registry and the base every action derives from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from advisor.errors import ShapeError

ACTIONS: dict[str, type[Action]] = {}


@dataclass
class StructureContext:
    """What structural actions get besides the model, shared by every kind applied in one compress call."""

    windows: list[list[int]] | None
    """Calibration token windows (importance, whitening); None where the recipe calibrates nothing."""
    structure: object
    """advisor.model.ModelStructure of the model before any structural action."""
    notes: dict = field(default_factory=dict)
    """Action kind → what it did, JSON-ready (report.json and the card)."""
    cache: dict = field(default_factory=dict)
    """Statistics measured once on the unchanged model and shared between kinds (advisor.importance)."""
    reshaped: bool = False
    """Set by an action that changed a layer's shapes (widths, heads, factors): the model is then rebuilt from a
    config that describes them (advisor.architecture.adopt)."""


@dataclass(frozen=True)
class Action:
    """One thing done to one unit of the model. `unit` says what the recipe key names: `linear` (a linear layer) or
    `layer` (a decoder layer). Structural actions (`structural`) change the model's shapes before quantization."""

    kind: ClassVar[str]
    unit: ClassVar[str]
    structural: ClassVar[bool] = False
    order: ClassVar[int] = 0
    calibrates: ClassVar[bool] = False
    """Whether applying the action reads calibration text (activation importance, whitening)."""
    """Structural actions apply kind by kind in this order (pruning before factorization before layer removal, so
    every kind reads the names the recipe wrote until layers are renumbered)."""

    @classmethod
    def from_spec(cls, arg) -> Action:
        """The action from the value its key maps to in a recipe (None when the recipe gives only the name)."""
        if arg is not None:
            raise ShapeError(f"action '{cls.kind}' takes no arguments, got {arg!r}", hint=f"write `{cls.kind}` alone")
        return cls()

    def to_spec(self):
        """The action as a recipe writes it (the inverse of from_spec)."""
        return self.kind

    def check(self, name: str, structure, target) -> None:
        """Raise with the fix when the action cannot apply to unit `name` of this model on this target."""

    @classmethod
    def apply(cls, model, units: dict[str, Action], ctx: StructureContext) -> dict[str, str | None]:
        """Apply the actions of this kind to their units of `model` in place (structural actions only; `units`: unit
        name as the model now names it → its action); returns how module name prefixes moved: old prefix → new
        prefix, or None for units that no longer exist."""
        raise NotImplementedError(f"{cls.kind} does not change the model's structure")


def register(cls: type[Action]) -> type[Action]:
    """Class decorator: make an action available to recipes under `cls.kind`."""
    if cls.kind in ACTIONS and ACTIONS[cls.kind] is not cls:
        raise ValueError(f"action '{cls.kind}' is already registered by {ACTIONS[cls.kind].__name__}")
    ACTIONS[cls.kind] = cls
    return cls


def parse_action(value) -> Action:
    """A recipe's value for one key: an action name (`dense`, `remove-layer`), a scheme id (shorthand for
    `{quantize: <scheme>}`), or a one-key mapping `{action: argument}`."""
    from advisor.schemes import SCHEMES

    if isinstance(value, dict) and len(value) == 1:
        (name, arg), = value.items()
    elif isinstance(value, str):
        name, arg = value, None
    else:
        raise ShapeError(f"recipe action {value!r} is neither a name nor a one-key mapping",
                         hint=f"use one of {', '.join(ACTIONS)} or a scheme id")
    if name in ACTIONS:
        return ACTIONS[name].from_spec(arg)
    if name in SCHEMES and arg is None:
        return ACTIONS["quantize"].from_spec(name)
    raise ShapeError(f"unknown recipe action '{name}'",
                     hint=f"actions: {', '.join(ACTIONS)}; schemes: {', '.join(SCHEMES)}")
