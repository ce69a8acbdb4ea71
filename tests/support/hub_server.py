"""A loopback Hugging Face Hub for tests: the HTTP API the real `huggingface_hub` 2.4 client speaks for
create_repo, repo info, preupload + commit (regular and LFS files, deletions), the LFS batch upload
(batch -> PUT -> verify), tree listing, download (GET/HEAD on resolve) and super-squash.

Repos live in memory. Every commit keeps a snapshot of the tree, so a test can count commits and the
bytes history holds (what super_squash_history frees). `fail(...)` makes the server answer 429 (with
Retry-After) or 5xx for the next N requests or for a time window, as the real Hub does when it is
rate limiting or unwell.

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
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".pt", ".bin", ".png", ".jpg", ".jpeg", ".webp", ".ckpt")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub's threshold for binary-by-size
_REPO = r"(?P<repo>[\w.-]+(?:/[\w.-]+)?)"


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


@dataclass
class Fault:
    status: int
    remaining: int | None  # requests left to fail, or None for a time window
    until: float | None
    retry_after: float | None
    path: re.Pattern | None
    since: float = 0.0

    def active(self, now: float) -> bool:
        if now < self.since or (self.remaining is not None and self.remaining <= 0):
            return False
        return self.until is None or now < self.until


class HubState:
    """What the server holds and how it misbehaves; shared by the handler threads under one lock."""

    def __init__(self, token: str | None = None, user: str = "relay-tester"):
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded by PUT before a commit
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.unauthorized = 0  # requests whose Authorization header did not carry the token
        self.lock = threading.RLock()

    def fail(self, status: int = 429, *, count: int | None = None, seconds: float | None = None,
             retry_after: float | None = None, path: str | None = None, start_in: float = 0.0) -> None:
        """Answer `status` to the next `count` requests, or to all requests for `seconds` (matching the
        regex `path` when given), starting `start_in` seconds from now. 429s carry Retry-After (default
        1 s) as the real Hub's do."""
        if count is None and seconds is None:
            raise ValueError("fail() needs count= or seconds=")
        if status == 429 and retry_after is None:
            retry_after = 1
        since = time.monotonic() + start_in
        with self.lock:
            self.faults.append(Fault(status, count, since + seconds if seconds is not None else None,
                                     retry_after, re.compile(path) if path else None, since))

    def heal(self) -> None:
        with self.lock:
            self.faults.clear()

    def take_fault(self, path: str) -> Fault | None:
        now = time.monotonic()
        with self.lock:
            for fault in self.faults:
                if fault.active(now) and (fault.path is None or fault.path.search(path)):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault
        return None

    def count(self, method: str, pattern: str, status: int | None = None) -> int:
        with self.lock:
            return sum(1 for m, p, s in self.requests if m == method and re.search(pattern, p)
                       and (status is None or s == status))


class HubServer:
    """The server on 127.0.0.1:port in a daemon thread."""

    def __init__(self, port: int = 0, token: str | None = None):
        self.state = HubState(token=token)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self.state  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.httpd.base_url = self.url  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def repos(self) -> dict[str, Repo]:
        return self.state.repos

    def fail(self, *args, **kwargs) -> None:
        self.state.fail(*args, **kwargs)

    def heal(self) -> None:
        self.state.heal()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet: tests read state, not stderr
        pass

    @property
    def state(self) -> HubState:
        return self.server.state  # type: ignore[attr-defined]

    # -- plumbing ---------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        with self.state.lock:
            self.state.requests.append((self.command, urlparse(self.path).path, status))

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

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        body = self._body() if method in ("POST", "PUT") else b""
        fault = self.state.take_fault(url.path)
        if fault is not None:
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            return self._error(fault.status, f"injected {fault.status}", headers=headers)
        for verb, pattern, handler in _ROUTES:
            match = pattern.fullmatch(url.path)
            if match and (verb == method or (verb == "GET" and method == "HEAD")):
                if not handler.__name__.startswith("_lfs_put") and not self._authorized():
                    return self._error(401, "Invalid credentials in Authorization header")
                try:
                    with self.state.lock:
                        return handler(self, match, parse_qs(url.query), body)
                except Exception as exc:  # a server bug: answer 500 with its text rather than hang the client
                    return self._error(500, f"hub_server error: {exc!r}")
        self._error(404, f"no route for {method} {url.path}")

    def _repo(self, match: re.Match) -> Repo | None:
        repo = self.state.repos.get(unquote(match["repo"]))
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    def _revision_ok(self, match: re.Match) -> bool:
        if unquote(match["rev"]) != "main":
            self._error(404, f"Invalid rev id: {match['rev']}", "RevisionNotFound")
            return False
        return True

    # -- endpoints ----------------------------------------------------------------------------------------
    def _create_repo(self, match, query, body) -> None:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.state.user}/{payload['name']}"
        url = f"{self.server.base_url}/{repo_id}"  # type: ignore[attr-defined]
        if repo_id in self.state.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        repo.commit("initial commit", {".gitattributes": Blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                                                                 lfs=False)})
        self.state.repos[repo_id] = repo
        self._send(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex})

    def _repo_info(self, match, query, body) -> None:
        if (repo := self._repo(match)) is None:
            return
        if match["rev"] is not None and not self._revision_ok(match):
            return
        self._send(200, {"id": repo.repo_id, "sha": repo.head, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(repo.files)]})

    def _validate_yaml(self, match, query, body) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, match, query, body) -> None:
        if (repo := self._repo(match)) is None or not self._revision_ok(match):
            return
        files = []
        for entry in json.loads(body)["files"]:
            sample = base64.b64decode(entry["sample"])
            lfs = (entry["path"].endswith(LFS_SUFFIXES) or entry["size"] >= LFS_MIN_SIZE or b"\0" in sample)
            existing = repo.files.get(entry["path"])
            oid = None if existing is None else (existing.sha256 if existing.lfs else git_blob_sha1(existing.data))
            files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files, "commitOid": repo.head})

    def _lfs_batch(self, match, query, body) -> None:
        if (repo := self._repo(match)) is None:
            return
        request = json.loads(body)
        base = self.server.base_url  # type: ignore[attr-defined]
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
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, match, query, body) -> None:
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            return self._error(400, "uploaded content does not match its sha256 oid")
        self.state.lfs_objects[match["oid"]] = body
        self._send(200, b"", content_type="text/plain")

    def _lfs_verify(self, match, query, body) -> None:
        request = json.loads(body)
        data = self.state.lfs_objects.get(request["oid"])
        if data is None or len(data) != request["size"]:
            return self._error(404, f"LFS object {request['oid']} not found or wrong size")
        self._send(200, {"ok": True})

    def _commit(self, match, query, body) -> None:
        if (repo := self._repo(match)) is None or not self._revision_ok(match):
            return
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
        base = self.server.base_url  # type: ignore[attr-defined]
        self._send(200, {"success": True, "commitOid": commit.oid, "commitUrl": f"{base}/{repo.repo_id}/commit/{commit.oid}",
                         "pullRequestUrl": None})

    def _tree(self, match, query, body) -> None:
        if (repo := self._repo(match)) is None or not self._revision_ok(match):
            return
        prefix = unquote(match["path"] or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        under = {p: b for p, b in repo.files.items() if not prefix or p.startswith(prefix + "/")}
        if prefix and not under:
            return self._error(404, f"{prefix} does not exist on main", "EntryNotFound")
        entries, folders = [], set()
        for path, blob in sorted(under.items()):
            rest = path[len(prefix) + 1:] if prefix else path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                    "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
                entries.append(entry)
        self._send(200, entries)

    def _commits(self, match, query, body) -> None:
        if (repo := self._repo(match)) is None or not self._revision_ok(match):
            return
        self._send(200, [{"id": c.oid, "title": c.title, "message": "", "authors": [],
                          "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(c.time))}
                         for c in reversed(repo.commits)])

    def _resolve(self, match, query, body) -> None:
        if (repo := self._repo(match)) is None or not self._revision_ok(match):
            return
        path = unquote(match["path"])
        blob = repo.files.get(path)
        if blob is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": repo.head})
        headers = {"X-Repo-Commit": repo.head, "ETag": f'"{blob.oid}"'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        self._send(200, blob.data, headers, content_type="application/octet-stream")

    def _super_squash(self, match, query, body) -> None:
        if (repo := self._repo(match)) is None or not self._revision_ok(match):
            return
        message = json.loads(body or b"{}").get("message") or "Super-squash"
        repo.commits = [Commit(uuid.uuid4().hex + uuid.uuid4().hex[:8], message, dict(repo.files), time.time())]
        repo.squashes += 1
        self._send(200, {"commitId": repo.head})


_ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), _Handler._create_repo),
    ("POST", re.compile(r"/api/validate-yaml"), _Handler._validate_yaml),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), _Handler._preupload),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), _Handler._commit),
    ("POST", re.compile(rf"/api/models/{_REPO}/super-squash/(?P<rev>[^/]+)"), _Handler._super_squash),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"), _Handler._tree),
    ("GET", re.compile(rf"/api/models/{_REPO}/commits/(?P<rev>[^/]+)"), _Handler._commits),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), _Handler._repo_info),
    ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), _Handler._lfs_batch),
    ("PUT", re.compile(rf"/lfs-upload/{_REPO}/(?P<oid>[0-9a-f]{{64}})"), _Handler._lfs_put),
    ("POST", re.compile(rf"/lfs-verify/{_REPO}"), _Handler._lfs_verify),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), _Handler._resolve),
]
