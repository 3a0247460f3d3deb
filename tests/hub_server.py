"""A stand-in for the Hugging Face Hub on 127.0.0.1: its HTTP API as huggingface_hub 2.4 calls it,
so that the real download code runs against it (HF_ENDPOINT=hub.endpoint).

Served: a repository's info at a revision (/api/models/{repo}/revision/{rev}), its file tree
(/api/models/{repo}/tree/{rev}), and each file (/{repo}/resolve/{rev}/{path}, HEAD and GET) with
the headers huggingface_hub reads: X-Repo-Commit, ETag (the git blob id; for an LFS file
X-Linked-Etag, its sha256, and X-Linked-Size), Content-Length, and Range for a resumed GET.
Faults to order: a connection dropped, or held, after some bytes of a file; a file's bytes not
those its checksum says.
"""

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Files the hub keeps in LFS: their ETag is their sha256.
LFS_SUFFIXES = (".safetensors", ".onnx", ".bin")


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    bytes_sent: int = 0


@dataclass
class Repo:
    refs: dict[str, str]  # branch or tag → commit
    files: dict[str, dict[str, bytes]]  # commit → path → content


@dataclass
class Faults:
    drop_after: dict[str, int] = field(default_factory=dict)  # path → bytes, then the line drops
    hold_after: dict[str, int] = field(default_factory=dict)  # path → bytes, then wait
    released: threading.Event = field(default_factory=threading.Event)
    corrupt: set[str] = field(default_factory=set)  # served with one byte changed


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.faults = Faults()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo_id: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
        """`files` as one commit of `repo_id`, which each of `refs` names."""
        commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo({}, {}))
        repo.files[commit] = files
        repo.refs.update(dict.fromkeys(refs, commit))
        return commit

    def gets(self, path: str, since: int = 0) -> list[Request]:
        """The GETs of a file (its path in the repository), from request number `since` on."""
        return [
            r
            for r in self.requests[since:]
            if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + path)
        ]

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.faults.released.set()
        self.server.shutdown()
        self.server.server_close()


def model_files(model: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in model.iterdir() if file.is_file()}


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self.answer(head=True)

        def do_GET(self) -> None:
            self.answer(head=False)

        def answer(self, head: bool) -> None:
            raw = urlsplit(self.path).path
            request = Request(self.command, unquote(raw), self.headers.get("Range"))
            hub.requests.append(request)
            parts = raw.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo_id, kind, revision = f"{parts[2]}/{parts[3]}", parts[4], unquote(parts[5])
                found = self.find(repo_id, revision)
                if found is None:
                    return
                commit, files = found
                if kind == "revision":
                    return self.send_json(info(repo_id, commit, files))
                if kind == "tree":
                    return self.send_json([tree_entry(path, data) for path, data in files.items()])
            if len(parts) >= 5 and parts[2] == "resolve":
                found = self.find(f"{parts[0]}/{parts[1]}", unquote(parts[3]))
                if found is None:
                    return
                commit, files = found
                path = "/".join(unquote(part) for part in parts[4:])
                if path not in files:
                    return self.error(404, "EntryNotFound")
                return self.send_file(request, commit, path, files[path], head)
            self.error(404, "")

        def find(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self.error(404, "RepoNotFound")
                return None
            commit = repo.refs.get(revision, revision)
            if commit not in repo.files:
                self.error(404, "RevisionNotFound")
                return None
            return commit, repo.files[commit]

        def send_file(self, request: Request, commit: str, path: str, data: bytes, head: bool):
            etag = hashlib.sha256(data).hexdigest() if is_lfs(path) else git_blob_id(data)
            if path in hub.faults.corrupt and not head:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start = 0
            if request.range and not head:
                start = int(request.range.removeprefix("bytes=").split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            if is_lfs(path):
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if head:
                return
            body = data[start:]
            cut = hub.faults.drop_after.pop(path, None)
            hold = hub.faults.hold_after.pop(path, None)
            if cut is None and hold is None:
                self.wfile.write(body)
                request.bytes_sent = len(body)
                return
            sent = cut if cut is not None else hold
            self.wfile.write(body[:sent])
            self.wfile.flush()
            request.bytes_sent = sent
            if hold is not None:
                hub.faults.released.wait(60)
            self.close_connection = True
            self.connection.shutdown(2)  # socket.SHUT_RDWR: the body ends short

        def send_json(self, value) -> None:
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def error(self, status: int, code: str) -> None:
            body = json.dumps({"error": code or "Not Found"}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def info(repo_id: str, commit: str, files: dict[str, bytes]) -> dict:
    return {
        "_id": repo_id,
        "id": repo_id,
        "modelId": repo_id,
        "sha": commit,
        "private": False,
        "disabled": False,
        "gated": False,
        "tags": ["mlx"],
        "siblings": [{"rfilename": path} for path in files],
    }


def tree_entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
    if is_lfs(path):
        sha256 = hashlib.sha256(data).hexdigest()
        entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": 134}
    return entry
