"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests and benchmarks of the real client.

The real ``huggingface_hub`` / ``datasets`` clients talk to it when ``HF_ENDPOINT`` points
at :attr:`LoopbackHub.url` (with ``HF_HUB_DISABLE_XET=1``). It serves just what this
project uses:

* uploads to one model repo (``create_repo`` + ``upload_folder``, see ``tests/test_hub.py``);
* dataset repos for reading: repo info / revision -> commit, the tree listing, paths-info,
  and ``resolve`` with HTTP range requests, so a streaming reader fetches byte ranges and
  the server can count what was sent (:meth:`LoopbackHub.add_dataset`).

Anything else is answered 404 and recorded in :attr:`LoopbackHub.unexpected`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

MAX_BODY = 64 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".model")
_DATASET_API = re.compile(r"^/api/datasets/([^/]+/[^/@]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class LoopbackHub(ThreadingHTTPServer):
    """The fake Hub; ``upload_repo`` is the one model repo that accepts uploads."""

    daemon_threads = True

    def __init__(self, upload_repo: str = "tester/tiny-dmd2") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upload_repo = upload_repo
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.auth: list[str | None] = []
        self.unexpected: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.yaml_checked: list[str] = []
        self.lfs_blobs: dict[str, bytes] = {}
        self.committed: dict[str, bytes | str] = {}  # path -> content (regular) or sha256 (LFS)
        self.commit_headers: list[dict] = []
        # dataset repos: repo -> {"refs": {branch: sha}, "commits": {sha: {path: bytes}}}
        self.datasets: dict[str, dict] = {}
        self.bytes_served = 0  # body bytes of every resolve GET
        self.range_requests = 0
        self.on_request: list = []  # callables (method, path) run before each request is answered

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def uploaded_bytes(self, path: str) -> bytes:
        value = self.committed[path]
        return self.lfs_blobs[value] if isinstance(value, str) else value

    def add_dataset(self, repo_id: str, files: dict[str, bytes | Path], *, branch: str = "main", tag: str = "") -> str:
        """Commit ``files`` (path in repo -> content, or a local file served from disk) to dataset ``repo_id``.

        The commit replaces ``branch``'s files; its sha is returned (and ``tag`` names it too).
        """
        content = {p: (v if isinstance(v, Path) else bytes(v)) for p, v in files.items()}
        sha = hashlib.sha1(json.dumps(sorted((p, _etag(v)) for p, v in content.items())).encode())
        sha = hashlib.sha1((repo_id + branch + sha.hexdigest()).encode()).hexdigest()
        with self.lock:
            repo = self.datasets.setdefault(repo_id, {"refs": {}, "commits": {}})
            repo["commits"][sha] = content
            repo["refs"][branch] = sha
            if tag:
                repo["refs"][tag] = sha
        return sha

    def commit_files(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(sha, files) of a branch, tag or commit of a dataset repo; None if unknown."""
        repo = self.datasets.get(repo_id)
        if repo is None:
            return None
        sha = repo["refs"].get(revision, revision)
        return (sha, repo["commits"][sha]) if sha in repo["commits"] else None


@contextmanager
def serve(upload_repo: str = "tester/tiny-dmd2") -> Iterator[LoopbackHub]:
    """A running :class:`LoopbackHub` for the ``with`` block (shut down and closed after it)."""
    server = LoopbackHub(upload_repo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def hub_env(server: LoopbackHub, home: str | Path) -> dict[str, str]:
    """Environment for a process whose Hub clients should talk to ``server`` (a fresh cache in ``home``)."""
    return {
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(Path(home) / "datasets"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def _etag(value: bytes | Path) -> str:
    """A content id: the sha1 of bytes, or of a local file's path, size and mtime (never read whole)."""
    if isinstance(value, Path):
        st = value.stat()
        return hashlib.sha1(f"{value.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return hashlib.sha1(value).hexdigest()


def _size(value: bytes | Path) -> int:
    return value.stat().st_size if isinstance(value, Path) else len(value)


def _read(value: bytes | Path, start: int, end: int) -> bytes:
    """Bytes ``[start, end]`` (inclusive) of the content."""
    if isinstance(value, Path):
        with open(value, "rb") as f:
            f.seek(start)
            return f.read(end - start + 1)
    return value[start : end + 1]


def _tree_entries(files: dict[str, bytes | Path], prefix: str, recursive: bool) -> list[dict] | None:
    """Tree-API entries below ``prefix`` ('' for the root); None when it is not a folder."""
    prefix = prefix.strip("/")
    base = prefix + "/" if prefix else ""
    entries: dict[str, dict] = {}
    for path, data in files.items():
        if not path.startswith(base):
            continue
        rest = path[len(base) :].split("/")
        for depth in range(1, len(rest)):  # the folders on the way
            folder = base + "/".join(rest[:depth])
            if depth == 1 or recursive:
                entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "path": folder})
            if not recursive:
                break
        if len(rest) == 1 or recursive:
            entries[path] = _file_entry(path, data)
    if not entries and prefix:
        return None
    return sorted(entries.values(), key=lambda e: e["path"])


def _file_entry(path: str, data: bytes | Path) -> dict:
    return {"type": "file", "oid": _etag(data), "size": _size(data), "path": path}


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackHub
    timeout = 20  # a stuck client cannot hold a thread forever
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub: a range reader reuses its connection

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
                if len(out) > MAX_BODY:
                    raise ValueError("body too large")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool = True) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)) if body else headers.get("Content-Length", "0"))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _reply(self, status: int, payload: dict | list | None = None, *, body: bool = True, code: str = "") -> None:
        data = json.dumps({} if payload is None else payload).encode()
        headers = {"Content-Type": "application/json"}
        if status == 404:
            headers["X-Error-Code"] = code or "EntryNotFound"
        self._send(status, data, headers, body)

    def _record(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path))
            self.server.auth.append(self.headers.get("Authorization"))
        for hook in list(self.server.on_request):
            hook(self.command, self.path)

    def _unexpected(self, body: bool = True) -> None:
        with self.server.lock:
            self.server.unexpected.append((self.command, self.path))
        self._reply(404, {"error": "not in the fake Hub"}, body=body)

    # -- dataset repos (read) ------------------------------------------------------------

    def _dataset_api(self, path: str, query: dict, body: bytes | None) -> bool:
        m = _DATASET_API.match(path)
        if not m:
            return False
        repo_id, kind, revision, rest = m.group(1), m.group(2), unquote(m.group(3) or "main"), unquote(m.group(4) or "")
        found = self.server.commit_files(repo_id, revision)
        if found is None:
            if repo_id not in self.server.datasets:
                self._reply(404, {"error": "Repository not found"}, code="RepoNotFound")
            else:
                self._reply(404, {"error": f"Invalid rev id: {revision}"}, code="RevisionNotFound")
            return True
        sha, files = found
        if kind in (None, "revision"):
            siblings = [{"rfilename": p} for p in sorted(files)]
            self._reply(200, {"id": repo_id, "_id": repo_id, "sha": sha, "private": False, "siblings": siblings})
        elif kind == "tree":
            entries = _tree_entries(files, rest, query.get("recursive", ["false"])[0].lower() == "true")
            if entries is None:
                self._reply(404, {"error": f"{rest} does not exist on {revision}"})
            else:
                self._reply(200, entries)
        else:  # paths-info
            form = parse_qs((body or b"").decode())
            paths = form.get("paths", [])
            if not paths and body:
                paths = json.loads(body).get("paths", [])
            out = []
            for p in paths:
                p = p.strip("/")
                if p in files:
                    out.append(_file_entry(p, files[p]))
                elif _tree_entries(files, p, False) is not None:
                    out.append({"type": "directory", "oid": "0" * 40, "path": p})
            self._reply(200, out)
        return True

    def _resolve(self, path: str, head: bool) -> bool:
        m = _RESOLVE.match(path)
        if not m:
            return False
        repo_id, revision, file = m.group(1), unquote(m.group(2)), unquote(m.group(3))
        found = self.server.commit_files(repo_id, revision)
        if found is None or file not in found[1]:
            self._reply(404, {"error": "Entry not found"}, body=not head)
            return True
        sha, data = found[0], found[1][file]
        size = _size(data)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{_etag(data)}"',
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
        }
        status, start, end = 200, 0, size - 1
        rng = self.headers.get("Range")
        if rng:
            start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
            if start_s:
                start, end = int(start_s), min(int(end_s) if end_s else size - 1, size - 1)
            else:  # a suffix range: the last N bytes
                start, end = max(0, size - int(end_s)), size - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        part = b"" if head else _read(data, start, end)
        if head:
            headers["Content-Length"] = str(size)
        else:
            with self.server.lock:
                self.server.bytes_served += len(part)
                self.server.range_requests += bool(rng)
        self._send(status, part, headers, body=not head)
        return True

    # -- verbs ------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._record()
        path = urlsplit(self.path).path
        if path == f"/{self.server.upload_repo}/resolve/main/README.md":
            self._reply(404, body=False)  # no card yet; a HEAD reply has no body
        elif not self._resolve(path, head=True):
            self._unexpected(body=False)

    def do_GET(self) -> None:
        self._record()
        url = urlsplit(self.path)
        if not (self._dataset_api(url.path, parse_qs(url.query), None) or self._resolve(url.path, head=False)):
            self._unexpected()

    def do_PUT(self) -> None:
        self._record()
        body = self._body()
        oid = self.path.removeprefix("/lfs-upload/")
        if not self.path.startswith("/lfs-upload/") or hashlib.sha256(body).hexdigest() != oid:
            return self._unexpected()
        with self.server.lock:
            self.server.lfs_blobs[oid] = body
        self._reply(200)

    def do_POST(self) -> None:
        self._record()
        url = urlsplit(self.path)
        path = url.path
        body = self._body()
        srv = self.server
        repo = srv.upload_repo
        if self._dataset_api(path, parse_qs(url.query), body):
            return None
        if path == "/api/repos/create":
            payload = json.loads(body)
            with srv.lock:
                srv.created.append(payload)
            return self._reply(200, {"url": f"{srv.url}/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            with srv.lock:
                srv.yaml_checked.append(json.loads(body)["content"])
            return self._reply(200, {"errors": [], "warnings": []})
        if path == f"/api/models/{repo}/preupload/main":
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"}
                for f in files
            ]
            return self._reply(200, {"files": [{**m, "shouldIgnore": False} for m in modes]})
        if path == f"/{repo}.git/info/lfs/objects/batch":
            objects = json.loads(body)["objects"]
            actions = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {"upload": {"href": f"{srv.url}/lfs-upload/{o['oid']}"}},
                }
                for o in objects
            ]
            return self._reply(200, {"transfer": "basic", "objects": actions})
        if path == f"/api/models/{repo}/commit/main":
            for line in body.decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                with srv.lock:
                    if item["key"] == "header":
                        srv.commit_headers.append(value)
                    elif item["key"] == "file":
                        srv.committed[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        srv.committed[value["path"]] = value["oid"]
            return self._reply(200, {"commitUrl": f"{srv.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._unexpected()


def main(argv: list[str] | None = None) -> None:
    """``python -m accel_distill.testing.loopback_hub --dataset OWNER/NAME=DIR ...``: serve folders until killed.

    Prints the endpoint URL on the first line (for ``HF_ENDPOINT``); files are served from disk.
    """
    import argparse
    import time

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("--dataset", action="append", default=[], help="OWNER/NAME=FOLDER (every file below it)")
    args = p.parse_args(argv)
    with serve() as server:
        for spec in args.dataset:
            repo, _, folder = spec.partition("=")
            root = Path(folder)
            server.add_dataset(
                repo, {f.relative_to(root).as_posix(): f for f in sorted(root.rglob("*")) if f.is_file()}
            )
        print(server.url, flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
