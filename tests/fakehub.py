"""A small in-memory Hugging Face Hub that the real `huggingface_hub` client talks to over loopback.

Tests need the client's real behaviour (URL building, error mapping, caching), so we fake the server, not the
client. The wire format follows /work/shared/notes/hub-protocol.md §1: every 404 carries `X-Error-Code` (the
client's 401-means-not-found heuristic only fires for https URLs), every file is "regular" (inline base64 in the
commit, so neither LFS nor Xet is ever needed), downloads are served inline and never carry Xet headers.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, unquote

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

        class Handler(_Handler):
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


def _front_matter(text: str) -> dict | None:
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client pools connections
    fake: FakeHub

    def log_message(self, *args: object) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_DELETE = do_PUT = do_GET

    def _dispatch(self) -> None:
        raw_path, _, raw_query = self.path.partition("?")
        segs = [unquote(s) for s in raw_path.split("/")[1:]]
        headers = {k.lower(): v for k, v in self.headers.items()}
        # Always drain the body (the client sends Content-Length): an unread body corrupts the next request on a
        # kept-alive connection.
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        req = Request(self.command, raw_path, parse_qs(raw_query), headers, body)
        hub = self.fake
        try:
            with hub._lock:
                try:
                    status, extra_headers, payload = _route(hub, req, segs, hub.account(headers))
                except (ValueError, KeyError, TypeError) as e:  # a malformed request must still get an answer
                    raise HubError(400, f"fake hub could not parse the request: {e!r}") from e
        except HubError as e:
            status, payload = e.status, {"error": e.message, **e.extra}
            extra_headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                extra_headers["X-Error-Code"] = e.code
        with hub._lock:
            hub.requests.append(Request(req.method, req.path, req.query, req.headers, req.body, status))
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", extra_headers.pop("Content-Length", str(len(data))))
        for k, v in extra_headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


Response = tuple[int, dict[str, str], "dict | list | bytes"]


def _route(hub: FakeHub, req: Request, segs: list[str], who: Account | None) -> Response:
    """Map a request to a handler; paths are split per segment and unquoted (revisions arrive with %2F)."""
    m = req.method
    if segs[:1] == ["api"]:
        rest = segs[1:]
        if rest == ["whoami-v2"] and m == "GET":
            if who is None:
                raise HubError(401, INVALID_TOKEN)
            orgs = [{"name": o} for o in who.orgs]
            auth = {"type": "access_token", "accessToken": {"displayName": "t", "role": who.role}}
            return 200, {}, {"type": "user", "id": "1", "name": who.name, "orgs": orgs, "auth": auth}
        if rest == ["validate-yaml"] and m == "POST":
            return _validate_yaml(req)
        if rest == ["repos", "create"] and m == "POST":
            return _create_repo(hub, req, who)
        if rest == ["repos", "delete"] and m == "DELETE":
            body = json.loads(req.body or b"{}")
            repo_id = f"{body.get('organization') or (who.name if who else '')}/{body['name']}"
            hub.readable(repo_id, who)
            hub.writable(repo_id.split("/")[0], who)
            del hub.repos[repo_id]
            return 200, {}, {}
        if len(rest) >= 3 and rest[0] == "models":
            return _model_api(hub, req, f"{rest[1]}/{rest[2]}", rest[3:], who)
        raise HubError(404, "Not found", "EntryNotFound")  # agent-harnesses and anything unknown
    if len(segs) >= 5 and segs[2] == "resolve" and m in ("GET", "HEAD"):
        return _resolve(hub, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), who)
    raise HubError(404, "Not found", "EntryNotFound")


def _validate_yaml(req: Request) -> Response:
    try:
        _front_matter(json.loads(req.body)["content"])
    except (ValueError, yaml.YAMLError) as e:
        return 400, {}, {"errors": [{"message": f"Invalid YAML metadata: {e}"}], "warnings": []}
    return 200, {}, {"errors": [], "warnings": []}


def _create_repo(hub: FakeHub, req: Request, who: Account | None) -> Response:
    body = json.loads(req.body)
    if who is None:
        raise HubError(401, "You must be authenticated to create a repo")
    repo_id = f"{body.get('organization') or who.name}/{body['name']}"
    url = f"{hub.url}/{repo_id}"
    hub.writable(repo_id.split("/")[0], who)
    if repo_id in hub.repos:
        raise HubError(409, "You already created this model repo", extra={"url": url})
    private = body.get("visibility") == "private" or body.get("private") is True
    repo = hub.repos[repo_id] = Repo(repo_id, private=private)
    hub._apply(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES})
    return 200, {}, {"url": url, "name": repo_id}


def _model_info(repo: Repo, commit: Commit) -> dict:
    try:  # like the Hub, a broken card hides cardData instead of failing the call
        card = _front_matter(commit.files.get("README.md", b"").decode(errors="replace"))
    except (ValueError, yaml.YAMLError):
        card = None
    info = {
        "id": repo.repo_id,
        "author": repo.repo_id.split("/")[0],
        "sha": commit.sha,
        "lastModified": "2026-01-01T00:00:00.000Z",
        "createdAt": "2026-01-01T00:00:00.000Z",
        "private": repo.private,
        "gated": "manual" if repo.gated else False,
        "disabled": False,
        "tags": [],
        "siblings": [{"rfilename": p} for p in sorted(commit.files)],
    }
    if card:
        info["cardData"] = card
    return info


def _model_api(hub: FakeHub, req: Request, repo_id: str, rest: list[str], who: Account | None) -> Response:
    repo = hub.readable(repo_id, who)
    m, what = req.method, rest[0] if rest else None

    def commit_at(rev: str) -> Commit:
        commit = repo.commit(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    if m == "GET" and what is None:
        return 200, {}, _model_info(repo, commit_at("main"))
    if m == "GET" and what == "revision" and len(rest) == 2:
        return 200, {}, _model_info(repo, commit_at(rest[1]))
    if m == "GET" and what == "refs":
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.refs.items()]
        return 200, {}, {"branches": branches, "converts": [], "tags": [], "pullRequests": []}
    if m == "GET" and what == "tree" and len(rest) in (2, 3):
        recursive = req.query.get("recursive", ["false"])[0] in ("true", "True", "1")
        return 200, {}, _tree(commit_at(rest[1]), rest[2] if len(rest) == 3 else "", recursive)
    if m == "POST" and what == "branch" and len(rest) == 2:
        hub.writable(repo_id.split("/")[0], who)
        if rest[1] in repo.refs:
            raise HubError(409, f"Branch {rest[1]} already exists")
        start = json.loads(req.body or b"{}").get("startingPoint") or "main"
        repo.refs[rest[1]] = commit_at(start).sha
        return 200, {}, {}
    if m == "POST" and what == "preupload":
        hub.writable(repo_id.split("/")[0], who)
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in json.loads(req.body)["files"]
        ]
        return 200, {}, {"files": files}
    if m == "POST" and what == "commit" and len(rest) == 2:
        hub.writable(repo_id.split("/")[0], who)
        return _commit(hub, repo, rest[1], req.body)
    raise HubError(404, "Not found", "EntryNotFound")


def _tree(commit: Commit, prefix: str, recursive: bool) -> list[dict]:
    prefix = prefix.strip("/")
    base = f"{prefix}/" if prefix else ""
    entries: dict[str, dict] = {}
    for path, data in sorted(commit.files.items()):
        if not path.startswith(base):
            continue
        parts = path[len(base) :].split("/")
        for depth in range(1, len(parts)):  # the folders on the way down
            if depth > 1 and not recursive:
                break
            folder = base + "/".join(parts[:depth])
            entries.setdefault(
                folder, {"type": "directory", "oid": blob_sha(folder.encode()), "size": 0, "path": folder}
            )
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "oid": blob_sha(data), "size": len(data), "path": path}
    if prefix and not entries:
        raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
    return [entries[k] for k in sorted(entries)]


def _commit(hub: FakeHub, repo: Repo, branch: str, body: bytes) -> Response:
    """Apply an NDJSON commit all-or-nothing: every line is checked before the branch moves."""
    if hub.fail_next_commit:
        hub.fail_next_commit = False
        raise HubError(500, "Internal Error - injected by the fake hub")
    if branch not in repo.refs:
        raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    header = next((x["value"] for x in lines if x["key"] == "header"), None)
    if header is None or not header.get("summary"):
        raise HubError(400, "Commit header with a summary is required")
    if header.get("parentCommit") and header["parentCommit"] != repo.refs[branch]:
        raise HubError(412, "A commit has happened since. Please refresh and try again.")
    tree = dict(hub.files(repo.repo_id, branch))
    for item in lines:
        key, value = item["key"], item["value"]
        if key == "file":
            tree[value["path"]] = base64.b64decode(value["content"])
        elif key == "deletedFile":
            if tree.pop(value["path"], None) is None:
                raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
        elif key == "deletedFolder":
            tree = {p: d for p, d in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
        elif key != "header":
            raise HubError(400, f"fake hub does not support '{key}' operations (preupload said regular)")
    message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
    sha = hub._apply(repo, branch, message, tree)
    url = f"{hub.url}/{repo.repo_id}/commit/{sha}"
    return 200, {}, {"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": ""}


def _resolve(hub: FakeHub, repo_id: str, rev: str, path: str, who: Account | None) -> Response:
    """Serve a file inline with the headers `hf_hub_download` requires (X-Repo-Commit, ETag, sizes)."""
    repo = hub.readable(repo_id, who)
    hub.check_content(repo, who)
    commit = repo.commit(rev)
    if commit is None:
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
    if path not in commit.files:
        raise HubError(
            404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit.sha}
        )
    data = commit.files[path]
    headers = {
        "X-Repo-Commit": commit.sha,
        "ETag": f'"{blob_sha(data)}"',
        "Content-Length": str(len(data)),
        "Content-Type": "application/octet-stream",
    }
    return 200, headers, data
