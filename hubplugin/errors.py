"""Typed errors of the Hub-facing layer. The CLI turns each into one line plus the next thing to do."""

from __future__ import annotations


class HubcError(Exception):
    """Base of every error hubc reports to a user: a one-line message and, when known, what to do next."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


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
