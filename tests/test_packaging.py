"""The two distributions share the PEP 420 namespace `mlx_serving`; the stubs install alone.

A client installs only `mlx-serving-proto` (./stubs): it must get grpcio and protobuf from the
index like any client would, import every generated module, and never pull in MLX or the engine.
"""

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUBS_V1 = ROOT / "stubs" / "src" / "mlx_serving" / "v1"
# PEP 561: the generated packages tell type checkers that their .pyi files are to be used.
TYPED_MARKERS = ("mlx_serving/v1/py.typed", "buf/validate/py.typed")

CLIENT_SCRIPT = textwrap.dedent(
    """
    import importlib
    import sys

    for name in sys.argv[1:]:
        importlib.import_module(f"mlx_serving.v1.{name}")

    from mlx_serving.v1 import generate_service_pb2, generate_service_pb2_grpc

    request = generate_service_pb2.GenerateRequest(
        model_id="tiny-llama", text="Hello", max_tokens=16, temperature=0.0
    )
    parsed = generate_service_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert parsed == request and parsed.WhichOneof("prompt") == "text", parsed
    assert callable(generate_service_pb2_grpc.GenerateServiceStub)

    for forbidden in ("mlx", "mlx_serving.engine", "mlx_serving.server"):
        try:
            importlib.import_module(forbidden)
        except ImportError:
            continue
        sys.exit(f"a stubs-only install can import {forbidden}")
    print("ok")
    """
)


def generated_modules() -> list[str]:
    names = sorted(p.stem for p in STUBS_V1.glob("*_pb2*.py"))
    assert names, f"no generated modules in {STUBS_V1}"
    return names


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_stubs_install_alone_without_mlx(tmp_path: Path) -> None:
    venv = tmp_path / "client-venv"
    made = run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")

    wheels = tmp_path / "wheels"
    built = run(
        [str(python), "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels)]
        + [str(ROOT / "stubs")],
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("mlx_serving_proto-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert set(TYPED_MARKERS) <= names, sorted(names)
    assert not {n for n in names if n.endswith("__init__.py")}, sorted(names)

    installed = run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    # cwd is tmp_path, so nothing from the checkout is importable by accident.
    client = run([str(python), "-c", CLIENT_SCRIPT, *generated_modules()], cwd=tmp_path)
    assert client.returncode == 0 and client.stdout.strip() == "ok", client.stdout + client.stderr


@pytest.mark.parametrize(
    "namespace", ["server/mlx_serving", "stubs/src/mlx_serving", "stubs/src/buf"]
)
def test_namespace_dirs_have_no_init(namespace: str) -> None:
    path = ROOT / namespace
    assert path.is_dir(), f"{namespace} is missing"
    assert not (path / "__init__.py").exists(), (
        f"{namespace}/__init__.py would turn the shared PEP 420 namespace into a regular "
        "package and hide the other distribution's half"
    )
