"""The HTTP side of tests/fakehub.py: the request handler and the routes of the Hub's API it answers."""

from __future__ import annotations

import base64
import json
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote

import yaml
from fakehub import *


class Handler(BaseHTTPRequestHandler):
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
        front_matter(json.loads(req.body)["content"])
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
        card = front_matter(commit.files.get("README.md", b"").decode(errors="replace"))
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
