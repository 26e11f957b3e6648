"""Range checks of numeric settings, with the flag's name in the message.

A NaN loss weight, a zero learning rate or a batch of 0 images would otherwise train nothing (or fail
deep inside torch, without the flag's name, after the teacher has loaded). Every numeric field of a
recipe's arguments is declared here with its range (:class:`Bound`) and checked when it is parsed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """The values a numeric setting accepts: finite, optionally an integer, within the given limits.

    ``minimum`` / ``maximum`` are inclusive, ``above`` / ``below`` exclusive; ``optional`` accepts None
    (the setting's "not given"); ``excluded`` lists single values that are refused inside the range.
    """

    integer: bool = False
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    below: float | None = None
    optional: bool = False
    excluded: tuple[float, ...] = ()
    text: str | None = None  # says what the range means where the limits alone would not

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        return (
            math.isfinite(value)
            and value not in self.excluded
            and (self.minimum is None or value >= self.minimum)
            and (self.above is None or value > self.above)
            and (self.maximum is None or value <= self.maximum)
            and (self.below is None or value < self.below)
        )

    def describe(self) -> str:
        if self.text is not None:
            return self.text
        limits = [
            f"{sign} {limit:g}"
            for sign, limit in ((">=", self.minimum), (">", self.above), ("<=", self.maximum), ("<", self.below))
            if limit is not None
        ]
        if self.integer and limits == [">= 1"]:
            text = "a positive integer"
        elif self.integer and limits == [">= 0"]:
            text = "a non-negative integer"
        else:
            text = ("an integer" if self.integer else "a finite number") + (
                f" {' and '.join(limits)}" if limits else ""
            )
        if self.excluded:
            text += f", not {', '.join(f'{value:g}' for value in self.excluded)}"
        return text + (" (or null)" if self.optional else "")


POSITIVE_INT = Bound(integer=True, minimum=1)
OPTIONAL_POSITIVE_INT = Bound(integer=True, minimum=1, optional=True)
NON_NEGATIVE_INT = Bound(integer=True, minimum=0)
POSITIVE = Bound(above=0)
NON_NEGATIVE = Bound(minimum=0)


def check_value(flag: str, value: Any, bound: Bound) -> None:
    """Raise a one-line ``ValueError`` naming ``flag`` when ``value`` (or any item of a list) is out of ``bound``."""
    values = value if isinstance(value, list | tuple) else [value]
    if isinstance(value, list | tuple) and not value and not bound.optional:
        raise ValueError(f"{flag} must not be empty.")
    for item in values:
        if not bound.accepts(item):
            shown = value if len(values) == 1 else f"{item!r} in {value!r}"
            raise ValueError(f"{flag} must be {bound.describe()}, got {shown}.")


def check_choice(flag: str, value: Any, choices: Sequence[str]) -> None:
    """Raise a one-line ``ValueError`` naming ``flag`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{flag} {value!r}: use one of {', '.join(choices)}.")


def check_fields(values: Any, bounds: Mapping[str, Bound], *, prefix: str = "--") -> None:
    """Check the fields named in ``bounds`` of a dataclass instance or a mapping (absent keys are skipped)."""
    for name, bound in bounds.items():
        if isinstance(values, Mapping):
            if name not in values:
                continue
            value = values[name]
        else:
            value = getattr(values, name)
        check_value(f"{prefix}{name}", value, bound)
