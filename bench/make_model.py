"""Build a random-weight Llama model of a preset's shape and print where it is.

The tokenizer is the embedded test model's.

Without OUT_DIR the model is built once into the cache beside the embedded test model
($MLX_SERVING_CACHE, else ~/.cache/mlx-serving) and reused from there by every subcommand's
--model-preset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import report
from .model_maker import PRESETS, bench_model_path, make_bench_model, parameter_count

COLUMNS = [
    report.Column("preset", "preset"),
    report.Column("parameters", "parameters", ","),
    report.Column("MB on disk", "megabytes", ".1f"),
    report.Column("path", "path"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", nargs="?", type=Path, help="where to write the model")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument(
        "--set",
        dest="overrides",
        type=override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config.json field of the preset (e.g. num_hidden_layers=2)",
    )


def override(text: str) -> tuple[str, object]:
    """KEY=VALUE; the value is read as JSON when it parses, else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run(args) -> dict:
    overrides = dict(args.overrides)
    if args.out_dir:
        path = make_bench_model(args.out_dir, args.preset, overrides)
    else:
        path = bench_model_path(args.preset, overrides)
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    row = {
        "preset": args.preset,
        "overrides": overrides,
        "path": str(path),
        "parameters": parameter_count(path),
        "megabytes": size / 1e6,
    }
    return report.make_report("make-model", args, [row])
