"""What an analysis talks to: a symmetric operator (``matmat``, ``shape``, ``dtype``, ``device``).

A public analysis function accepts a loss closure with its parameters (wrapped in a
:class:`~torch_secorder.core.operator.HessianOperator`, released when the analysis ends) or any
object with ``matmat(V)`` (``(P, k)`` columns in, ``(P, k)`` out), ``shape`` ``(P, P)``,
``dtype`` and ``device``. :func:`resolve` validates either form before any product.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torch_secorder._checks import as_params
from torch_secorder.core.operator import closure_operator
from torch_secorder.core.params import unflatten

_OPERATOR_ATTRIBUTES = ("matmat", "shape", "dtype", "device")


@dataclass
class Target:
    """A validated operator and the structure results are returned in.

    Attributes:
        operator: The operator (``matmat``, ``shape``, ``dtype``, ``device``).
        params: The parameters for the closure form (results like params), else ``None``
            (flat results).
        size: ``P``.
        dtype: The operator's dtype.
        device: The operator's device.
        owned: Whether the operator was built here (and is released after the analysis).
    """

    operator: Any
    params: list[Tensor] | None
    size: int
    dtype: torch.dtype
    device: torch.device
    owned: bool = False

    @contextlib.contextmanager
    def open(self) -> Iterator[Any]:
        """Yield the operator; an operator built here is released on exit."""
        try:
            yield self.operator
        finally:
            if self.owned:
                self.operator.release()

    def like_params(self, flat: Tensor) -> Tensor | list[Tensor]:
        """A flat ``(P,)`` vector as tensors like params (closure form), else unchanged."""
        return flat if self.params is None else unflatten(flat, self.params)

    def columns_like_params(self, columns: Tensor) -> Tensor | list[Tensor]:
        """``(P, k)`` columns as tensors like params with a leading ``k`` (closure form)."""
        return columns if self.params is None else unflatten(columns.T, self.params)


def is_operator(obj: object) -> bool:
    """Whether ``obj`` looks like an operator (has every attribute of the protocol)."""
    return all(hasattr(obj, name) for name in _OPERATOR_ATTRIBUTES)


def resolve(fname: str, func_or_operator: object, params: object) -> Target:
    """Validate the closure or operator form of an analysis function.

    Raises:
        TypeError: If ``func_or_operator`` is neither callable nor an operator, if ``params``
            is missing for a closure or given with an operator, or on malformed operator
            attributes.
        ValueError: If the operator is not square, empty or not floating point, or the params
            mix dtypes or devices.
    """
    if is_operator(func_or_operator):
        if params is not None:
            raise TypeError(
                f"{fname}: params must be None when func_or_operator is an operator; got "
                f"{type(params).__name__}. The operator already fixes the parameters."
            )
        return operator_target(fname, func_or_operator)
    if not callable(func_or_operator):
        raise TypeError(
            f"{fname}: func_or_operator must be a loss closure (with params) or an operator "
            f"with matmat, shape, dtype and device; got {type(func_or_operator).__name__}."
        )
    if params is None:
        raise TypeError(
            f"{fname}: params is required with a loss closure; expected an iterable of tensors, "
            "got None."
        )
    tensors = as_params(fname, params)
    first = tensors[0]
    for i, p in enumerate(tensors):
        if p.dtype != first.dtype or p.device != first.device:
            raise ValueError(
                f"{fname}: params must share one dtype and device, but params[0] is "
                f"{first.dtype} on {first.device} and params[{i}] is {p.dtype} on {p.device}."
            )
    operator = closure_operator(fname, func_or_operator, tensors)
    size = operator.shape[0]
    return Target(operator, tensors, size, first.dtype, first.device, owned=True)


def operator_target(fname: str, operator: Any) -> Target:
    """Validate an operator's ``matmat``, ``shape``, ``dtype`` and ``device``."""
    if not callable(operator.matmat):
        raise TypeError(f"{fname}: func_or_operator.matmat must be callable.")
    shape = operator.shape
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError(
            f"{fname}: func_or_operator.shape must be a pair of ints; got {shape!r}."
        ) from None
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"{fname}: func_or_operator has shape {shape}; expected a square operator (P, P)."
        )
    if shape[0] < 1:
        raise ValueError(f"{fname}: func_or_operator has shape {shape}; expected P >= 1.")
    dtype = operator.dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"{fname}: func_or_operator.dtype must be a torch.dtype; got {type(dtype).__name__}."
        )
    if not dtype.is_floating_point:
        raise ValueError(
            f"{fname}: func_or_operator has dtype {dtype}; expected a floating-point operator."
        )
    try:
        device = torch.device(operator.device)
    except (TypeError, RuntimeError):
        raise TypeError(
            f"{fname}: func_or_operator.device must be a torch.device; got "
            f"{type(operator.device).__name__}."
        ) from None
    return Target(operator, None, shape[0], dtype, device)
