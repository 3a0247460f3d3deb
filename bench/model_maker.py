"""Random-weight Llama models of chosen shapes, so benchmarks need no download.

The tokenizer (and its special tokens) is the embedded test model's; only the weights and
config.json change. A vocabulary larger than the tokenizer's ids costs the same compute as a
real one, and the rows of ids the tokenizer does not know are zeroed in the output projection,
so greedy decoding stays on printable tokens and every streamed token has text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import tempfile
import zlib
from pathlib import Path

from mlx_serving.server.default_model import default_model_path, make_default_model

RECIPE_VERSION = "1"
SEED = 0
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

LLAMA_DEFAULTS = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "mlp_bias": False,
}

PRESETS: dict[str, dict | None] = {
    # The embedded test model itself (make_default_model builds it).
    "tiny": None,
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "vocab_size": 2048,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    },
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
}


def add_model_arguments(parser: argparse.ArgumentParser, default_preset: str) -> None:
    """Every subcommand's choice of model: a directory, or a preset built on first use."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="a model directory (Hugging Face layout)")
    source.add_argument("--model-preset", choices=sorted(PRESETS), default=default_preset)


def chosen_model_path(args: argparse.Namespace) -> Path:
    return args.model or bench_model_path(args.model_preset)


def bench_model_path(
    preset: str, overrides: dict | None = None, cache_dir: Path | None = None
) -> Path:
    """The cached build of a preset, built on first use, beside the embedded test model."""
    tiny = default_model_path(cache_dir)
    if PRESETS[preset] is None and not overrides:
        return tiny
    recipe = [RECIPE_VERSION, SEED, preset, PRESETS[preset], sorted((overrides or {}).items())]
    digest = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:10]
    path = tiny.parent / f"bench-{preset}-{digest}"
    if (path / "model.safetensors").is_file():
        return path
    return make_bench_model(path, preset, overrides)


def make_bench_model(out: Path, preset: str = "small", overrides: dict | None = None) -> Path:
    """Write the model into `out` (replaced if present), staged so readers never see half of it."""
    out = Path(out)
    if PRESETS[preset] is None:
        if overrides:
            raise ValueError("the tiny preset takes no overrides")
        return make_default_model(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staged.chmod(0o755)
    try:
        write_model(staged, {**PRESETS[preset], **(overrides or {})})
        shutil.rmtree(out, ignore_errors=True)
        staged.rename(out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out


def write_model(out: Path, shape: dict) -> None:
    import mlx.core as mx

    source = default_model_path()
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, out / name)
    tokenizer_config = json.loads((source / "config.json").read_text())
    config = {**LLAMA_DEFAULTS, **shape}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config[key] = tokenizer_config[key]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = special_token_ids(out / "tokenizer.json")
    weights = init_weights(config, tokenizer_config["vocab_size"], special)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The checkpoint's names and shapes, as mlx-lm's Llama declares them (never evaluated)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(config))
    return {name: tuple(p.shape) for name, p in sorted(tree_flatten(model.parameters()))}


def special_token_ids(tokenizer_json: Path) -> list[int]:
    added = json.loads(tokenizer_json.read_text()).get("added_tokens", [])
    return [t["id"] for t in added if t.get("special")]


def init_weights(config: dict, known_ids: int, special_ids: list[int]) -> dict:
    """Each tensor drawn from a name-derived key and evaluated at once, so peak memory stays
    near the model's own size. Output rows of special and unknown ids are zeroed: greedy
    decoding never picks them (the best of the known ids' logits is positive)."""
    import mlx.core as mx

    dtype = getattr(mx, config["torch_dtype"])
    weights = {}
    for name, shape in parameter_shapes(config).items():
        weights[name] = init_parameter(name, shape, dtype, config["num_hidden_layers"])
        mx.eval(weights[name])
    head = "model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"
    dead = mx.array(special_ids + list(range(known_ids, config["vocab_size"])), dtype=mx.int32)
    weights[head][dead] = 0.0
    mx.eval(weights[head])
    return weights


def init_parameter(name: str, shape: tuple[int, ...], dtype, layers: int):
    """Uniform with the standard deviation of fan-in scaling, so logits spread near unit
    width (uniform draws are 3x faster than normal ones); the residual writers are scaled
    down by depth so the residual stream does not grow layer after layer."""
    import mlx.core as mx

    if name.endswith("norm.weight"):
        return mx.ones(shape, dtype=dtype)
    key = mx.random.key(zlib.crc32(f"{SEED}:{name}".encode()))
    scale = shape[-1] ** -0.5
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        scale /= (2 * layers) ** 0.5
    bound = 3**0.5 * scale
    return mx.random.uniform(-bound, bound, shape, dtype=dtype, key=key)


def parameter_count(path: Path) -> int:
    """Parameters of a built model, from its config alone."""
    config = {**LLAMA_DEFAULTS, **json.loads((Path(path) / "config.json").read_text())}
    return sum(math.prod(shape) for shape in parameter_shapes(config).values())
