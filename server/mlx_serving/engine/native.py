"""The compiled extension (`mlx_serving._native`, built from native/), when it is there.

Each primitive has a pure-MLX fallback of the same semantics; `extension_for` says whether the
compiled one can run on the current default device, so callers pick per call. The environment
variable MLX_SERVING_NATIVE=0 turns the extension off (to measure what it is worth).
"""

import functools
import logging
import os
from types import ModuleType

import mlx.core as mx

log = logging.getLogger(__name__)

DISABLE_ENV = "MLX_SERVING_NATIVE"


@functools.cache
def extension() -> ModuleType | None:
    """The extension module, or None when it was not built or is turned off."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    try:
        from mlx_serving import _native  # type: ignore[attr-defined]
    except ImportError as error:
        log.info("native extension unavailable (%s): using the pure-MLX fallbacks", error)
        return None
    return _native


@functools.cache
def backends() -> tuple[str, ...]:
    """The backends the extension compiled ('cpu', 'cuda', 'metal'); () without it."""
    module = extension()
    return tuple(module.backends()) if module is not None else ()


def device_backend() -> str:
    """The backend MLX's default device runs on now."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "cuda" if mx.cuda.is_available() else "metal"


def extension_for_device() -> ModuleType | None:
    """The extension if it has a kernel for the default device's backend, else None."""
    module = extension()
    if module is None or device_backend() not in backends():
        return None
    return module
