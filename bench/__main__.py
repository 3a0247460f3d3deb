"""Run one benchmark: python -m bench SUBCOMMAND [options] [--json PATH].

It prints its tables, and writes its report (bench/report.py's format) where --json says.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from . import report

# subcommand → its module: add_arguments(parser), run(args) → report, and optionally
# render(report) → text (else the rows with the module's COLUMNS).
SUBCOMMANDS = {
    "serving": "serving",
    "ab": "ab",
    "decode-step": "decode_step",
    "new-shapes": "new_shapes",
    "token-events": "token_events",
    "make-model": "make_model",
    "grammars": "grammars",
    "constrained": "constrained",
    "sampling": "sampling",
    "sampled": "sampled",
    "speculative": "speculative",
    "cold-start": "cold_start",
    "long-prompt": "long_prompt",
}


def load(command: str):
    return importlib.import_module(f"{__package__}.{SUBCOMMANDS[command]}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for command in SUBCOMMANDS:
        module = load(command)
        summary = module.__doc__.strip().splitlines()[0]
        sub = commands.add_parser(
            command,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.add_argument("--json", type=Path, help="write the report here")
    return parser


def render(module, result: dict) -> str:
    if hasattr(module, "render"):
        return module.render(result)
    return report.format_report(result, module.COLUMNS)


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    module = load(args.command)
    try:
        result = module.run(args)
    except (RuntimeError, TimeoutError) as exc:
        print(f"bench {args.command} failed: {exc}", file=sys.stderr)
        return 1
    print("\n" + render(module, result), flush=True)
    if args.json:
        report.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
