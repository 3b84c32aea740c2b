"""Typed errors of the advisor (targets, recipes, compression, evaluation)."""

from __future__ import annotations


class HintedError(Exception):
    """An error the user can act on: a one-line message and, when known, what to do next. The base of every layer's
    errors (advisor, serving, hubplugin), so the CLI reports them all one way."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class AdvisorError(HintedError):
    """Base of advisor errors."""


class UnknownTargetError(AdvisorError):
    """The target name is not in the hardware catalog."""


class UnsupportedSchemeError(AdvisorError):
    """The scheme is unknown, or the target has no vLLM kernel for it."""


class ShapeError(AdvisorError):
    """A module's shape does not fit the scheme (e.g. group size does not divide the input dimension)."""


class UnsupportedArchitectureError(AdvisorError):
    """The model's architecture has a structure hubc cannot compress."""


class DamagedWeightsError(AdvisorError):
    """A model folder's weight files are missing, unreadable, cut off, or disagree with its index or config.json."""
