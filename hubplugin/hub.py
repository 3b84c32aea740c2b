"""The only place hubc talks to the Hugging Face Hub: download a model snapshot, push a variant folder.

Everything goes through `huggingface_hub`, so HF_ENDPOINT, HF_TOKEN, the token file and the shared cache behave as
users expect from other HF tools. `huggingface_hub` is imported inside the functions to keep `import hubplugin.hub`
(and thus `hubc --help`) cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from hubplugin.errors import AuthRequiredError, HubcError, ModelNotFoundError, NotAModelError, PushError

if TYPE_CHECKING:
    from huggingface_hub import HfApi

# Files a transformers model folder needs besides its weights (config, tokenizer, chat template, card).
_MODEL_FILES = [
    "*.json",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "*.jinja",
    "*.py",
    "tokenizer*",
    "README.md",
    "LICENSE*",
]
# Alternative checkpoints that some repos carry next to the transformers one; never what hubc loads.
_IGNORED = ["original/*", "onnx/*", "openvino/*", "coreml/*", "*.msgpack", "*.h5", "*.ot"]
# What `upload_folder` skips too: git metadata and the local_dir download cache.
_NEVER_PUSHED = (".git", ".cache")
_LOGIN_HINT = "set HF_TOKEN=... or run `hf auth login`, and accept the repo's terms on the Hub"


@dataclass(frozen=True)
class HubSnapshot:
    """A downloaded model: `revision` is the commit sha the reference resolved to, so results can cite it."""

    repo_id: str
    revision: str
    path: Path


@dataclass(frozen=True)
class PushResult:
    """What a push produced; `created_repo` tells whether the repo was new, `url` is `<endpoint>/<org>/<name>`."""

    repo_id: str
    url: str
    commit_sha: str
    created_repo: bool


def _api(token: str | None = None) -> HfApi:
    """One client per call so the endpoint is read from HF_ENDPOINT / constants at call time, not import time."""
    from huggingface_hub import HfApi

    return HfApi(library_name="hubc", library_version=_version(), token=token)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hubc")
    except PackageNotFoundError:
        return "0+unknown"


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection-level failures; huggingface_hub 2.x uses httpx2, 1.x httpx, and the cache fallback raises
    LocalEntryNotFoundError when the network drops mid-download."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        import httpx2 as httpx  # type: ignore[import-not-found]
    except ImportError:
        import httpx  # type: ignore[no-redef]
    return (httpx.TransportError, LocalEntryNotFoundError)


def _reason(err: Exception) -> str:
    """The Hub's own words for a failure, on one line (the client's message spans several)."""
    message = getattr(err, "server_message", None) or str(err)
    status = getattr(getattr(err, "response", None), "status_code", None)
    line = " ".join(message.split())
    return f"{status}: {line}" if status else line


def _raise_download_error(err: Exception, repo_id: str, revision: str | None, endpoint: str) -> NoReturn:
    """Turn client exceptions into hubc's typed errors. The order matters: GatedRepoError and
    RevisionNotFoundError are subclasses of RepositoryNotFoundError."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, GatedRepoError):
        raise AuthRequiredError(
            f"'{repo_id}' on {endpoint} is gated and this token has no access", _LOGIN_HINT
        ) from err
    if isinstance(err, RevisionNotFoundError):
        raise ModelNotFoundError(
            f"model repo '{repo_id}' on {endpoint} has no revision '{revision}'",
            "name an existing branch, tag or commit sha",
        ) from err
    if isinstance(err, RepositoryNotFoundError):
        # The Hub answers a private repo you may not read exactly like a missing one, so we cannot tell them apart.
        raise ModelNotFoundError(
            f"no model repo '{repo_id}' on {endpoint}", "check the id, or set HF_TOKEN if it is private"
        ) from err
    if isinstance(err, HfHubHTTPError) and err.response.status_code in (401, 403):
        raise AuthRequiredError(
            f"the Hub refused access to '{repo_id}' ({_reason(err)})", _LOGIN_HINT
        ) from err
    if isinstance(err, HfHubHTTPError):
        raise HubcError(
            f"the Hub at {endpoint} failed on '{repo_id}' ({_reason(err)})", "try again later"
        ) from err
    raise HubcError(
        f"cannot reach the Hub at {endpoint} ({type(err).__name__})",
        "check the network, or HF_ENDPOINT if you use a mirror",
    ) from err


def _download_patterns(repo_id: str, files: list[str]) -> list[str]:
    """Pick the weights to fetch: safetensors when the repo has them, else the pickle-era formats, so a repo that
    carries both never costs a second copy of the model."""
    if "config.json" not in files:
        raise NotAModelError(
            f"'{repo_id}' has no config.json, so it is not a transformers model repo",
            "name the base model repo (a GGUF-only repo needs its .gguf file named)",
        )
    if any(f.endswith(".safetensors") for f in files):
        weights = ["*.safetensors"]
    elif any(f.endswith((".bin", ".pth", ".pt")) for f in files):
        weights = ["*.bin", "*.pth", "*.pt"]
    else:
        ggufs = [f for f in files if f.endswith(".gguf")]
        if len(ggufs) != 1:
            raise NotAModelError(
                f"'{repo_id}' has no single weights format hubc can load ({len(ggufs)} .gguf files, no safetensors)",
                "name a repo with safetensors weights",
            )
        weights = ggufs
    return _MODEL_FILES + weights


def download(
    repo_id: str, revision: str | None = None, token: str | None = None, cache_dir: str | Path | None = None
) -> HubSnapshot:
    """Fetch a model repo into the HF cache, pinned to one commit.

    The revision is resolved to a sha first and everything after uses that sha, so a push to the repo during the
    download cannot mix files of two commits. `token=None` lets huggingface_hub find HF_TOKEN or the login token.
    """
    from huggingface_hub import snapshot_download

    api = _api(token)
    try:
        info = api.model_info(repo_id, revision=revision)
        if info.sha is None:
            raise HubcError(f"the Hub at {api.endpoint} returned no commit for '{repo_id}'")
        patterns = _download_patterns(repo_id, [s.rfilename for s in info.siblings or []])
        path = snapshot_download(
            repo_id,
            revision=info.sha,
            allow_patterns=patterns,
            ignore_patterns=_IGNORED,
            token=token,
            cache_dir=cache_dir,
            library_name="hubc",
            library_version=_version(),
            endpoint=api.endpoint,
        )
    except HubcError:
        raise
    except Exception as err:
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(err, (HfHubHTTPError, *_transport_errors())):
            _raise_download_error(err, repo_id, revision, api.endpoint)
        raise
    return HubSnapshot(repo_id=info.id, revision=info.sha, path=Path(path))


def _folder_files(folder: Path) -> dict[str, Path]:
    """Every file to push, keyed by its path in the repo; symlinks are followed (HF cache snapshots are links)."""
    if not folder.is_dir():
        raise PushError(f"nothing to push: {folder} is not a folder", "point at the output folder of hubc")
    files = {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in _NEVER_PUSHED
    }
    if not files:
        raise PushError(f"nothing to push: {folder} is empty", "point at the output folder of hubc")
    return files


def _check_card(files: dict[str, Path]) -> None:
    """Reject a README whose metadata the Hub would refuse, before anything is created remotely."""
    if "README.md" not in files:
        return
    import yaml
    from huggingface_hub import ModelCard

    try:
        ModelCard(files["README.md"].read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise PushError(
            f"README.md has invalid metadata: {' '.join(str(err).split())}",
            "fix the YAML block at the top of README.md",
        ) from err


def _whoami(api: HfApi, token: str | None) -> dict:
    """Check the token before any write, so a missing or read-only token fails without side effects."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = token or get_token()
    if not token:
        raise AuthRequiredError("pushing to the Hub needs a token with write access", _LOGIN_HINT)
    try:
        me = api.whoami(token=token)
    except HfHubHTTPError as err:
        if err.response.status_code == 401:
            raise AuthRequiredError("the Hub rejected the token (invalid or expired)", _LOGIN_HINT) from err
        raise PushError(
            f"the Hub at {api.endpoint} failed to check the token ({_reason(err)})", "try again later"
        ) from err
    except _transport_errors() as err:
        raise HubcError(
            f"cannot reach the Hub at {api.endpoint} ({type(err).__name__})",
            "check the network, or HF_ENDPOINT if you use a mirror",
        ) from err
    if (me.get("auth", {}).get("accessToken") or {}).get("role") == "read":
        raise AuthRequiredError(
            "the token is read-only; pushing needs write access",
            "create a write token at https://huggingface.co/settings/tokens and set HF_TOKEN",
        )
    return me


def check_push_access(repo_id: str, token: str | None = None) -> str:
    """Fail before a long run when a later push could not succeed: bad repo id, no token, read-only token.

    Returns the full repo id (a bare name is put in the token owner's namespace).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"'{repo_id}' is not a valid repo id", "use the form org/name") from err
    me = _whoami(_api(token), token)
    return repo_id if "/" in repo_id else f"{me['name']}/{repo_id}"


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str,
    revision: str = "main",
) -> PushResult:
    """Publish every file of `folder` as ONE commit, creating the repo when needed.

    One `create_commit` (never `upload_folder`, which may split large uploads into several commits) keeps the
    variant atomic: the repo shows either the whole variant or nothing of it. A repo created here is deleted again
    when the commit fails, so a failed push leaves no half-written repo behind. An existing repo keeps its
    visibility; `private` only applies to a new one.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"'{repo_id}' is not a valid repo id", "use the form org/name") from err
    files = _folder_files(folder)
    _check_card(files)
    api = _api(token)
    me = _whoami(api, token)
    if "/" not in repo_id:
        repo_id = f"{me['name']}/{repo_id}"

    created = False
    try:
        api.create_repo(repo_id, private=private, exist_ok=False)
        created = True
    except HfHubHTTPError as err:
        if err.response.status_code in (401, 403):
            raise AuthRequiredError(
                f"the token may not write to '{repo_id}' ({_reason(err)})",
                "use a write token of a user or org that owns the namespace",
            ) from err
        if err.response.status_code != 409:  # 409: it exists already, which is fine
            raise PushError(f"could not create '{repo_id}' ({_reason(err)})", "try again later") from err
    except _transport_errors() as err:
        raise HubcError(
            f"cannot reach the Hub at {api.endpoint} ({type(err).__name__})",
            "check the network, or HF_ENDPOINT if you use a mirror",
        ) from err

    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()
    ]
    try:
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    except Exception as err:
        raise _failed_push(api, repo_id, created, err) from err
    except BaseException:  # Ctrl-C mid-upload: still remove the repo we created, then stop as asked
        if created:
            _delete_quietly(api, repo_id)
        raise
    return PushResult(repo_id=repo_id, url=str(info.repo_url), commit_sha=info.oid, created_repo=created)


def _failed_push(api: HfApi, repo_id: str, created: bool, err: Exception) -> PushError:
    """Undo our own repo creation so a failed push leaves the Hub as it found it, and say what went wrong."""
    cleanup = ""
    if created and (problem := _delete_quietly(api, repo_id)):
        cleanup = f"; the new repo could not be removed ({problem}), delete it on the Hub"
    elif created:
        cleanup = "; the new repo was removed again"
    status = getattr(getattr(err, "response", None), "status_code", None)
    hint = (
        "check the token's write access" if status in (401, 403) else "nothing was committed; retry the push"
    )
    return PushError(f"push to '{repo_id}' failed: {_reason(err)}{cleanup}", hint)


def _delete_quietly(api: HfApi, repo_id: str) -> str | None:
    """Delete a repo we created; return why that failed instead of raising, so the original error is reported."""
    try:
        api.delete_repo(repo_id, missing_ok=True)
    except Exception as err:  # noqa: BLE001 - the caller reports the push failure, this only adds to it
        return _reason(err)
    return None
