"""Where a model's files are, what a client's LoadModel may load, and checks of the files.

No MLX here. The facade (engine.py) vets a client's LoadModel against the operator's
`LoadPolicy` before the engine process reads a byte of weights, and the engine process checks
every model's files the same way (worker.py) before handing them to MLX, whose loader trusts
what a safetensors header says about itself.

Messages name only what the caller sent (its path, its repository): never what a file says,
which is not ours to echo (the detail goes to the server's log).
"""

import json
import logging
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (
    FieldViolation,
    InvalidRequest,
    ModelLoadFailed,
    ModelSourceNotFound,
    RemoteCodeRefused,
    SourceNotAllowed,
)
from .models import LoadPolicy, ModelSource

log = logging.getLogger(__name__)

# A branch, tag or commit, such as "main", "v1.0" or "refs/pr/3": no empty, "." or ".."
# segment, so that huggingface_hub's cache lookup (refs/<revision>) stays in the cache.
# model_service.proto's HuggingFaceRepo.revision has the same pattern.
REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
# The safetensors library's own limit on a header.
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
# A config.json (or tokenizer_config.json) larger than this is no model's.
MAX_CONFIG_BYTES = 16 << 20
# Bytes per element of each safetensors dtype MLX reads.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}
# Keys by which a model asks to run code of its own: transformers' auto classes, mlx-lm's
# custom architecture module.
REMOTE_CODE_KEYS = ("auto_map", "model_file")


@dataclass(frozen=True)
class FoundModel:
    """A model directory that passed the checks, and its weights' size per the headers."""

    path: Path
    weight_bytes: int


# ---- finding the directory ---------------------------------------------------------------


def resolve_model_path(source: ModelSource) -> Path:
    """A local directory, or a Hugging Face snapshot: cache first, so cached models work offline."""
    if source.local_path:
        return local_model_directory(Path(source.local_path).expanduser(), source.local_path)
    if source.repo_id is None:  # ModelSource holds exactly one of the two
        raise ModelSourceNotFound("the model source has neither a local path nor a repository")
    return hugging_face_snapshot(source.repo_id, source.revision)


def checked_model_path(source: ModelSource) -> Path:
    """The model's directory, once its config and weights' headers are found sound: what the
    engine process loads, whoever asked."""
    path = resolve_model_path(source)
    check_model_files(path, shown_source(source))
    return path


def local_model_directory(path: Path, given: str) -> Path:
    """`path` if it holds a config.json; `given`, the caller's spelling, names it in errors."""
    try:
        is_model = (path / "config.json").is_file()
    except OSError as exc:  # a name too long, a directory we may not read
        raise ModelSourceNotFound(f"{shorten(given)!r}: {exc.strerror}") from None
    if not is_model:
        raise ModelSourceNotFound(f"{shorten(given)!r} is not a model directory (no config.json)")
    return path


def hugging_face_snapshot(repo_id: str, revision: str | None) -> Path:
    """The cached snapshot, else a download (hub.py: the same code as `mlx-serving download`).
    With HF_HUB_OFFLINE set, a model not cached is refused at once, saying why."""
    from . import hub

    try:
        return hub.snapshot(repo_id, revision)
    except hub.DownloadFailed as exc:
        name = f"{repo_id}@{revision}" if revision else repo_id
        raise ModelSourceNotFound(
            f"{name!r} is not in the Hugging Face cache and could not be downloaded: {exc}"
        ) from None


def shorten(text: str, limit: int = 200) -> str:
    """`text` fit for a message: a path may be 4 KiB long."""
    return text if len(text) <= limit else f"{text[: limit // 2]}…{text[-limit // 4 :]}"


# ---- a client's LoadModel: the operator's policy ------------------------------------------


def check_source_allowed(source: ModelSource, policy: LoadPolicy) -> None:
    """What can be refused from the request alone, before any file is touched: a repository
    when Hugging Face is off or its organisation is not listed, a revision that walks."""
    if source.repo_id is None:
        return
    if not policy.allow_hugging_face:
        raise SourceNotAllowed("this server does not load models from Hugging Face")
    if source.revision is not None and not REVISION.match(source.revision):
        why = "must be a branch, tag or commit: no empty, '.' or '..' segment"
        raise InvalidRequest(FieldViolation("source.hugging_face.revision", why))
    organizations = {name.casefold() for name in policy.hugging_face_organizations}
    organization = source.repo_id.split("/")[0] if "/" in source.repo_id else ""
    if organizations and organization.casefold() not in organizations:
        raise SourceNotAllowed(
            f"this server does not load models from the organisation of {source.repo_id!r}"
        )


def vet_model(source: ModelSource, policy: LoadPolicy) -> FoundModel:
    """A client's model, found where the policy allows and checked, its weights not read.

    Runs on a thread: it reads the directory, the configs and the weights' headers (and may
    download a repository).
    """
    if source.local_path:
        path = allowed_local_path(source.local_path, policy.model_roots)
    else:
        path = resolve_model_path(source)
    weight_bytes = check_model_files(path, shown_source(source))
    if not policy.trust_remote_code and asks_for_remote_code(path):
        raise RemoteCodeRefused(
            f"{shown_source(source)!r} asks to run its own code (auto_map or model_file), "
            "which this server does not allow"
        )
    return FoundModel(path, weight_bytes)


def allowed_local_path(local_path: str, roots: tuple[str, ...] | None) -> Path:
    """The model directory at `local_path`, symlinks and ".." resolved, if it lies in one of
    `roots` (None: anywhere), and so does every file in it.

    Outside the roots, whether the path exists or not, the refusal is the same: a client must
    not learn which directories exist on the server.
    """
    path = Path(local_path).expanduser()
    if roots is None:
        return local_model_directory(path, local_path)
    refusal = SourceNotAllowed(
        f"{shorten(local_path)!r} is not in a directory this server loads models from"
    )
    allowed = resolved_roots(roots)
    try:
        path = path.resolve(strict=False)
        inside = within(path, allowed)
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        inside = False
    if not inside:
        raise refusal
    directory = local_model_directory(path, local_path)
    try:
        files_inside = all(within(entry.resolve(), allowed) for entry in directory.iterdir())
    except (OSError, RuntimeError):
        files_inside = False
    if not files_inside:  # a link in the directory to a file elsewhere
        raise refusal
    return directory


def resolved_roots(roots: Iterable[str]) -> list[Path]:
    resolved = []
    for root in roots:
        try:
            resolved.append(Path(root).expanduser().resolve(strict=False))
        except (OSError, RuntimeError, ValueError):
            log.warning("model root %r cannot be resolved; no model loads from it", root)
    return resolved


def within(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def shown_source(source: ModelSource) -> str:
    return shorten(source.local_path or source.repo_id or "")


def asks_for_remote_code(path: Path) -> bool:
    """Whether the model ships Python of its own to build its architecture or tokenizer.

    mlx-lm runs neither (it builds every model from its own architectures, and transformers
    refuses a tokenizer's code unless told to trust it); a model that needs its code is refused
    up front rather than half-loaded.
    """
    config = read_json_object(path / "config.json")
    if any(key in config for key in REMOTE_CODE_KEYS):
        return True
    try:
        return "auto_map" in read_json_object(path / "tokenizer_config.json")
    except ModelLoadFailed:  # none, or unreadable: the tokenizer's load says so
        return False


# ---- the files: every load ---------------------------------------------------------------


def check_model_files(path: Path, shown: str) -> int:
    """The weights' size in bytes, once config.json is a JSON object and every weight file's
    header is sound; else ModelLoadFailed naming the model as `shown` and the file at fault."""
    try:
        read_json_object(path / "config.json")
        weight_files = sorted(path.glob("model*.safetensors"))
        if not weight_files:
            raise ModelLoadFailed("no model*.safetensors file")
        return sum(safetensors_bytes(file) for file in weight_files)
    except ModelLoadFailed as exc:
        raise ModelLoadFailed(f"cannot load {shorten(shown)!r}: {exc}") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A model's JSON file as a dict; ModelLoadFailed, not quoting it, if it is none."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ModelLoadFailed(f"cannot read {path.name}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ModelLoadFailed(f"{path.name} is over {MAX_CONFIG_BYTES} bytes")
    try:
        value = json.loads(data, object_pairs_hook=unique_keys)
    except ValueError:
        raise ModelLoadFailed(f"{path.name} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ModelLoadFailed(f"{path.name} is not a JSON object")
    return value


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: with a key twice, readers disagree on which
    one counts."""
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("a key appears twice")
    return value


def safetensors_bytes(file: Path) -> int:
    """The bytes of the tensors in a safetensors file, once its header is found to describe
    the file: every tensor's span inside it, of its dtype and shape's size, none overlapping.

    MLX maps what the header says; a header that lies would have it read past the file's end or
    allocate what the file does not hold.
    """
    where = shorten(file.name)
    try:
        with file.open("rb") as stream:
            size = file.stat().st_size
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise invalid_weights(where, "shorter than its header's length")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(size - 8, MAX_SAFETENSORS_HEADER_BYTES):
                raise invalid_weights(where, "its header's length is past the file's end")
            header_text = stream.read(header_bytes)
    except OSError as exc:
        raise ModelLoadFailed(f"cannot read {where}: {exc.strerror}") from None
    try:
        header = json.loads(header_text, object_pairs_hook=unique_keys)
    except ValueError:
        raise invalid_weights(where, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise invalid_weights(where, "its header is not a JSON object")
    spans = tensor_spans(header, where)
    data_bytes = size - 8 - header_bytes
    end = 0
    for start, stop in sorted(spans):
        if start < end:
            raise invalid_weights(where, "two tensors share bytes")
        end = stop
    if end > data_bytes:
        raise invalid_weights(where, "a tensor lies past the file's end (truncated?)")
    return sum(stop - start for start, stop in spans)


def tensor_spans(header: dict[str, Any], where: str) -> list[tuple[int, int]]:
    """Each tensor's (start, end) in the data, checked against its dtype and shape."""
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise invalid_weights(where, "a tensor entry is not a JSON object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise invalid_weights(where, "a tensor has a dtype MLX does not read")
        if not (isinstance(shape, list) and all(is_count(n) for n in shape)):
            raise invalid_weights(where, "a tensor's shape is not a list of counts")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))):
            raise invalid_weights(where, "a tensor's data_offsets are not two offsets")
        start, stop = offsets
        if stop < start or stop - start != DTYPE_BYTES[dtype] * math.prod(shape):
            raise invalid_weights(where, "a tensor's byte span does not match its dtype and shape")
        spans.append((start, stop))
    return spans


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def invalid_weights(where: str, why: str) -> ModelLoadFailed:
    return ModelLoadFailed(f"the weights file {where!r} is not a sound safetensors file: {why}")
