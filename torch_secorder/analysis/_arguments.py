"""Argument validation for the analysis functions.

Every helper receives the public function's name so that messages read
``<function>: <argument> <what is wrong>; expected <x>, got <y>.``, and every check runs before
the first Hessian-vector product.
"""

import math
from collections.abc import Sequence

import torch


def _type_name(obj: object) -> str:
    return type(obj).__name__


def check_choice(fname: str, argname: str, value: object, choices: Sequence[str]) -> str:
    """Raise unless ``value`` is one of ``choices`` (the message lists them)."""
    listed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(
            f"{fname}: {argname} must be a str, one of {listed}; got {_type_name(value)}."
        )
    if value not in choices:
        raise ValueError(f"{fname}: {argname} must be one of {listed}; got {value!r}.")
    return value


def check_int(fname: str, argname: str, value: object, minimum: int, why: str = "") -> int:
    """Raise unless ``value`` is an ``int`` (not a ``bool``) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fname}: {argname} must be an int; got {_type_name(value)}.")
    if value < minimum:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{fname}: {argname} must be at least {minimum}{reason}; got {value}.")
    return value


def check_positive(fname: str, argname: str, value: object) -> float:
    """Raise unless ``value`` is a finite positive real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fname}: {argname} must be a positive number; got {_type_name(value)}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fname}: {argname} must be a finite positive number; got {value}.")
    return float(value)


def check_generator(fname: str, generator: object) -> None:
    """Raise unless ``generator`` is ``None`` or a :class:`torch.Generator`."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fname}: generator must be None or a torch.Generator; got {_type_name(generator)}."
        )


def check_estimator(
    fname: str,
    method: object,
    num_matvecs: object,
    generator: object,
    needs: dict[str, tuple[int, str]],
) -> None:
    """Check an estimator's ``method``, its budget and its generator.

    ``needs`` maps every method to the fewest products it can run with and why.
    """
    check_choice(fname, "method", method, tuple(needs))
    minimum, why = needs[method]  # type: ignore[index]
    check_int(fname, "num_matvecs", num_matvecs, minimum, f"method={method!r} needs {why}")
    check_generator(fname, generator)
