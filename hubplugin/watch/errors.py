"""Typed errors of `hubc watch` and `hubc jobs`; the CLI turns each into one line plus what to do next."""

from __future__ import annotations

from hubplugin.errors import HubcError


class WatchError(HubcError):
    """Base of the watch layer's errors."""


class WatchConfigError(WatchError):
    """watch.yaml is missing, not YAML, or has an unknown key or a value of the wrong kind."""


class JobStateError(WatchError):
    """`hubc jobs retry/cancel` asked for something the job's state does not allow, or named no job."""


class PayloadError(ValueError):
    """A webhook delivery hubc cannot read (malformed JSON, wrong payload version, missing fields): answered 400."""
