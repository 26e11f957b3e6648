"""Command-line parsing shared by the recipes: one config file per experiment, flags on top.

``python recipes/X.py config.yaml --max_steps 3``: the file's keys become flags placed before the
command line's own, and argparse keeps the last value of a repeated flag, so flags override the file.
Every field is a dataclass field with a ``help`` text, so ``--help`` explains all of them.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .hub import redact

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of field names to values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a mapping of field names to values.")
    return values


def config_to_flags(values: dict[str, Any]) -> list[str]:
    """``{"max_steps": 3, "data_files": ["a", "b"]}`` -> ``["--max_steps", "3", "--data_files", "a", "b"]``."""
    flags: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, bool):
            flags.append(str(value).lower())
        elif isinstance(value, list | tuple):
            flags.extend(str(item) for item in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(str(value))
    return flags


def parse_config_and_flags(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, *, description: str | None = None
) -> tuple[Any, ...]:
    """Parse ``[config.yaml|json] [--flag value ...]`` into instances of ``dataclass_types``.

    Unknown keys in the file or on the command line are errors that name them.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, description=description)
    if args and args[0].endswith(CONFIG_SUFFIXES) and not args[0].startswith("-"):
        config_path = args.pop(0)
        args = config_to_flags(read_config_file(config_path)) + args
    parsed = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    *instances, remaining = parsed
    if remaining:
        raise ValueError(f"Unknown arguments: {' '.join(remaining)}. See --help for the accepted fields.")
    return tuple(instances)


def recipe_text(argv: Sequence[str] | None = None) -> str:
    """The experiment as it was run: the config file verbatim, then any command-line overrides.

    Secrets (Hub tokens in the file or among the flags) are redacted: the text goes into model cards.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    text = ""
    if args and args[0].endswith(CONFIG_SUFFIXES) and Path(args[0]).is_file():
        text = Path(args.pop(0)).read_text().rstrip() + "\n"
    if args:
        text += "# command-line overrides\n" + shlex.join(args) + "\n"
    return redact(text)
