"""A local stand-in of the Hugging Face Hub's HTTP API: just what `HfApi.create_repo` and `upload_folder` call.

    POST /api/repos/create                      -> {"url": ...}; 409 when the repository exists
    POST /api/validate-yaml                     -> the README front matter must parse as YAML
    POST /api/models/{repo}/preupload/{rev}     -> every file "regular", so contents travel in the commit
    POST /api/models/{repo}/commit/{rev}        -> NDJSON: a header line, then one base64 "file" line per file

Every request must carry `Authorization: Bearer <token>`; every request is recorded, headers included,
so that a test can check what reached the "Hub" and what did not.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


class FakeHub:
    def __init__(self, token: str, echo_auth: bool = False):
        self.token = token
        self.echo_auth = echo_auth  # a careless server: its 401 message repeats the Authorization header
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.requests: list[dict] = []
        self.unexpected: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                hub._handle(self, "POST")

            def do_GET(self):
                hub._handle(self, "GET")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------ requests

    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        body = _read_body(request)
        path = request.path.split("?", 1)[0]
        self.requests.append({"method": method, "path": path, "body": body,
                              "headers": {k.lower(): v for k, v in request.headers.items()}})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            said = f": got {request.headers.get('Authorization')!r}" if self.echo_auth else ""
            return _reply(request, 401, {"error": f"Invalid credentials in Authorization header{said}"})
        if method == "POST" and path == "/api/repos/create":
            return self._create(request, json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(request, json.loads(body))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if method == "POST" and match:
            repo_id, action, _revision = match.groups()
            if repo_id not in self.repos:
                return _reply(request, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if action == "preupload":
                files = json.loads(body)["files"]
                return _reply(request, 200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False, "oid": None} for f in files]})
            return self._commit(request, repo_id, body)
        self.unexpected.append(f"{method} {path}")
        return _reply(request, 404, {"error": f"the stand-in Hub does not serve {method} {path}"})

    def _create(self, request, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            return _reply(request, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        self.repos[repo_id] = {"private": payload.get("visibility") == "private", "files": {}, "commits": [],
                               "payload": payload}
        return _reply(request, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, request, payload: dict) -> None:
        match = re.match(r"---\s*\n(.*?)\n---\s*\n", payload.get("content", ""), re.DOTALL)
        try:
            data = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as exc:
            return _reply(request, 400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
        if not isinstance(data, dict):
            return _reply(request, 400, {"errors": [{"message": "no YAML front matter"}]})
        return _reply(request, 200, {"errors": [], "warnings": []})

    def _commit(self, request, repo_id: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return _reply(request, 400, {"error": "the commit must start with a header line"})
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return _reply(request, 400, {"error": f"the stand-in Hub only takes inline files, not {line['key']}"})
            self.repos[repo_id]["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = f"{len(self.repos[repo_id]['commits']) + 1:040x}"
        self.repos[repo_id]["commits"].append(lines[0]["value"])
        return _reply(request, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                     "pullRequestUrl": None})


def _read_body(request: BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(request.rfile.readline().strip() or b"0", 16)
            if size == 0:
                request.rfile.readline()
                return b"".join(chunks)
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
    return request.rfile.read(int(request.headers.get("Content-Length") or 0))


def _reply(request: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict | None = None) -> None:
    data = json.dumps(payload).encode()
    request.send_response(status)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        request.send_header(key, value)
    request.end_headers()
    request.wfile.write(data)
