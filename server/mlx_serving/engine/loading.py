"""Turn a ModelSource into a loaded model, its tokenizer and what we report about it."""

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import utils as mlx_lm_utils
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import get_total_parameters

from .errors import ModelLoadFailed
from .fusion import fuse_projections
from .models import GenerationDefaults, ModelInfo, ModelSource, ModelState, Quantization
from .sources import checked_model_path, shorten

log = logging.getLogger(__name__)

# generation_config.json's sampling parameters we report, and the type each must have.
GENERATION_DEFAULT_TYPES: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "max_new_tokens": int,
}
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: TokenizerWrapper
    info: ModelInfo
    path: Path


def build_model(path: Path, fuse: bool = False, decode_kernel: bool = True) -> tuple:
    """(model, config) with the weights not read yet (lazy), projections fused if asked: the
    engine reads them a chunk at a time between batch steps (see `weight_chunks`)."""
    try:
        model, config = mlx_lm_utils.load_model(path, lazy=True)
    except Exception as exc:
        log.warning("cannot build the model at %s: %s: %s", path, type(exc).__name__, exc)
        raise ModelLoadFailed(f"cannot load {shorten(str(path))!r}: {build_failure(exc)}") from None
    if fuse:
        fuse_projections(model, decode_kernel=decode_kernel)
    return model, config


def build_failure(exc: Exception) -> str:
    """Why mlx-lm could not build a model, in our words: its own messages quote the model's
    config ("Model type <model_type> not supported"), which is not ours to echo."""
    if isinstance(exc.__cause__, ImportError):  # no module in mlx_lm.models for its model_type
        return "unsupported architecture"
    return f"its config.json does not describe a model this server can build ({type(exc).__name__})"


def read_tokenizer(path: Path, config: dict[str, Any]) -> TokenizerWrapper:
    try:
        return mlx_lm_utils.load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as exc:
        log.warning("cannot load the tokenizer at %s: %s: %s", path, type(exc).__name__, exc)
        raise ModelLoadFailed(
            f"cannot load the tokenizer of {shorten(str(path))!r} ({type(exc).__name__})"
        ) from None


def named_weights(model: nn.Module) -> list[tuple[str, mx.array]]:
    """The model's parameters as (dotted name, array), in order. Without a `destination`,
    tree_flatten returns this list; its annotation also allows the dict it fills instead."""
    return cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))


def weight_bytes(model: nn.Module) -> int:
    return sum(weight.nbytes for _, weight in named_weights(model))


def weight_chunks(model: nn.Module, max_bytes: int) -> list[list[mx.array]]:
    """The model's weights in order, in groups of at most `max_bytes` (or one weight, if
    larger): reading one group is a short pause, not the whole model's."""
    chunks: list[list[mx.array]] = [[]]
    size = 0
    for _, weight in named_weights(model):
        if chunks[-1] and size + weight.nbytes > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(weight)
        size += weight.nbytes
    return [chunk for chunk in chunks if chunk]


def describe_model(
    model_id: str,
    source: ModelSource,
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    config: dict[str, Any],
    path: Path,
) -> ModelInfo:
    quantization = config.get("quantization")
    size = weight_bytes(model)
    return ModelInfo(
        model_id=model_id,
        source=source,
        state=ModelState.READY,
        context_length=context_length(config),
        parameter_count=get_total_parameters(model),
        dtype=weights_dtype(model),
        quantization=Quantization(
            bits=quantization["bits"],
            group_size=quantization["group_size"],
            mode=quantization.get("mode", "affine"),
        )
        if quantization
        else None,
        vocab_size=vocab_size(tokenizer, config),
        has_chat_template=tokenizer.chat_template is not None,
        architecture=config.get("model_type", ""),
        loaded_time=time.time(),
        weight_bytes=size,
        weight_bytes_loaded=size,
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
        bos_token_id=tokenizer.bos_token_id,
        generation_defaults=read_generation_defaults(path),
    )


def read_generation_defaults(path: Path) -> GenerationDefaults:
    """The sampling defaults in the model's generation_config.json. The file is only advice:
    a missing or unreadable one gives none, a value of the wrong type is left out, and the
    model loads all the same."""
    try:
        settings = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return GenerationDefaults()
    if not isinstance(settings, dict):
        return GenerationDefaults()
    return GenerationDefaults(
        **{
            name: kind(settings[name])
            for name, kind in GENERATION_DEFAULT_TYPES.items()
            if is_generation_default(settings.get(name), kind)
        }
    )


def is_generation_default(value: Any, kind: type) -> bool:
    """A value the wire can carry: a non-negative float32, or an int that fits uint32."""
    if isinstance(value, bool):  # JSON true is no number
        return False
    if kind is int:
        return isinstance(value, int) and 0 <= value < 2**32
    return isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= FLOAT32_MAX


def vocab_size(tokenizer: TokenizerWrapper, config: dict[str, Any]) -> int:
    """Ids valid for both the tokenizer and the model: either may have rows the other lacks
    (Qwen pads its embedding past its tokenizer; some tokenizers add tokens it never got)."""
    size = len(tokenizer.get_vocab())
    rows = config.get("text_config", config).get("vocab_size")
    return min(size, rows) if isinstance(rows, int) and rows > 0 else size


def context_length(config: dict[str, Any]) -> int:
    """0 when the config does not say; then only max_tokens bounds a generation."""
    text_config = config.get("text_config", config)
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        if isinstance(text_config.get(key), int):
            return text_config[key]
    return 0


def weights_dtype(model: nn.Module) -> str:
    for _, value in named_weights(model):
        if mx.issubdtype(value.dtype, mx.floating):
            return str(value.dtype).removeprefix("mlx.core.")
    return ""


def load_model(
    source: ModelSource, model_id: str, fuse: bool = True, decode_kernel: bool = True
) -> LoadedModel:
    """All of a model at once, in the calling thread (tests, tools); the engine process reads
    one piece per loop turn instead, so that the other models keep stepping."""
    path = checked_model_path(source)
    model, config = build_model(path, fuse=fuse, decode_kernel=decode_kernel)
    mx.eval(model.parameters())
    tokenizer = read_tokenizer(path, config)
    info = describe_model(model_id, source, model, tokenizer, config, path)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, path=path)
