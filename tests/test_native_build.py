"""The server's wheel, built from a clean copy as pip builds it, carries the native extension.

`pip wheel` of a copy of the checkout (what git tracks, plus new files it does not ignore), with
pip's own build isolation: scikit-build-core, nanobind and MLX come from the index (or pip's
cache). The wheel must hold mlx_serving/_native for the interpreter and platform its tag names,
and import into a fresh virtual environment next to MLX, linking the libmlx that MLX loaded.
Skipped, saying why, when the build dependencies cannot be had (no network and no cache).
"""

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

# pip's words for "the index (or the network) could not be reached".
OFFLINE = re.compile(
    r"No matching distribution found|Could not find a version that satisfies|"
    r"Failed to establish a new connection|Temporary failure in name resolution|"
    r"Network is unreachable|ProxyError|ConnectTimeout|Max retries exceeded"
)

# ELF e_machine of the platform tags' architectures.
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}

IMPORT_SCRIPT = textwrap.dedent(
    """
    import sys
    import mlx.core as mx
    from mlx_serving import _native

    assert _native.__file__.startswith(sys.prefix), _native.__file__
    assert "cpu" in _native.backends(), _native.backends()
    B, H, Hkv, S, D = 2, 4, 2, 9, 64
    q = mx.random.normal((B, H, 1, D))
    k = mx.random.normal((B, Hkv, S, D))
    v = mx.random.normal((B, Hkv, S, D))
    padding = mx.array([0, 4])
    out = _native.decode_attention(q, k, v, padding, 0.125, stream=mx.cpu)
    mask = (mx.arange(S)[None] >= padding[:, None]).reshape(B, 1, 1, S)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask, stream=mx.cpu)
    expected = expected.transpose(0, 2, 1, 3).reshape(B, 1, H * D)
    assert mx.abs(out - expected).max().item() < 1e-5
    if sys.platform == "linux":
        with open("/proc/self/maps") as maps:
            libmlx = {line.split()[-1] for line in maps if line.rstrip().endswith("/libmlx.so")}
        assert len(libmlx) == 1 and libmlx.pop().startswith(sys.prefix), libmlx
    print("ok")
    """
)


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def clean_copy(destination: Path) -> None:
    """The files of a fresh clone with this work tree's changes: no build outputs, no venv."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT)
    if listed.returncode != 0:  # not a git checkout: copy all but the usual outputs
        shutil.copytree(
            ROOT,
            destination,
            ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "__pycache__", "*.so"),
        )
        return
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def tail(result: subprocess.CompletedProcess[str], lines: int = 60) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


def test_the_wheel_carries_the_extension_and_it_imports(tmp_path: Path) -> None:
    source = tmp_path / "src"
    clean_copy(source)
    wheels = tmp_path / "wheels"
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(source)],
        tmp_path,
    )
    if built.returncode != 0 and OFFLINE.search(built.stdout + built.stderr):
        pytest.skip(f"the build dependencies cannot be fetched: {tail(built, 5)}")
    assert built.returncode == 0, tail(built)

    (wheel,) = wheels.glob("mlx_serving-*.whl")
    python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    _, _, python, abi, plat = wheel.stem.split("-")
    assert python == abi == python_tag, wheel.name
    machine = platform.machine().lower()
    assert plat.endswith(machine), (wheel.name, machine)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (module,) = [n for n in names if re.fullmatch(r"mlx_serving/_native\..*(so|pyd)", n)]
        binary = archive.read(module)
    assert f"cpython-{sys.version_info.major}{sys.version_info.minor}" in module, module
    assert "mlx_serving/__init__.py" not in names, "the PEP 420 namespace must stay one"
    if sys.platform == "linux":
        assert binary[:4] == b"\x7fELF" and binary[4] == 2, "a 64-bit ELF shared object"
        assert int.from_bytes(binary[18:20], "little") == ELF_MACHINE[machine], module

    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    assert made.returncode == 0, tail(made)
    python_exe = venv / "bin" / "python"
    mlx = [f"mlx=={importlib.metadata.version('mlx')}"]
    if sys.platform == "linux":
        mlx.append(f"mlx-cpu=={importlib.metadata.version('mlx-cpu')}")
    installed = run(
        [str(python_exe), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel), *mlx],
        tmp_path,
    )
    if installed.returncode != 0 and OFFLINE.search(installed.stdout + installed.stderr):
        pytest.skip(f"MLX cannot be fetched for the fresh venv: {tail(installed, 5)}")
    assert installed.returncode == 0, tail(installed)

    # cwd is tmp_path, so nothing from the checkout is importable by accident.
    imported = run([str(python_exe), "-c", IMPORT_SCRIPT], tmp_path)
    assert imported.returncode == 0 and imported.stdout.strip() == "ok", tail(imported)
