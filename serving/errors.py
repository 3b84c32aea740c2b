"""Typed errors of the serving layer."""

from __future__ import annotations


class ServingError(Exception):
    """Base of serving errors: a one-line message and, when known, what to do next."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class VllmNotInstalledError(ServingError):
    """vLLM is not importable in this environment."""


class ServerStartError(ServingError):
    """vLLM refused the checkpoint or did not become healthy in time; carries vLLM's own reason."""
