"""A small in-memory Hugging Face Hub that the real `huggingface_hub` client talks to over loopback.

Tests need the client's real behaviour (URL building, error mapping, caching), so we fake the server, not the
client. The wire format follows /work/shared/notes/hub-protocol.md §1: every 404 carries `X-Error-Code` (the
client's 401-means-not-found heuristic only fires for https URLs), every file is "regular" (inline base64 in the
commit, so neither LFS nor Xet is ever needed), downloads are served inline and never carry Xet headers.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Self

import yaml

# Content the real Hub puts in the "initial commit" of a new repo (abridged; only its presence matters).
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
INVALID_TOKEN = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class Account:
    """Who a token belongs to; `orgs` are the namespaces besides `name` the account may read and write."""

    name: str
    orgs: tuple[str, ...] = ()
    role: str = "write"


@dataclass(frozen=True)
class Commit:
    """One commit with the full file map of the repo at that point, so any old revision can be served."""

    sha: str
    message: str
    files: dict[str, bytes]
    parent: str | None


@dataclass
class Repo:
    """A model repo; `log` is newest last, `refs` maps branch names to commit shas."""

    repo_id: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)
    log: list[Commit] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, rev: str) -> Commit | None:
        """Resolve a branch name or a full commit sha, as the Hub does for `/revision/`, `/tree/`, `/resolve/`."""
        sha = self.refs.get(rev, rev)
        return next((c for c in self.log if c.sha == sha), None)


@dataclass(frozen=True)
class Request:
    """One request as the server saw it, for assertions such as "no POST happened"."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int = 0


class HubError(Exception):
    """Raised inside a route to answer with an error the way the Hub does (status, X-Error-Code, JSON body)."""

    def __init__(
        self, status: int, message: str, code: str | None = None, extra: dict | None = None, headers=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}
        self.headers: dict[str, str] = headers or {}


def blob_sha(data: bytes) -> str:
    """Git blob sha1: the Hub's ETag for regular files, which the client uses as the cache blob name."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The server plus its state. Use as a context manager or call `start()` / `stop()`."""

    def __init__(self, tokens: dict[str, Account] | None = None) -> None:
        self.token = "hf_fake_write_token"
        self.read_token = "hf_fake_read_token"
        self.tokens = tokens or {
            self.token: Account("tester", orgs=("org",)),
            self.read_token: Account("reader", role="read"),
        }
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.fail_next_commit = False
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> Self:
        hub = self

        from fakehub_http import Handler as BaseHandler

        class Handler(BaseHandler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        serve = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)  # quick stop()
        serve.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- seeding and reading back (direct, no HTTP) ------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: Path | str | dict[str, bytes | str],
        *,
        private: bool = False,
        gated: bool = False,
    ) -> str:
        """Create a repo whose first commit holds `files` (a folder or a path->content dict); return its sha."""
        with self._lock:
            if repo_id in self.repos:
                raise ValueError(f"{repo_id} exists")
            self.repos[repo_id] = Repo(repo_id, private=private, gated=gated)
            return self.add_commit(repo_id, files, message="Initial commit")

    def add_commit(
        self,
        repo_id: str,
        files: Path | str | dict[str, bytes | str],
        *,
        message: str = "Update",
        branch="main",
    ) -> str:
        """Commit `files` on top of `branch` (added or replaced, nothing deleted); return the new sha."""
        with self._lock:
            repo = self.repos[repo_id]
            head = repo.commit(branch) if branch in repo.refs else None
            tree = dict(head.files) if head else {}
            tree.update(_read_files(files))
            return self._apply(repo, branch, message, tree)

    def grant(self, repo_id: str, user: str) -> None:
        """Accept a gated repo's terms on behalf of `user`."""
        self.repos[repo_id].granted.add(user)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The repo's files at `revision` (a branch or a sha)."""
        commit = self.repos[repo_id].commit(revision)
        assert commit is not None, f"{repo_id} has no revision {revision}"
        return dict(commit.files)

    def commits(self, repo_id: str) -> list[Commit]:
        """All commits of the repo, oldest first."""
        return list(self.repos[repo_id].log)

    def _apply(self, repo: Repo, branch: str, message: str, tree: dict[str, bytes]) -> str:
        parent = repo.refs.get(branch)
        sha = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{message}\0{next(self._counter)}".encode()).hexdigest()
        repo.log.append(Commit(sha, message, tree, parent))
        repo.refs[branch] = sha
        return sha

    # ---- access control -----------------------------------------------------------------------------------------
    def account(self, headers: dict[str, str]) -> Account | None:
        """The caller, or None when anonymous; a token that is sent but unknown is rejected like the Hub does."""
        auth = headers.get("authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, INVALID_TOKEN)
        return self.tokens[token]

    def readable(self, repo_id: str, who: Account | None) -> Repo:
        """A private repo the caller may not see is indistinguishable from a missing one (401 anonymous, 404 else)."""
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not _member(who, repo_id)):
            raise HubError(401 if who is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def check_content(self, repo: Repo, who: Account | None) -> None:
        """Gated repos show metadata to anyone but serve files only to owners and users who accepted the terms."""
        if not repo.gated or _member(who, repo.repo_id) or (who and who.name in repo.granted):
            return
        if who is None:
            raise HubError(401, f"Access to model {repo.repo_id} is restricted. Please log in.", "GatedRepo")
        raise HubError(
            403,
            f"Access to model {repo.repo_id} is restricted and you are not in the authorized list.",
            "GatedRepo",
        )

    def writable(self, namespace: str, who: Account | None) -> Account:
        if who is None:
            raise HubError(401, "You must be authenticated to write")
        if who.role == "read" or (namespace != who.name and namespace not in who.orgs):
            raise HubError(403, f'You don\'t have the rights to write in the namespace "{namespace}"')
        return who


def _member(who: Account | None, repo_id: str) -> bool:
    ns = repo_id.split("/")[0]
    return who is not None and (ns == who.name or ns in who.orgs)


def _read_files(files: Path | str | dict[str, bytes | str]) -> dict[str, bytes]:
    if isinstance(files, dict):
        return {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}
    root = Path(files)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def front_matter(text: str) -> dict | None:
    """The YAML block of a README, as the Hub parses it into `cardData`; raises ValueError when malformed."""
    if not text.startswith("---"):
        return None
    parts = text.split("\n---", 1)
    if len(parts) != 2:
        raise ValueError("front matter is not closed with ---")
    data = yaml.safe_load(parts[0].removeprefix("---"))
    if data is not None and not isinstance(data, dict):
        raise ValueError("metadata must be a YAML mapping")
    return data
