"""Command-line parsing shared by the recipes: one config file per experiment, flags on top.

``python recipes/X.py config.yaml --max_steps 3``: the file's keys become flags placed before the
command line's own, and argparse keeps the last value of a repeated flag, so flags override the file.
A ``null`` in the file sets the field to None. Flags must be spelled out (no abbreviations), so a typo
is an error rather than another field. Every field is a dataclass field with a ``help`` text, so
``--help`` explains all of them.

:func:`run_recipe` runs a recipe's ``main`` so that a mistake in its input ends with one line on stderr
and exit status 2 instead of a traceback (``ATTNDISTILL_FULL_ERROR=1`` shows the traceback), and a
failed push to the Hub with its retry hint, or a run that failed its own check (:class:`RunFailedError`),
with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml
from transformers import HfArgumentParser

from .families import UnsupportedModelError
from .hub import HubPushError, redact

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
FULL_ERROR_VARIABLE = "ATTNDISTILL_FULL_ERROR"
# Mistakes in a recipe's input (bad values, missing files or columns, unreadable models): one line.
# UnsupportedModelError: a teacher or student the library refuses (a TypeError, as for a wrong argument type).
USER_ERRORS = (ValueError, KeyError, OSError, UnsupportedModelError)
T = TypeVar("T")


# argparse's message for a bad value: "argument --max_steps/--max-steps: invalid int value: 'abc'".
_BAD_VALUE = re.compile(r"^argument --(?P<key>[\w-]+)(?:/--[\w-]+)*: (?P<reason>.*)$", re.DOTALL)


class RunFailedError(RuntimeError):
    """The input was accepted but the run did not deliver (a converted model that fails verification, say).

    :func:`run_recipe` reports it in one line with exit status 1, so that scripts tell it from a mistake
    in the input (2).
    """


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks (usage examples) and shows every default."""


class _ArgumentError(ValueError):
    """argparse refused a flag or value."""


class _Parser(HfArgumentParser):
    """A mistake in a flag or value is a ValueError (one line from :func:`run_recipe`), not the whole usage
    text followed by an exit."""

    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(message)


def _where_set(message: str, config_path: str | None, file_keys: set[str], command_line: Sequence[str]) -> str:
    """argparse's message for a bad value, naming the field and where it was set: the file, the command line."""
    match = _BAD_VALUE.match(message)
    if match is None:
        return message
    key, reason = match.group("key"), match.group("reason")
    if config_path is None or key not in file_keys:
        return f"--{key}: {reason}"
    given = any(arg == f"--{key}" or arg.startswith(f"--{key}=") for arg in command_line)
    return f"{key} in {config_path}{' or on the command line' if given else ''}: {reason}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of field names to values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"Config file {path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
    except yaml.YAMLError as error:
        # The construct that was left open (an unclosed bracket), else where parsing stopped.
        mark = getattr(error, "context_mark", None) or getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        parts = [getattr(error, "context", None), getattr(error, "problem", None)]
        reason = ": ".join(part for part in parts if part) or str(error).splitlines()[0]
        raise ValueError(f"Config file {path}{where}: not valid YAML ({reason}).") from None
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
            # Mappings in a list (e.g. distill.py's students) travel as JSON objects.
            flags.extend(json.dumps(item) if isinstance(item, dict) else str(item) for item in value)
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
    config_path, values = None, {}
    if args and args[0].endswith(CONFIG_SUFFIXES) and not args[0].startswith("-"):
        config_path = args.pop(0)
        values = read_config_file(config_path)
    return _parse(dataclass_types, values, args, source=config_path, description=description)


def parse_config_and_fields(
    dataclass_types: Sequence[type], config: str | os.PathLike[str] | None = None, fields: Mapping[str, Any] = {}
) -> tuple[Any, ...]:
    """Parse an optional config file and keyword fields over it (None clears a field), as the command line would.

    The same fields, conversions and checks as :func:`parse_config_and_flags`: a field is spelt as its flag
    without the dashes (``max_steps=3`` is ``--max_steps 3``).
    """
    values = read_config_file(config) if config is not None else {}
    values.update(fields)
    source = "the keyword arguments" if config is None else str(config)
    if config is not None and fields:
        source += " or the keyword arguments"
    return _parse(dataclass_types, values, [], source=source, check_keys=True)


def _parse(
    dataclass_types: Sequence[type],
    values: Mapping[str, Any],
    command_line: list[str],
    *,
    source: str | None,
    description: str | None = None,
    check_keys: bool = False,
) -> tuple[Any, ...]:
    """``values`` (of a file, ``source``) as flags before ``command_line``'s own; nulls clear their field."""
    parser = _Parser(dataclass_types, description=description, allow_abbrev=False, formatter_class=_HelpFormatter)
    _describe_negations(parser)
    known = {action.dest for action in parser._actions}
    nulls = [key for key, value in values.items() if value is None]
    unknown = [key for key in (values if check_keys else nulls) if key not in known]
    if unknown:
        raise ValueError(f"Unknown keys in {source}: {', '.join(unknown)}. See --help for the accepted fields.")
    parser.set_defaults(**dict.fromkeys(nulls))  # flags given on the command line still win
    args = config_to_flags(dict(values)) + command_line
    try:
        parsed = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    except _ArgumentError as error:
        raise ValueError(_where_set(str(error), source, set(values), command_line)) from None
    *instances, remaining = parsed
    if remaining:
        raise ValueError(f"Unknown arguments: {' '.join(remaining)}. See --help for the accepted fields.")
    return tuple(instances)


def _describe_negations(parser: argparse.ArgumentParser) -> None:
    """HfArgumentParser gives ``--no_X`` (for a boolean X that defaults to true) X's own help: say what it does."""
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction) and any(o.startswith("--no_") for o in action.option_strings):
            action.help = f"Turn --{action.dest} off."


# Set by MPI launchers: Accelerate starts several CPU processes only through mpirun (with a hostfile).
_MPI_WORLD_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")


def check_single_process_launch(environ: Mapping[str, str] | None = None, parent_command: Sequence[str] = ()) -> None:
    """Refuse a run that asked for several CPU processes and got one.

    ``accelerate launch --num_processes N --cpu`` without an MPI hostfile starts the script once, as a
    single process, and says nothing: it only sets the rendezvous address (``MASTER_ADDR``), which it
    does when more than one process is asked for. ``parent_command`` (the launcher's command line)
    names the number asked for, where it can be read.
    """
    environ = os.environ if environ is None else environ
    asked_for_several = environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in environ
    if not asked_for_several or any(name in environ for name in _MPI_WORLD_SIZE_VARIABLES):
        return
    asked = next(
        (value for flag, value in itertools.pairwise(parent_command) if flag in ("--num_processes", "--num-processes")),
        "N",
    )
    command = list(sys.argv)
    if not any(arg.startswith("--use_cpu") for arg in command):
        command += ["--use_cpu", "true"]  # what --cpu told Accelerate; torchrun would take a GPU if there is one
    raise ValueError(
        f"accelerate launch --cpu started 1 process, not the {asked} asked for (Accelerate starts several CPU "
        f"processes only through mpirun); run: torchrun --nproc_per_node {asked} {shlex.join(command)}"
    )


def _parent_command() -> list[str]:
    """The command line of the process that started this one (Linux), or nothing."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def run_recipe(main: Callable[[], T]) -> T:
    """``main()``, with a mistake in the recipe's input reported as ``error: ...`` and exit status 2.

    A traceback helps nobody who typed a wrong path; set ``ATTNDISTILL_FULL_ERROR=1`` to see it anyway.
    A failed push to the Hub exits with status 1 and its message, which says how to retry: the local
    output is complete, but scripts and CI must notice that it was not published. So does a
    :class:`RunFailedError`.
    """
    try:
        check_single_process_launch(parent_command=_parent_command())
        return main()
    except (HubPushError, RunFailedError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except USER_ERRORS as error:
        if os.environ.get(FULL_ERROR_VARIABLE, "") not in ("", "0"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}\n(set {FULL_ERROR_VARIABLE}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def fields_text(config: str | os.PathLike[str] | None, fields: Mapping[str, Any]) -> str:
    """The experiment of a ``distill(config, **fields)`` call: the config file verbatim, then the fields.

    Secrets are redacted, as in :func:`recipe_text`.
    """
    text = Path(config).read_text().rstrip() + "\n" if config is not None else ""
    if fields:
        plain = json.loads(json.dumps(dict(fields), default=str))  # paths and the like as strings
        text += "# keyword arguments\n" + yaml.safe_dump(plain, sort_keys=False)
    return redact(text)


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
