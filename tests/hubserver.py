"""A local stand-in for the Hugging Face Hub: what huggingface_hub's downloads ask of it.

``HubServer(repos).start()`` serves, on 127.0.0.1 and a free port (``.endpoint`` is what
``HF_ENDPOINT`` takes), each ``repos[repo_id] = {path in repo: bytes}`` at one commit:
- ``GET /api/models/{repo}[/revision/{rev}]``: ``{"id", "sha", "siblings"}`` (``model_info``);
- ``GET /api/models/{repo}/tree/{rev}``: the file listing with git blob ids, and ``lfs``
  (sha256, size) for ``*.safetensors`` and ``*.bin`` (``list_repo_tree``);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the blob id or,
  for LFS files, ``X-Linked-Etag``/``X-Linked-Size`` with the sha256), ``Range`` requests.
An unknown repo or revision gets 404 with the hub's ``X-Error-Code``.

Faults a test switches on: ``corrupt`` (paths served with one byte changed: the listing keeps
the true checksums), ``cut_at`` (path -> byte offset: that file's body stops there and the
connection is closed, once; after it the hub is ``down`` and answers 503 until a test sets
``down = False``). ``requests`` records (method, path, Range header, status) of each.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

LFS = (".safetensors", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.commits = {r: hashlib.sha1(json.dumps(sorted((p, git_blob_id(d)) for p, d in files.items()))
                                        .encode()).hexdigest() for r, files in repos.items()}
        self.corrupt: set[str] = set()
        self.cut_at: dict[str, int] = {}
        self.down = False
        self.requests: list[tuple[str, str, str | None, int]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def downloads(self, path: str) -> list[tuple[str | None, int]]:
        """(Range header, status) of each GET of a file's content, in order."""
        with self._lock:
            return [(rng, st) for m, p, rng, st in self.requests if m == "GET" and p.endswith("/" + path)
                    and "/resolve/" in p]

    # ------------------------------------------------------------ the hub's answers
    def _tree(self, repo: str) -> list[dict[str, Any]]:
        out = []
        for path, data in sorted(self.repos[repo].items()):
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
            if path.endswith(LFS):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out

    def _route(self, method: str, path: str) -> tuple[int, dict[str, str], bytes, str | None]:
        """-> status, headers, body, and the repo path of a file's content (or None)."""
        m = (re.fullmatch(r"/api/models/(.+)/(revision|tree)/([^/]+)", path)
             or re.fullmatch(r"/api/models/([^/]+/[^/]+)()()", path))     # model_info without a revision
        if m:
            repo, what, rev = m.group(1), m.group(2) or "revision", unquote(m.group(3) or "main")
            err = self._unknown(repo, rev)
            if err:
                return err
            if what == "revision":
                body = {"id": repo, "sha": self.commits[repo], "private": False,
                        "siblings": [{"rfilename": p} for p in sorted(self.repos[repo])]}
            else:
                body = self._tree(repo)
            return 200, {"Content-Type": "application/json"}, json.dumps(body).encode(), None
        m = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", path)
        if m:
            repo, rev, file = m.group(1), unquote(m.group(2)), unquote(m.group(3))
            err = self._unknown(repo, rev)
            if err:
                return err
            data = self.repos[repo].get(file)
            if data is None:
                return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commits[repo]}, b"", None
            headers = {"X-Repo-Commit": self.commits[repo], "Accept-Ranges": "bytes",
                       "ETag": f'"{git_blob_id(data)}"'}
            if file.endswith(LFS):
                headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                "X-Linked-Size": str(len(data))})
            if file in self.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            return 200, headers, data, file
        return 404, {}, b"not found", None

    def _unknown(self, repo: str, rev: str) -> tuple[int, dict[str, str], bytes, None] | None:
        if repo not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}', None
        if rev not in ("main", self.commits[repo]):
            return 404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}', None
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:      # the test's output stays readable
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = urlsplit(self.path).path
                rng = self.headers.get("Range")
                if hub.down:
                    status, headers, body, file = 503, {}, b"hub down", None
                else:
                    status, headers, body, file = hub._route(self.command, path)
                start = 0
                if status == 200 and file is not None and rng:
                    m = re.fullmatch(r"bytes=(\d+)-", rng)
                    start = int(m.group(1)) if m else 0
                    if start >= len(body):
                        status, body = 416, b""
                    else:
                        status = 206
                        headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                        body = body[start:]
                with hub._lock:
                    hub.requests.append((self.command, path, rng, status))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return
                cut = hub.cut_at.get(file) if file is not None else None
                if cut is not None and start < cut:
                    del hub.cut_at[file]
                    hub.down = True                  # the network is gone from here on
                    self.wfile.write(body[:cut - start])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)       # mid-body: the client sees a broken transfer
                    return
                self.wfile.write(body)

        return Handler
