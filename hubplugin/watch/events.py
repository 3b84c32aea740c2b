"""What a Hub webhook delivery (payload version 3) asks of hubc: build the variants of one commit, or nothing.

The trigger rule (notes/hub-protocol.md §3): scope `repo.content` (or a finer scope under it), a model repo that
watch.yaml watches, and an update of `refs/heads/main` whose `newSha` is the exact commit to build. Everything else
is ignored with a reason; a payload hubc cannot read raises PayloadError (answered 400).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from hubplugin.watch.errors import PayloadError

__all__ = ["Accepted", "Ignored", "classify"]

MAIN = "refs/heads/main"
_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Accepted:
    """Build the variants of `repo` at commit `sha`."""

    repo: str
    sha: str


@dataclass(frozen=True)
class Ignored:
    """Nothing to build, and why (answered 2xx: the Hub must not retry it)."""

    reason: str
    repo: str | None = None


def _field(data: dict, key: str, kind: type, where: str):
    value = data.get(key)
    if not isinstance(value, kind):
        raise PayloadError(f"the payload's {where}{key} is missing or not a {'string' if kind is str else 'mapping'}")
    return value


def classify(body: bytes, watches) -> Accepted | Ignored:
    """Read one delivery; `watches(repo)` says whether watch.yaml watches a repo. Raises PayloadError."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PayloadError(f"malformed JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise PayloadError("the payload is not a JSON object")
    webhook = payload.get("webhook")
    version = webhook.get("version") if isinstance(webhook, dict) else None
    if version != 3:
        raise PayloadError(f"payload version {version!r} is not supported; hubc reads Hub webhook payloads of version 3")
    event = _field(payload, "event", dict, "")
    scope, action = _field(event, "scope", str, "event."), _field(event, "action", str, "event.")
    repo = _field(payload, "repo", dict, "")
    name, kind = _field(repo, "name", str, "repo."), _field(repo, "type", str, "repo.")
    if scope != "repo.content" and not scope.startswith("repo.content."):
        if scope == "repo" and action == "create":
            return Ignored("repo created: no content to build yet (its first commit triggers a build)", name)
        return Ignored(f"scope {scope}/{action} is not a content update", name)
    if kind != "model":
        return Ignored(f"{kind} repos are not built (only model repos)", name)
    if not watches(name):
        return Ignored(f"{name} is not watched (watch.yaml: watch.repos / watch.owners)", name)
    refs = payload.get("updatedRefs")
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise PayloadError("the payload's updatedRefs is missing or not a list of refs")
    main = [r for r in refs if r.get("ref") == MAIN]
    if not main:
        others = ", ".join(str(r.get("ref")) for r in refs) or "none"
        return Ignored(f"no update of {MAIN} (updated: {others})", name)
    sha = main[-1].get("newSha")
    if sha is None:
        return Ignored(f"{MAIN} was deleted", name)
    if not isinstance(sha, str) or not _SHA.match(sha):
        raise PayloadError(f"updatedRefs newSha {sha!r} is not a 40-hex commit sha")
    return Accepted(name, sha)
