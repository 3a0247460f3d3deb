"""Build a random-weight Llama model of a chosen shape, for benchmarks.

Usage: python scripts/make_bench_model.py [--preset small] [--set KEY=VALUE ...] [OUT_DIR]

The tokenizer (and its special tokens) is the embedded test model's; only the weights and
config.json change. A vocabulary larger than the tokenizer's 2048 ids costs the same compute
as a real one, and the rows of ids the tokenizer does not know are zeroed in the output
projection, so greedy decoding stays on printable tokens and every streamed token has text.
Without OUT_DIR the model is built once into the shared cache and its path printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from mlx_serving.engine.default_model import (  # noqa: E402
    _cache_root,
    default_model_path,
    llama_param_shapes,
    make_default_model,
)

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

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


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
        _write_model(staged, {**PRESETS[preset], **(overrides or {})})
        shutil.rmtree(out, ignore_errors=True)
        staged.rename(out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out


def bench_model_path(
    preset: str, overrides: dict | None = None, cache_dir: Path | None = None
) -> Path:
    """The cached build of a preset, built on first use."""
    if PRESETS[preset] is None and not overrides:
        return default_model_path(cache_dir)
    recipe = [RECIPE_VERSION, SEED, preset, PRESETS[preset], sorted((overrides or {}).items())]
    digest = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:10]
    path = _cache_root(cache_dir) / f"bench-{preset}-{digest}"
    if (path / "model.safetensors").is_file():
        return path
    return make_bench_model(path, preset, overrides)


def add_model_arguments(parser: argparse.ArgumentParser, default_preset: str) -> None:
    """The benchmarks' choice of model: a directory, or a preset built on first use."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="a model directory (Hugging Face layout)")
    source.add_argument("--model-preset", choices=sorted(PRESETS), default=default_preset)


def chosen_model_path(args: argparse.Namespace) -> Path:
    return args.model or bench_model_path(args.model_preset)


def _write_model(out: Path, shape: dict) -> None:
    source = default_model_path()
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, out / name)
    tokenizer_config = json.loads((source / "config.json").read_text())
    config = {**LLAMA_DEFAULTS, **shape}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config[key] = tokenizer_config[key]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    known = tokenizer_config["vocab_size"]
    special = _special_token_ids(out / "tokenizer.json")
    weights = _init_weights(config, known, special)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})


def _special_token_ids(tokenizer_json: Path) -> list[int]:
    added = json.loads(tokenizer_json.read_text()).get("added_tokens", [])
    return [t["id"] for t in added if t.get("special")]


def _init_weights(config: dict, known_ids: int, special_ids: list[int]) -> dict[str, mx.array]:
    """Each tensor drawn from a name-derived key and evaluated at once, so peak memory stays
    near the model's own size. Output rows of special and unknown ids are zeroed: greedy
    decoding never picks them (the best of the known ids' logits is positive)."""
    dtype = DTYPES[config["torch_dtype"]]
    weights = {}
    for name, shape in llama_param_shapes(config).items():
        weights[name] = _init_param(name, shape, dtype, config["num_hidden_layers"])
        mx.eval(weights[name])
    head = "model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"
    dead = mx.array(special_ids + list(range(known_ids, config["vocab_size"])), dtype=mx.int32)
    weights[head][dead] = 0.0
    mx.eval(weights[head])
    return weights


def _init_param(name: str, shape: tuple[int, ...], dtype: mx.Dtype, layers: int) -> mx.array:
    """Uniform with the standard deviation of fan-in scaling, so logits spread near unit
    width (uniform draws are 3x faster than normal ones); the residual writers are scaled
    down by depth so the residual stream does not grow layer after layer."""
    if name.endswith("norm.weight"):
        return mx.ones(shape, dtype=dtype)
    key = mx.random.key(zlib.crc32(f"{SEED}:{name}".encode()))
    scale = shape[-1] ** -0.5
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        scale /= (2 * layers) ** 0.5
    bound = 3**0.5 * scale
    return mx.random.uniform(-bound, bound, shape, dtype=dtype, key=key)


def parse_overrides(items: list[str]) -> dict:
    """KEY=VALUE pairs; values are read as JSON when they parse, else kept as strings."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="where to write the model")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config.json field of the preset (e.g. num_hidden_layers=2)",
    )
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.out_dir:
        path = make_bench_model(args.out_dir, args.preset, overrides)
    else:
        path = bench_model_path(args.preset, overrides)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
