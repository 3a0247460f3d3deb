"""Build the tiny random-weight test model and print where it is.

Usage: python scripts/make_test_model.py [OUT_DIR]

Without OUT_DIR the shared cache copy is used (built only if missing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from mlx_serving.server.default_model import default_model_path, make_default_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="where to write the model")
    args = parser.parse_args(argv)
    path = make_default_model(args.out_dir) if args.out_dir else default_model_path()
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
