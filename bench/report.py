"""The one result format of every subcommand, and its printing.

A report is a JSON object: `command` (the subcommand), `machine` (where it ran), `arguments`
(as parsed), `rows` (one object per measured case), `ratios` (comparisons of rows, each with
its value and, where rounds alternate, the value round by round) and `checks` (named numbers
a run is judged by, with a target where there is one). Files from before this format live
under docs/bench/ as history.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    # A format spec for numbers ("8.1f"), used for each item of a list too.
    spec: str = ""


def make_report(
    command: str,
    args: argparse.Namespace,
    rows: list[dict],
    ratios: Iterable[dict] = (),
    checks: Iterable[dict] = (),
) -> dict:
    return {
        "command": command,
        "machine": describe_machine(),
        "arguments": describe_arguments(args),
        "rows": rows,
        "ratios": list(ratios),
        "checks": list(checks),
    }


def ratio_entry(name: str, value: float | None, per_round: Sequence[float] = (), **labels) -> dict:
    """`name` is "a/b": how many times b's figure a's is."""
    return {**labels, "name": name, "value": value, "per_round": list(per_round)}


def median_ratio(name: str, numerator: list[float], denominator: list[float], **labels) -> dict:
    """The ratio of two variants' medians, with the ratio of every round beside it."""
    return ratio_entry(
        name,
        statistics.median(numerator) / statistics.median(denominator),
        [n / d for n, d in zip(numerator, denominator, strict=True)],
        **labels,
    )


def streams_rows(runs: dict[tuple[int, str], list[float]]) -> list[dict]:
    """One row per (streams, variant): tok/s, the median and every round's."""
    return [
        {
            "streams": streams,
            "variant": variant,
            "tok_s": statistics.median(values),
            "tok_s_rounds": values,
        }
        for (streams, variant), values in runs.items()
    ]


def check_entry(name: str, value, target: str | None = None, met: bool | None = None) -> dict:
    return {"name": name, "value": value, "target": target, "met": met}


def describe_machine() -> dict:
    """What the figures depend on: host, MLX and its device, and MLX's environment."""
    import mlx.core as mx

    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": package_version("mlx-lm"),
        "mlx_serving": package_version("mlx-serving"),
        "device": str(mx.default_device()),
        "device_info": {k: v for k, v in mx.device_info().items() if is_plain(v)},
        "cuda": bool(hasattr(mx, "cuda") and mx.cuda.is_available()),
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MLX_")},
    }
    if os.environ.get("LD_PRELOAD"):
        machine["environment"]["LD_PRELOAD"] = os.environ["LD_PRELOAD"]
    return machine


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def is_plain(value) -> bool:
    return isinstance(value, str | int | float | bool)


def describe_arguments(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def write_json(path: Path, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def format_report(report: dict, columns: Sequence[Column]) -> str:
    """The rows as a table, then the ratios and the checks."""
    parts = [format_table(report["rows"], columns)]
    if report["ratios"]:
        parts.append(format_ratios(report["ratios"]))
    if report["checks"]:
        parts.append(format_checks(report["checks"]))
    return "\n\n".join(parts)


def format_ratios(ratios: list[dict]) -> str:
    labels = [k for k in ratios[0] if k not in ("name", "value", "per_round")]
    columns = [Column(key, key) for key in labels]
    columns += [Column("ratio", "name"), Column("value", "value", ".3f")]
    if any(len(r["per_round"]) > 1 for r in ratios):
        columns.append(Column("per round", "per_round", ".2f"))
    return format_table(ratios, columns)


def format_checks(checks: list[dict]) -> str:
    lines = []
    for item in checks:
        verdict = {True: "PASS", False: "FAIL", None: "----"}[item["met"]]
        target = f" (target {item['target']})" if item["target"] else ""
        value = format_value(item["value"], ".4g")
        lines.append(f"[{verdict}] {item['name']} = {value}{target}")
    return "\n".join(lines)


def format_table(rows: list[dict], columns: Sequence[Column]) -> str:
    """A plain-text table, right-aligned, columns as wide as their widest cell."""
    cells = [[c.header for c in columns]]
    cells += [[format_value(row.get(c.key), c.spec) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_value(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(item, spec) for item in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, int | float) and spec:
        return format(value, spec)
    return str(value)
