"""A local stand-in for the parts of the Hugging Face Hub HTTP API that huggingface_hub calls for our uploads and
downloads: create a repository, pre-upload, commit (files sent inline, base64), list a repository's tree and resolve
(download) a file. Repositories live in memory; every request's path and Authorization header are recorded, so tests
check what reached "the Hub" and with which token. Nothing here touches the network.

Use `HubStandIn()` as a context manager; `.url` is what HF_ENDPOINT / huggingface_hub.constants.ENDPOINT must be.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    repo_type: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # commit summaries


class HubStandIn:
    def __init__(self, fail_uploads: bool = False):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.fail_uploads = fail_uploads
        self.commits_open = threading.Event()  # clear it to hold commits back (background uploads)
        self.commits_open.set()
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
                      head: bool = False):
                data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _record(self):
                path = urlsplit(self.path).path
                with standin.lock:
                    standin.requests.append((self.command, path, self.headers.get("Authorization")))
                return path

            def do_POST(self):  # noqa: N802
                path = self._record()
                body = self._body()
                if path == "/api/repos/create":
                    data = json.loads(body or b"{}")
                    repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                    with standin.lock:
                        if repo_id in standin.repos:
                            return self._send(409, {"error": "You already created this repo"})
                        private = data.get("visibility", "private" if data.get("private") else "public") != "public"
                        standin.repos[repo_id] = Repo(data.get("type") or "model", private)
                    return self._send(200, {"url": f"{standin.url}/{repo_id}", "name": repo_id})
                m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
                if not m:
                    return self._send(404, {"error": f"no route {path}"})
                repo = standin.repos.get(m.group(2))
                if repo is None or repo.repo_type + "s" != m.group(1):
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if standin.fail_uploads:
                    return self._send(403, {"error": "You don't have the rights to write to this repository"})
                if m.group(3) == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                standin.commits_open.wait(30)
                summary = ""
                added = {}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        summary = item["value"].get("summary", "")
                    elif item["key"] == "file":
                        added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                with standin.lock:
                    repo.files.update(added)
                    repo.commits.append(summary)
                return self._send(200, {"commitUrl": f"{standin.url}/{m.group(2)}/commit/{SHA}", "commitOid": SHA})

            def do_GET(self, head: bool = False):  # noqa: N802
                path = unquote(self._record())
                m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
                if m:
                    repo = standin.repos.get(m.group(2))
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    prefix = (m.group(4) or "").strip("/")
                    entries = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                               for p, b in sorted(repo.files.items())
                               if not prefix or p == prefix or p.startswith(prefix + "/")]
                    return self._send(200, entries, head=head)
                m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    repo = standin.repos.get(m.group(2))
                    data = repo.files.get(m.group(4)) if repo else None
                    if data is None:
                        return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"},
                                          head=head)
                    etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                    return self._send(200, raw=data, head=head,
                                      headers={"ETag": etag, "X-Repo-Commit": SHA})
                return self._send(404, {"error": f"no route {path}"}, head=head)

            def do_HEAD(self):  # noqa: N802
                self.do_GET(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        return dict(self.repos[repo_id].files)
