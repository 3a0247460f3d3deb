"""Generate stubs/src and proto/mlx_serving.protoset from proto/, or check that they are current.

Our files are under proto/mlx_serving; buf/validate/validate.proto, which their annotations
import, is vendored under proto/vendor/protovalidate (its README says which release). protoc
reads both with include paths, and the well-known types from grpcio-tools. buf.yaml makes the
two directories one offline workspace, so plain `buf build`, `buf lint`, `buf format` and
`buf breaking` run from the repository root with no registry.

    python scripts/gen_protos.py                    # regenerate the stubs and the protoset
    python scripts/gen_protos.py --check            # fail if either differs from proto/'s output
    python scripts/gen_protos.py --lint             # buf lint
    python scripts/gen_protos.py --update-baseline  # accept the contract as buf breaking's baseline
"""

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUR_PACKAGE_DIR = "mlx_serving"
VENDOR_DIR = PROTO_DIR / "vendor" / "protovalidate"
VALIDATE_PROTO = "buf/validate/validate.proto"
STUBS_SRC = ROOT / "stubs" / "src"
GENERATED_DIRS = ("mlx_serving/v1", "buf/validate")
PROTOSET = PROTO_DIR / "mlx_serving.protoset"
BASELINE = PROTO_DIR / "baseline" / "mlx_serving_v1.binpb"
INCLUDES = [f"-I{PROTO_DIR}", f"-I{VENDOR_DIR}"]


def list_protos() -> list[str]:
    """Our .proto files, relative to proto/ (the vendored module is not ours)."""
    return sorted(
        p.relative_to(PROTO_DIR).as_posix() for p in (PROTO_DIR / OUR_PACKAGE_DIR).rglob("*.proto")
    )


def protoc(args: list[str]) -> None:
    """grpc_tools.protoc, which adds the include path of the well-known types itself."""
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *INCLUDES, *args],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"protoc failed:\n{done.stderr}")


def generate(out: Path) -> None:
    """The Python stubs of our files and of validate.proto (clients import it), into `out`."""
    protoc([f"--python_out={out}", f"--pyi_out={out}", VALIDATE_PROTO])
    protoc([f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *list_protos()])


def write_protoset(path: Path) -> None:
    """A self-contained FileDescriptorSet (for ghz --protoset, grpcurl -protoset): our files and
    everything they import. Our files keep their source info, so tools show their comments; the
    imported files' is dropped, as it would triple the size and only documents protovalidate."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.protoset"
        protoc(["--include_imports", "--include_source_info", f"-o{raw}", *list_protos()])
        files = descriptor_pb2.FileDescriptorSet.FromString(raw.read_bytes())
    for file in files.file:
        if not file.name.startswith(f"{OUR_PACKAGE_DIR}/"):
            file.ClearField("source_code_info")
    path.write_bytes(files.SerializeToString(deterministic=True))


def find_buf() -> str:
    """The buf binary: beside this interpreter (buf-bin installs it into the venv), or on PATH."""
    found = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if found is None:
        sys.exit("buf not found: pip install buf-bin (or npm install @bufbuild/buf)")
    return found


def buf(*args: str) -> None:
    done = subprocess.run([find_buf(), *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"buf {args[0]} failed:\n{done.stdout}{done.stderr}")


def update_baseline() -> None:
    """Build the image `buf breaking --against` compares with: our files only (validate.proto
    goes in as an import), so the check never looks at the vendored module."""
    BASELINE.parent.mkdir(parents=True, exist_ok=True)
    rel = BASELINE.relative_to(ROOT).as_posix()
    buf("build", "--path", f"proto/{OUR_PACKAGE_DIR}", "--exclude-source-info", "-o", rel)
    print(f"wrote {rel}")


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


def check(fresh: Path) -> None:
    stale = [
        f"stubs/src/{d}/{n}"
        for d in GENERATED_DIRS
        for n in differences(fresh / d, STUBS_SRC / d)
        if "__pycache__" not in n
    ]
    protoset = fresh / PROTOSET.name
    if not (PROTOSET.is_file() and filecmp.cmp(protoset, PROTOSET, shallow=False)):
        stale.append(PROTOSET.relative_to(ROOT).as_posix())
    if stale:
        sys.exit("stale, run scripts/gen_protos.py:\n  " + "\n  ".join(stale))
    print("stubs and protoset are current")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="fail if stubs/ or the protoset is stale"
    )
    mode.add_argument("--lint", action="store_true", help="buf lint, offline")
    mode.add_argument(
        "--update-baseline",
        action="store_true",
        help=f"rewrite {BASELINE.relative_to(ROOT)} from the current contract",
    )
    args = parser.parse_args()
    if args.lint:
        buf("lint")
        print("buf lint passed")
        return
    if args.update_baseline:
        update_baseline()
        return
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        write_protoset(fresh / PROTOSET.name)
        if args.check:
            check(fresh)
            return
        for d in GENERATED_DIRS:
            shutil.rmtree(STUBS_SRC / d, ignore_errors=True)
            shutil.copytree(fresh / d, STUBS_SRC / d)
        shutil.copyfile(fresh / PROTOSET.name, PROTOSET)
        print(
            f"generated {', '.join(GENERATED_DIRS)} under {STUBS_SRC.relative_to(ROOT)}"
            f" and {PROTOSET.relative_to(ROOT)}"
        )


if __name__ == "__main__":
    main()
