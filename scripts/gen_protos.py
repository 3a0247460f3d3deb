"""Generate the Python stubs in stubs/src from proto/, or check that they are current.

No protovalidate release ships buf/validate/validate.proto, and the Buf registry is out of
reach, so the descriptor embedded in the installed `protovalidate` package is handed to protoc
with --descriptor_set_in instead of a copy of the file.

    python scripts/gen_protos.py          # regenerate
    python scripts/gen_protos.py --check  # fail if stubs/ differs from what proto/ generates
    python scripts/gen_protos.py --lint   # buf lint proto/ (offline, through a protoc image)
"""

import argparse
import ast
import filecmp
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import (
    descriptor_pb2,
    duration_pb2,
    field_mask_pb2,
    timestamp_pb2,
)

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
STUBS_SRC = ROOT / "stubs" / "src"
GENERATED_DIRS = ("mlx_serving/v1", "buf/validate")
VALIDATE_PROTO = "buf/validate/validate.proto"


def load_validate_descriptor() -> bytes:
    """The serialized FileDescriptorProto of buf/validate/validate.proto, from protovalidate."""
    spec = importlib.util.find_spec("protovalidate")
    source = Path(spec.origin).parent / "_gen" / "buf" / "validate" / "validate_pb.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes):
            if node.value.startswith(b"\n\x1b" + VALIDATE_PROTO.encode()):
                return node.value
    raise RuntimeError(f"no descriptor of {VALIDATE_PROTO} in {source}")


def write_descriptor_set(path: Path) -> None:
    files = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        files.file.add().ParseFromString(module.DESCRIPTOR.serialized_pb)
    files.file.add().ParseFromString(load_validate_descriptor())
    path.write_bytes(files.SerializeToString())


def list_protos() -> list[str]:
    return sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))


def generate(out: Path) -> None:
    protos = list_protos()
    with tempfile.TemporaryDirectory() as tmp:
        deps = Path(tmp) / "deps.binpb"
        write_descriptor_set(deps)
        base = [sys.executable, "-m", "grpc_tools.protoc", f"--descriptor_set_in={deps}"]
        run(base + [f"--python_out={out}", f"--pyi_out={out}", VALIDATE_PROTO])
        run(
            base
            + [f"-I{PROTO_DIR}", f"--python_out={out}", f"--pyi_out={out}"]
            + [f"--grpc_python_out={out}", *protos]
        )


def find_buf() -> str:
    """The buf binary: on PATH, or beside this interpreter (buf-bin installs it into the venv)."""
    found = shutil.which("buf") or shutil.which("buf", path=str(Path(sys.executable).parent))
    if found is None:
        sys.exit("buf not found: pip install buf-bin (or npm install @bufbuild/buf)")
    return found


def lint() -> None:
    """buf lint proto/ against buf.yaml.

    buf cannot resolve buf/validate/validate.proto offline, so protoc builds an image with the
    same descriptor set as generate() and buf lints that image, limited to our own files.
    """
    with tempfile.TemporaryDirectory() as tmp:
        deps, image = Path(tmp) / "deps.binpb", Path(tmp) / "image.binpb"
        write_descriptor_set(deps)
        run(
            [sys.executable, "-m", "grpc_tools.protoc", f"--descriptor_set_in={deps}"]
            + [f"-I{PROTO_DIR}", "--include_imports", "--include_source_info", f"-o{image}"]
            + list_protos()
        )
        config = ROOT / "buf.yaml"
        cmd = [find_buf(), "lint", str(image), "--path", "mlx_serving/v1", "--config", str(config)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"buf lint failed:\n{done.stdout}{done.stderr}")
    print("buf lint passed")


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"protoc failed:\n{done.stderr}")


def differences(a: Path, b: Path) -> list[str]:
    """Files that differ between two trees, compared by content."""
    names = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    names |= {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    return sorted(
        str(n)
        for n in names
        if not (
            (a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False)
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if stubs/ is stale")
    mode.add_argument("--lint", action="store_true", help="buf lint proto/, offline")
    args = parser.parse_args()
    if args.lint:
        lint()
        return
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if args.check:
            stale = [
                f"{d}/{n}"
                for d in GENERATED_DIRS
                for n in differences(fresh / d, STUBS_SRC / d)
                if "__pycache__" not in n
            ]
            if stale:
                sys.exit("stubs are stale, run scripts/gen_protos.py:\n  " + "\n  ".join(stale))
            print("stubs are current")
            return
        for d in GENERATED_DIRS:
            shutil.rmtree(STUBS_SRC / d, ignore_errors=True)
            shutil.copytree(fresh / d, STUBS_SRC / d)
        print(f"generated {', '.join(GENERATED_DIRS)} under {STUBS_SRC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
