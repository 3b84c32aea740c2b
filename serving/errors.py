"""Typed errors of the serving layer."""

from __future__ import annotations

from advisor.errors import HintedError


class ServingError(HintedError):
    """Base of serving errors."""


class VllmNotInstalledError(ServingError):
    """vLLM is not importable in this environment."""


class ServerStartError(ServingError):
    """vLLM refused the checkpoint or did not become healthy in time; carries vLLM's own reason."""
