"""Typed errors of the Hub-facing layer. The CLI turns each into one line plus the next thing to do."""

from __future__ import annotations

from advisor.errors import HintedError


class HubcError(HintedError):
    """Base of the Hub-facing layer's errors."""


class ModelNotFoundError(HubcError):
    """The model reference names no repo, folder or file hubc can reach."""


class AuthRequiredError(HubcError):
    """The repo exists but needs a token (private or gated)."""


class NotAModelError(HubcError):
    """A folder or file that does not hold a causal language model hubc can read."""


class OutputExistsError(HubcError):
    """The output folder already exists and --overwrite was not given."""


class PushError(HubcError):
    """Pushing to the Hub failed; nothing was committed."""


class QualityGateError(HubcError):
    """The variant lost more quality than the gate allows, so it was not pushed (the local checkpoint is kept)."""
