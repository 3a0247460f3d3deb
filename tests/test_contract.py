"""The contract's tooling: buf offline from the repository root, the vendored validate.proto,
the committed protoset."""

import ast
import difflib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, text_format

ROOT = Path(__file__).resolve().parent.parent
VENDOR_DIR = ROOT / "proto" / "vendor" / "protovalidate"
VALIDATE_PROTO = "buf/validate/validate.proto"
BASELINE = "proto/baseline/mlx_serving_v1.binpb"
PROTOSET = ROOT / "proto" / "mlx_serving.protoset"
# The git blob of proto/protovalidate/buf/validate/validate.proto at bufbuild/protovalidate v1.2.0.
UPSTREAM_BLOB = "56117c88fc56c7f86e579918937f6869d19a291e"
# File options Buf's managed mode rewrote when protovalidate-py generated its code.
MANAGED_OPTIONS = (
    "java_package",
    "objc_class_prefix",
    "csharp_namespace",
    "php_namespace",
    "php_metadata_namespace",
    "ruby_package",
)


def load_gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_buf(tmp_path: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """buf with an empty cache and every proxied request sent to a closed port: it fails if it
    reaches for the network (Go's HTTP client honours the proxy variables)."""
    tool = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if tool is None:
        pytest.fail("buf not found: install the test extra (buf-bin)")
    dead = "http://127.0.0.1:9"
    env = os.environ | {
        "BUF_CACHE_DIR": str(tmp_path / "buf-cache"),
        "HTTPS_PROXY": dead,
        "HTTP_PROXY": dead,
        "NO_PROXY": "",
    }
    return subprocess.run(
        [tool, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args",
    [
        ("build",),
        ("lint",),
        ("format", "--diff", "--exit-code"),
        ("breaking", "--against", BASELINE),
    ],
    ids=["build", "lint", "format", "breaking"],
)
def test_buf_works_offline_from_the_repository_root(tmp_path, args):
    done = run_buf(tmp_path, *args)
    assert done.returncode == 0, f"buf {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_buf_breaking_catches_a_change_to_our_contract(tmp_path):
    """The baseline check has teeth: the vendored module being left out must not leave ours out."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", copy / "proto")
    shutil.copy(ROOT / "buf.yaml", copy)
    events = copy / "proto" / "mlx_serving" / "v1" / "events_service.proto"
    text = events.read_text()
    assert "string request_id = 2;" in text
    events.write_text(text.replace("string request_id = 2;", "int64 request_id = 2;"))
    done = run_buf(tmp_path, "breaking", "--against", str(ROOT / BASELINE), cwd=copy)
    assert done.returncode != 0
    assert 'name "request_id" on message "Event" changed type' in done.stdout


def test_the_vendored_validate_proto_is_upstreams_file():
    data = (VENDOR_DIR / VALIDATE_PROTO).read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
    assert blob == UPSTREAM_BLOB, "not bufbuild/protovalidate v1.2.0's file: see its README"
    assert data.startswith(b"// Copyright 2023-2026 Buf Technologies, Inc.\n")
    assert b"Licensed under the Apache License, Version 2.0" in data


def embedded_validate_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto the installed protovalidate package was generated with, read out
    of its generated module's source (a private module: fine for a check, not for building)."""
    spec = importlib.util.find_spec("protovalidate")
    source = Path(spec.origin).parent / "_gen" / "buf" / "validate" / "validate_pb.py"
    prefix = b"\n" + bytes([len(VALIDATE_PROTO)]) + VALIDATE_PROTO.encode()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes):
            if node.value.startswith(prefix):
                return descriptor_pb2.FileDescriptorProto.FromString(node.value)
    pytest.fail(f"no descriptor of {VALIDATE_PROTO} in {source}")


def test_the_vendored_validate_proto_is_the_one_protovalidate_embeds(tmp_path):
    out = tmp_path / "validate.binpb"
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{VENDOR_DIR}", f"-o{out}", VALIDATE_PROTO],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    (vendored,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    embedded = embedded_validate_descriptor()
    assert not vendored.HasField("source_code_info")
    assert not embedded.HasField("source_code_info")
    for descriptor in (vendored, embedded):
        for option in MANAGED_OPTIONS:
            descriptor.options.ClearField(option)
    if vendored != embedded:
        diff = difflib.unified_diff(
            text_format.MessageToString(embedded).splitlines(),
            text_format.MessageToString(vendored).splitlines(),
            "embedded",
            "vendored",
            lineterm="",
        )
        pytest.fail("\n".join(list(diff)[:60]))


def test_the_protoset_is_current_self_contained_and_documented(tmp_path):
    fresh = tmp_path / "fresh.protoset"
    load_gen_protos().write_protoset(fresh)
    assert fresh.read_bytes() == PROTOSET.read_bytes(), "run python scripts/gen_protos.py"

    files = descriptor_pb2.FileDescriptorSet.FromString(PROTOSET.read_bytes()).file
    names = [f.name for f in files]
    assert VALIDATE_PROTO in names and "google/protobuf/duration.proto" in names
    pool = descriptor_pool.DescriptorPool()
    for file in files:  # dependencies first, as protoc writes them
        pool.AddSerializedFile(file.SerializeToString())
    method = pool.FindMethodByName("mlx_serving.v1.GenerateService.Generate")
    assert method.input_type.full_name == "mlx_serving.v1.GenerateRequest"
    assert method.output_type.full_name == "mlx_serving.v1.GenerateResponse"

    # Comments come along, for grpcurl describe and the like: the service's own, for one.
    (generate,) = (f for f in files if f.name == "mlx_serving/v1/generate_service.proto")
    service_path = [descriptor_pb2.FileDescriptorProto.SERVICE_FIELD_NUMBER, 0]
    comments = [
        loc.leading_comments
        for loc in generate.source_code_info.location
        if list(loc.path) == service_path
    ]
    assert comments and "GenerateService" in comments[0]
