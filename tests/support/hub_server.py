"""A loopback Hugging Face Hub for tests: the HTTP API the real `huggingface_hub` 2.4 client speaks for
create_repo, repo info, preupload + commit (regular and LFS files, deletions), the LFS batch upload
(batch -> PUT -> verify), tree listing, download (GET/HEAD on resolve) and super-squash.

Repos live in memory. Every commit keeps a snapshot of the tree, so a test can count commits and the
bytes history holds (what super_squash_history frees). `fail(...)` makes the server answer 429 (with
Retry-After) or 5xx for the next N requests or for a time window, as the real Hub does when it is
rate limiting or unwell (a support.loopback.Fault, as every loopback server's).

It speaks LFS, not Xet: with `hf_xet` installed the 2.4 client always uploads through Xet unless
`HF_HUB_DISABLE_XET` is set (see `huggingface_hub.utils._runtime.is_xet_available`), so the
`hub_server` fixture sets that switch. Downloads fall back to plain HTTP because no `X-Xet-Hash`
header is ever sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

from support.loopback import Fault, LoopbackServer, Request

LFS_SUFFIXES = (".safetensors", ".pt", ".bin", ".png", ".jpg", ".jpeg", ".webp", ".ckpt")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub's threshold for binary-by-size
_REPO = r"(?P<repo>[\w.-]+(?:/[\w.-]+)?)"
_MODEL = rf"/api/models/{_REPO}"


@dataclass(frozen=True)
class _Route:
    verb: str
    pattern: re.Pattern
    endpoint: Callable
    repo: bool  # the endpoint is handed the repository its path names (and the revision must be main)
    auth: bool  # the request must carry the token (LFS uploads go to a pre-signed URL: they need none)


_ROUTES: list[_Route] = []


def _route(verb: str, pattern: str, *, repo: bool = False, auth: bool = True) -> Callable:
    """Serve `verb` on paths that fully match `pattern` with the endpoint below. With repo=True the
    endpoint gets the repository after the checks every such endpoint needs: 404 for an unknown repo,
    and 404 for a revision other than main when the pattern names one."""

    def register(endpoint: Callable) -> Callable:
        _ROUTES.append(_Route(verb, re.compile(pattern), endpoint, repo, auth))
        return endpoint

    return register


def git_blob_sha1(data: bytes) -> str:
    """git's object id of a blob: sha1 over 'blob <size>\\0' + content (what the Hub reports as oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """The tree oid: git's sha1 of the content, or of the LFS pointer file for LFS files."""
        if not self.lfs:
            return git_blob_sha1(self.data)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        return git_blob_sha1(pointer.encode())


@dataclass
class Commit:
    oid: str
    title: str
    tree: dict[str, Blob]  # the whole tree after this commit
    time: float


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, Blob] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)
    squashes: int = 0

    @property
    def head(self) -> str:
        return self.commits[-1].oid

    def commit(self, title: str, files: dict[str, Blob]) -> Commit:
        self.files = files
        self.commits.append(Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], title, dict(files), time.time()))
        return self.commits[-1]

    def history_bytes(self) -> int:
        """Bytes every commit in history still references: deleted files keep their space until squashed."""
        blobs = {(b.sha256, len(b.data)) for c in self.commits for b in c.tree.values()}
        return sum(size for _, size in blobs)

    def read(self, path: str) -> bytes:
        return self.files[path].data


class HubState:
    """What the server holds; shared by the handler threads under one lock."""

    def __init__(self, server: HubServer, token: str | None = None, user: str = "relay-tester"):
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded by PUT before a commit
        self.unauthorized = 0  # requests whose Authorization header did not carry the token
        self.lock = threading.RLock()
        self._server = server

    def count(self, method: str, pattern: str, status: int | None = None) -> int:
        return self._server.count(method, pattern, status)


class HubServer(LoopbackServer):
    """The Hub on 127.0.0.1:port (`url`), serving from daemon threads once started."""

    name = "hub-server"

    def __init__(self, port: int = 0, token: str | None = None):
        super().__init__(port)
        self.state = HubState(self, token=token)

    @property
    def repos(self) -> dict[str, Repo]:
        return self.state.repos

    def fail(
        self,
        status: int | Fault = 429,
        *,
        count: int | None = None,
        seconds: float | None = None,
        retry_after: float | None = None,
        path: str | None = None,
        start_in: float = 0.0,
    ) -> None:
        """Answer `status` to the next `count` requests, or to all requests for `seconds` (matching the
        regex `path` when given), starting `start_in` seconds from now. 429s carry Retry-After (default
        1 s) as the real Hub's do. Any other Fault may be passed as it is."""
        if isinstance(status, Fault):
            return super().fail(status)
        if count is None and seconds is None:
            raise ValueError("fail() needs count= or seconds=")
        if status == 429 and retry_after is None:
            retry_after = 1
        super().fail(
            Fault("status", status=status, count=count, seconds=seconds, retry_after=retry_after, path=path, start_in=start_in)
        )

    def fault_answer(self, fault: Fault) -> tuple[bytes, dict[str, str], str]:
        message = f"injected {fault.status}"
        return json.dumps({"error": message}).encode(), {"X-Error-Message": message}, "application/json"

    def handle(self, handler, request: Request) -> None:
        call = _Call(self, handler, request)
        for route in _ROUTES:
            match = route.pattern.fullmatch(request.path)
            if match and (route.verb == request.method or (route.verb == "GET" and request.method == "HEAD")):
                if route.auth and not call._authorized():
                    return call._error(401, "Invalid credentials in Authorization header")
                try:
                    with self.state.lock:
                        return call._serve(route, match)
                except Exception as exc:  # a server bug: answer 500 with its text rather than hang the client
                    return call._error(500, f"hub_server error: {exc!r}")
        call._error(404, f"no route for {request.method} {request.path}")


class _Call:
    """One request as the endpoints below see it: its headers, the server's state, and how to answer."""

    def __init__(self, server: HubServer, handler, request: Request):
        self.server, self.handler, self.request = server, handler, request
        self.headers, self.command = handler.headers, request.method

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base_url(self) -> str:
        return str(self.server.url)

    def _send(
        self,
        status: int,
        body: bytes | dict | list = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.server.reply(self.handler, status, body, headers, content_type)

    def _error(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self._send(status, {"error": message}, extra)

    def _authorized(self) -> bool:
        token = self.state.token
        if token is None:
            return True
        ok = self.headers.get("Authorization", "") == f"Bearer {token}"
        if not ok:
            with self.state.lock:
                self.state.unauthorized += 1
        return ok

    def _repo(self, match: re.Match) -> Repo | None:
        repo = self.state.repos.get(unquote(match["repo"]))
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    def _revision_ok(self, match: re.Match) -> bool:
        """True when the path names no revision, or main (the only branch this Hub has)."""
        if match.re.groupindex.get("rev") and match["rev"] is not None and unquote(match["rev"]) != "main":
            self._error(404, f"Invalid rev id: {match['rev']}", "RevisionNotFound")
            return False
        return True

    def _serve(self, route: _Route, match: re.Match) -> None:
        query, body = self.request.query, self.request.body
        if not route.repo:
            return route.endpoint(self, match, query, body)
        if (repo := self._repo(match)) is not None and self._revision_ok(match):
            route.endpoint(self, repo, match, query, body)

    # -- endpoints ----------------------------------------------------------------------------------------
    @_route("POST", r"/api/repos/create")
    def _create_repo(self, match, query, body) -> None:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.state.user}/{payload['name']}"
        url = f"{self.base_url}/{repo_id}"
        if repo_id in self.state.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        repo.commit("initial commit", {".gitattributes": Blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", lfs=False)})
        self.state.repos[repo_id] = repo
        self._send(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex})

    @_route("GET", rf"{_MODEL}(?:/revision/(?P<rev>[^/]+))?", repo=True)
    def _repo_info(self, repo, match, query, body) -> None:
        self._send(
            200,
            {
                "id": repo.repo_id,
                "sha": repo.head,
                "private": repo.private,
                "siblings": [{"rfilename": p} for p in sorted(repo.files)],
            },
        )

    @_route("POST", r"/api/validate-yaml")
    def _validate_yaml(self, match, query, body) -> None:
        self._send(200, {"errors": [], "warnings": []})

    @_route("POST", rf"{_MODEL}/preupload/(?P<rev>[^/]+)", repo=True)
    def _preupload(self, repo, match, query, body) -> None:
        files = []
        for entry in json.loads(body)["files"]:
            sample = base64.b64decode(entry["sample"])
            lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] >= LFS_MIN_SIZE or b"\0" in sample
            existing = repo.files.get(entry["path"])
            oid = None if existing is None else (existing.sha256 if existing.lfs else git_blob_sha1(existing.data))
            files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files, "commitOid": repo.head})

    @_route("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", repo=True)
    def _lfs_batch(self, repo, match, query, body) -> None:
        request = json.loads(body)
        base = self.base_url
        objects = []
        for obj in request["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{base}/lfs-upload/{repo.repo_id}/{obj['oid']}", "expires_in": 3600},
                    "verify": {"href": f"{base}/lfs-verify/{repo.repo_id}", "header": {}},
                }
            objects.append(entry)
        # "basic" only: never "xet", so a client that asks falls back to the plain PUT transfer.
        self._send(
            200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, content_type="application/vnd.git-lfs+json"
        )

    @_route("PUT", rf"/lfs-upload/{_REPO}/(?P<oid>[0-9a-f]{{64}})", auth=False)
    def _lfs_put(self, match, query, body) -> None:
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            return self._error(400, "uploaded content does not match its sha256 oid")
        self.state.lfs_objects[match["oid"]] = body
        self._send(200, b"", content_type="text/plain")

    @_route("POST", rf"/lfs-verify/{_REPO}")
    def _lfs_verify(self, match, query, body) -> None:
        request = json.loads(body)
        data = self.state.lfs_objects.get(request["oid"])
        if data is None or len(data) != request["size"]:
            return self._error(404, f"LFS object {request['oid']} not found or wrong size")
        self._send(200, {"ok": True})

    @_route("POST", rf"{_MODEL}/commit/(?P<rev>[^/]+)", repo=True)
    def _commit(self, repo, match, query, body) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._error(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, repo.head):
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                files[path] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.state.lfs_objects.get(value["oid"])
                if data is None:
                    return self._error(422, f"LFS object {value['oid']} for {path} was never uploaded")
                files[path] = Blob(data, lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    return self._error(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    return self._error(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                return self._error(400, f"unknown commit operation {key!r}")
        commit = repo.commit(header["summary"], files)
        base = self.base_url
        self._send(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{base}/{repo.repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None,
            },
        )

    @_route("GET", rf"{_MODEL}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", repo=True)
    def _tree(self, repo, match, query, body) -> None:
        prefix = unquote(match["path"] or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        under = {p: b for p, b in repo.files.items() if not prefix or p.startswith(prefix + "/")}
        if prefix and not under:
            return self._error(404, f"{prefix} does not exist on main", "EntryNotFound")
        entries, folders = [], set()
        for path, blob in sorted(under.items()):
            rest = path[len(prefix) + 1 :] if prefix else path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append(
                        {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder}
                    )
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
                entries.append(entry)
        self._send(200, entries)

    @_route("GET", rf"{_MODEL}/commits/(?P<rev>[^/]+)", repo=True)
    def _commits(self, repo, match, query, body) -> None:
        self._send(
            200,
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": "",
                    "authors": [],
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(c.time)),
                }
                for c in reversed(repo.commits)
            ],
        )

    @_route("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", repo=True)
    def _resolve(self, repo, match, query, body) -> None:
        path = unquote(match["path"])
        blob = repo.files.get(path)
        if blob is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": repo.head})
        headers = {"X-Repo-Commit": repo.head, "ETag": f'"{blob.oid}"'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        self._send(200, blob.data, headers, content_type="application/octet-stream")

    @_route("POST", rf"{_MODEL}/super-squash/(?P<rev>[^/]+)", repo=True)
    def _super_squash(self, repo, match, query, body) -> None:
        message = json.loads(body or b"{}").get("message") or "Super-squash"
        repo.commits = [Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], message, dict(repo.files), time.time())]
        repo.squashes += 1
        self._send(200, {"commitId": repo.head})
