"""Argument checks with the argument's own name: a plugin does not know where it sits in a recipe.

A method raises :class:`InvalidArgument` about its own argument (``r: expected a positive
integer, got 0``) or about itself (argument ``""``); whoever placed it adds the path
(:meth:`InvalidArgument.under`): the core adds ``model.method``, ``compose`` adds
``methods[i]``, so the user reads ``model.method.init_args.methods[1].init_args.r: ...``.

The helpers are the checks plugins (and the core) repeat: positive integers, probabilities,
fractions, choices.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class InvalidArgument(ValueError):
    """A method's argument (``argument``, relative to the method; ``""``: the method itself)
    that cannot work, and why."""

    def __init__(self, argument: str, reason: str) -> None:
        self.argument = argument
        self.reason = reason
        super().__init__(f"{argument}: {reason}" if argument else reason)

    def under(self, path: str) -> InvalidArgument:
        """The same error seen from the component that placed the method at ``path``."""
        return InvalidArgument(f"{path}.init_args.{self.argument}" if self.argument else path, self.reason)


def positive_int(value: Any, argument: str, what: str = "a positive integer") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidArgument(argument, f"expected {what}, got {value!r}")


def optional_positive_int(value: Any, argument: str) -> None:
    if value is not None:
        positive_int(value, argument, "a positive integer or null")


def positive(value: Any, argument: str) -> None:
    if not isinstance(value, (int, float)) or value <= 0:
        raise InvalidArgument(argument, f"expected > 0, got {value!r}")


def probability(value: Any, argument: str) -> None:
    """A dropout-like probability: in [0, 1)."""
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise InvalidArgument(argument, f"expected a probability in [0, 1), got {value!r}")


def nonzero_fraction(value: Any, argument: str) -> None:
    """A share of something that must not be empty: in (0, 1]."""
    if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise InvalidArgument(argument, f"expected a share in (0, 1], got {value!r}")


def one_of(value: Any, allowed: Iterable[Any], argument: str) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise InvalidArgument(argument, f"{value!r} is not supported; supported: {', '.join(map(str, allowed))}")


def find_cause(err: BaseException) -> InvalidArgument | None:
    """The :class:`InvalidArgument` behind ``err`` (jsonargparse re-raises constructor errors)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, InvalidArgument):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def method_errors(as_type: type[ValueError] | None = None, path: str = "model.method") -> Iterator[None]:
    """Around a call into the method: its :class:`InvalidArgument` comes out with the method's
    place in the recipe (``path``), as an ``as_type`` when given (e.g. a run-time FieldError)."""
    try:
        yield
    except InvalidArgument as err:
        placed = err.under(path)
        raise (as_type(str(placed)) if as_type is not None else placed) from err
