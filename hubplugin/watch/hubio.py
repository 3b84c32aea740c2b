"""What `hubc watch` asks the Hub besides `hubc optimize`'s own calls: is a commit worth building (not a hubc
variant, still the head of main, a model), and has hubc already pushed the variant of a base commit.

Through huggingface_hub only, so HF_ENDPOINT and HF_TOKEN behave as for every other hubc command.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HubUnavailable", "VariantCommit", "find_variant_commit", "hubc_variant_reason", "screen"]

HUBC_TAG = "hubc"
COMMIT_PREFIX = "hubc:"
"""Every variant commit hubc makes starts with this (hubplugin.optimize's commit message)."""


class HubUnavailable(Exception):
    """The Hub could not answer now (network, 5xx, rate limit): try again later."""


@dataclass(frozen=True)
class VariantCommit:
    """hubc's commit of the variant of one base commit."""

    url: str
    commit_sha: str


def _api():
    from huggingface_hub import HfApi

    from hubplugin import __version__

    return HfApi(library_name="hubc", library_version=__version__)


def _is_missing(err: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    return isinstance(err, RepositoryNotFoundError) or (
        isinstance(err, HfHubHTTPError) and getattr(err.response, "status_code", None) in (401, 403, 404))


def _unavailable(err: Exception) -> HubUnavailable:
    status = getattr(getattr(err, "response", None), "status_code", None)
    return HubUnavailable(f"the Hub did not answer ({status or type(err).__name__}: {' '.join(str(err).split())[:200]})")


def hubc_variant_reason(card: dict | None, tags: list[str] | None = None) -> str | None:
    """Why a repo whose card metadata is `card` is a variant hubc made (base_model_relation set and the hubc
    tag), else None."""
    if not card:
        return None
    card_tags = card.get("tags") or []
    relation = card.get("base_model_relation")
    if relation and HUBC_TAG in [*card_tags, *(tags or [])]:
        return f"a hubc variant of {card.get('base_model')} (card: base_model_relation {relation}, tag hubc)"
    return None


def screen(repo: str, sha: str) -> str | None:
    """Why commit `sha` of `repo` is not built (a hubc variant, no longer main's head, not a model, unreadable),
    or None to build it. Raises HubUnavailable when the Hub cannot answer now."""
    try:
        info = _api().model_info(repo)
    except Exception as err:
        if _is_missing(err):
            return f"{repo} is not readable with this token (missing, private or gated)"
        raise _unavailable(err) from err
    card = info.card_data.to_dict() if info.card_data is not None else None
    variant = hubc_variant_reason(card, info.tags)
    if variant:
        return f"{repo} is {variant}: hubc's own push"
    if info.sha != sha:
        return f"{sha[:12]} is no longer the head of main ({info.sha[:12] if info.sha else 'none'} is)"
    files = {s.rfilename for s in info.siblings or []}
    if "config.json" not in files:
        return f"{repo} has no config.json at {sha[:12]}: not a transformers model (yet)"
    return None


def find_variant_commit(variant_repo: str, base_repo: str, sha: str) -> VariantCommit | None:
    """hubc's commit in `variant_repo` whose card pins `base_repo` at `sha`, if there is one (newest first).
    Raises HubUnavailable when the Hub cannot answer now."""
    api = _api()
    try:
        commits = api.list_repo_commits(variant_repo)
    except Exception as err:
        if _is_missing(err):
            return None
        raise _unavailable(err) from err
    for commit in commits:
        if not commit.title.startswith(COMMIT_PREFIX):
            continue
        try:
            info = api.model_info(variant_repo, revision=commit.commit_id)
        except Exception as err:
            raise _unavailable(err) from err
        card = info.card_data.to_dict() if info.card_data is not None else {}
        if card.get("base_model") == base_repo and card.get("base_model_revision") == sha:
            return VariantCommit(url=f"{api.endpoint}/{variant_repo}", commit_sha=commit.commit_id)
    return None
