"""Models from the Hugging Face Hub: the files an MLX model needs, downloaded into the hub's own
cache, and the models found there.

One code path for `mlx-serving download`, `mlx-serving models` and a LoadModel (or --model) by
repository id (sources.py). huggingface_hub does the talking and keeps the cache's layout (refs,
snapshots, HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE); two things it does not do are done here first,
for the weights (LFS files): a download cut off goes on from where it stopped, in this run or the
next (huggingface_hub 2.4 deletes a partial file when its process ends), and the bytes are held
against the sha256 the hub announced before they count as the blob.
"""

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# What mlx-lm loads: weights (model*.safetensors, not a repository's consolidated or original
# copies), their index, config.json, generation_config.json, the tokenizer's files
# (tokenizer.json and its configs, sentencepiece, tiktoken, vocab.txt, merges.txt) and chat
# templates (chat_template.json, *.jinja). No *.py: this server runs no model's own code.
MODEL_FILES = [
    "model*.safetensors",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jinja",
]
WEIGHTS = "model*.safetensors"
SHA256 = re.compile(r"[0-9a-f]{64}")
HASH_CHUNK_BYTES = 8 << 20


class DownloadFailed(Exception):
    """A repository that could not be had: the message says why in words."""


@dataclass(frozen=True)
class CachedModel:
    """A revision of a model repository in the Hugging Face cache that MLX can load."""

    repo_id: str
    revision: str  # its refs ("main", "v1") or, with none, its commit
    path: Path
    size: str
    quantization: str


# ---- finding and downloading -------------------------------------------------------------


def snapshot(repo_id: str, revision: str | None = None, *, progress: bool = False) -> Path:
    """The cached snapshot, else a download: cache first, so that a cached model loads offline
    and without a round trip to the hub."""
    return cached_snapshot(repo_id, revision) or download(repo_id, revision, progress=progress)


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot of `revision` in the cache, None if it is not there (or incomplete, as far
    as huggingface_hub's record of the repository's files tells)."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=MODEL_FILES, local_files_only=True
        )
    except (OSError, ValueError):
        return None
    return Path(path)


def download(repo_id: str, revision: str | None = None, *, progress: bool = True) -> Path:
    """The model's files at `revision` (default: main) in the cache, fetched as needed; its
    snapshot directory. With HF_HUB_OFFLINE set or the hub out of reach, what the cache holds.

    Progress bars (huggingface_hub's) go to stderr; `progress=False` shows none.
    """
    from huggingface_hub import constants

    name = shown(repo_id, revision)
    if constants.is_offline_mode():
        if path := cached_snapshot(repo_id, revision):
            return path
        raise DownloadFailed(
            f"HF_HUB_OFFLINE is set, so nothing is downloaded, and {name} is not in the Hugging "
            "Face cache"
        )
    try:
        return fetch(repo_id, revision, progress)
    except DownloadFailed:
        raise
    except Exception as exc:
        if unreachable(exc) and (path := cached_snapshot(repo_id, revision)):
            log.warning("%s; using the cached copy of %s", in_words(exc, repo_id, revision), name)
            return path
        raise DownloadFailed(in_words(exc, repo_id, revision)) from exc


def fetch(repo_id: str, revision: str | None, progress: bool) -> Path:
    """The weights first, each resumable and checked; then huggingface_hub's snapshot_download,
    which finds them in place, fetches the small files and records the revision."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi()
    commit = api.model_info(repo_id, revision=revision or constants.DEFAULT_REVISION).sha
    if commit is None:
        raise DownloadFailed(f"the hub did not say which commit {shown(repo_id, revision)} is")
    files = [
        entry
        for entry in api.list_repo_tree(repo_id, revision=commit, recursive=True)
        if isinstance(entry, RepoFile)
    ]
    wanted = list(filter_repo_objects(files, allow_patterns=MODEL_FILES, key=lambda f: f.path))
    if not any(fnmatch(f.path, WEIGHTS) for f in wanted):
        raise DownloadFailed(
            f"{shown(repo_id, revision)} has no model*.safetensors weights: not a model MLX loads"
        )
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    for entry in wanted:
        if entry.lfs is not None:
            if not SHA256.fullmatch(entry.lfs.sha256):  # a file name in the cache, next
                raise DownloadFailed(f"the hub gave no valid sha256 for {entry.path}")
            url = api_file_url(api.endpoint, repo_id, commit, entry.path)
            fetch_blob(url, entry.path, entry.lfs.sha256, entry.lfs.size, storage, progress)
    path = snapshot_download(
        repo_id,
        revision=revision,
        allow_patterns=MODEL_FILES,
        tqdm_class=progress_bars(progress),
    )
    return Path(path)


def progress_bars(shown: bool) -> type:
    """huggingface_hub's progress bar class, on stderr even when it is no terminal (the class
    left alone hides its byte counts then) or never (a server's log). HF_HUB_DISABLE_PROGRESS_BARS
    still hides them: the class itself reads it."""
    from huggingface_hub.utils.tqdm import tqdm

    class Bars(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = not shown
            super().__init__(*args, **kwargs)

    return Bars


def api_file_url(endpoint: str, repo_id: str, commit: str, filename: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint)


def fetch_blob(
    url: str, filename: str, sha256: str, size: int, storage: Path, progress: bool
) -> None:
    """blobs/<sha256>, where huggingface_hub looks for it, once the bytes' sha256 is `sha256`.

    The bytes gather in blobs/<sha256>.incomplete, which outlives the process: a later run asks
    for the rest (an HTTP Range), not for the whole file again. A file whose checksum is wrong
    is deleted, never left as the blob.
    """
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    blob = storage / "blobs" / sha256
    if blob.exists():
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = storage.parent / ".locks" / storage.name / f"{sha256}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(f"{sha256}.incomplete")
    with WeakFileLock(str(lock)):
        if blob.exists():  # another process fetched it meanwhile
            return
        if partial.exists() and partial.stat().st_size > size:
            partial.unlink()  # not a prefix of this file: start over
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"
        with partial.open("ab") as out:
            http_get(
                url,
                out,
                resume_size=out.tell(),
                headers=headers,
                expected_size=size,
                displayed_filename=Path(filename).name,
                tqdm_class=progress_bars(progress),
            )
        if file_sha256(partial) != sha256:
            partial.unlink()
            raise DownloadFailed(
                f"the bytes received for {filename} do not match the checksum (sha256) the hub "
                "gave for it; they were discarded: download again"
            )
        os.replace(partial, blob)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ---- errors in words ---------------------------------------------------------------------


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the hub could not be reached (as opposed to answering no)."""
    import httpx2

    return isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError))


def in_words(exc: BaseException, repo_id: str, revision: str | None) -> str:
    """What went wrong, for a person: huggingface_hub's errors span lines and end in links."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    if isinstance(exc, GatedRepoError):
        return (
            f"{repo_id!r} is gated on {endpoint}: accept its terms there, then set HF_TOKEN "
            "(or run `hf auth login`)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"there is no repository {repo_id!r} on {endpoint} (or it is private and no token "
            "that may read it was given: set HF_TOKEN)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo_id!r} has no revision {revision!r} (no such branch, tag or commit)"
    if unreachable(exc):
        return (
            f"cannot reach {endpoint} ({one_line(exc)}): check the network, or set "
            "HF_HUB_OFFLINE=1 to use only models already in the cache"
        )
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return f"{endpoint} answered HTTP {exc.response.status_code} for {shown(repo_id, revision)}"
    return one_line(exc)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The exception's message on one line, cut at `limit` characters; its class name if it has
    none."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def shown(repo_id: str, revision: str | None) -> str:
    return repr(f"{repo_id}@{revision}" if revision else repo_id)


# ---- the cache's models ------------------------------------------------------------------


def cached_models() -> list[CachedModel]:
    """Every revision in the cache that MLX can load (config.json and model*.safetensors
    weights), by repository then revision; other repositories are left out."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda repo: repo.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda rev: (sorted(rev.refs), rev.commit_hash)):
            if config := model_config(revision.snapshot_path):
                found.append(
                    CachedModel(
                        repo_id=repo.repo_id,
                        revision=", ".join(sorted(revision.refs)) or revision.commit_hash,
                        path=revision.snapshot_path,
                        size=revision.size_on_disk_str,
                        quantization=quantization(config),
                    )
                )
    return found


def model_config(path: Path) -> dict[str, Any] | None:
    """The snapshot's config.json, if it is a model's and weights MLX reads are there."""
    if not any(path.glob(WEIGHTS)):
        return None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "model_type" in config else None


def quantization(config: dict[str, Any]) -> str:
    """Bits and group size ("4-bit, group size 64") from mlx-lm's "quantization" or a
    "quantization_config"; else the weights' dtype as the config states it."""
    for key in ("quantization", "quantization_config"):
        settings = config.get(key)
        if isinstance(settings, dict) and isinstance(settings.get("bits"), int):
            parts = [f"{settings['bits']}-bit"]
            if isinstance(settings.get("group_size"), int):
                parts.append(f"group size {settings['group_size']}")
            method = settings.get("mode") or settings.get("quant_method")
            if isinstance(method, str) and method != "affine":
                parts.append(method)
            return ", ".join(parts)
    dtype = config.get("torch_dtype") or config.get("dtype")
    return dtype if isinstance(dtype, str) else "unknown dtype"


def model_lines(models: list[CachedModel]) -> Iterator[str]:
    """One aligned line per model: repository, revision, size on disk, quantization."""
    rows = [(m.repo_id, m.revision, m.size, m.quantization) for m in models]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    for *cells, last in rows:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        yield "  ".join([*padded, last])
