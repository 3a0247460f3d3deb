"""Argument types the subcommands share: lists, length ranges and engine settings."""

from __future__ import annotations

import argparse
import dataclasses

from mlx_serving.engine.config import EngineConfig

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def int_list(text: str) -> list[int]:
    """1,4,16 → [1, 4, 16]."""
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: numbers separated by commas") from None


def length_range(text: str) -> tuple[int, int]:
    """118, or 64-256."""
    shortest, _, longest = text.partition("-")
    try:
        pair = int(shortest), int(longest or shortest)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of tokens, or MIN-MAX") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return pair


def engine_setting(text: str) -> tuple[str, bool | int | float]:
    """KEY=VALUE for an `engine` key (docs/CONFIG.md), read as that key's type."""
    key, _, value = text.partition("=")
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    if key not in defaults:
        raise argparse.ArgumentTypeError(f"unknown engine key {key!r}; one of {sorted(defaults)}")
    kind = type(defaults[key])
    try:
        if kind is bool:
            if value.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError
            return key, value.lower() in TRUE_WORDS
        return key, kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"engine.{key}: expected {kind.__name__}") from None


def choice_list(choices: tuple[str, ...]):
    """An argument type for names out of `choices`, separated by commas."""

    def parse(text: str) -> list[str]:
        names = [x for x in text.split(",") if x]
        if unknown := set(names) - set(choices):
            raise argparse.ArgumentTypeError(f"unknown {sorted(unknown)}; choose from {choices}")
        return names

    return parse
