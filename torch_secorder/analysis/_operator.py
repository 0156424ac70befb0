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

from torch_secorder._checks import check_analysis_form, check_operator
from torch_secorder.core.operator import closure_operator
from torch_secorder.core.params import unflatten


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


class _OnDevice:
    """A user operator whose ``device`` is not a :class:`torch.device`, with one."""

    def __init__(self, operator: Any, device: torch.device) -> None:
        self.matmat = operator.matmat
        self.shape, self.dtype, self.device = operator.shape, operator.dtype, device


def resolve(fname: str, func_or_operator: object, params: object) -> Target:
    """Validate the closure or operator form of an analysis function.

    Raises:
        TypeError: If ``func_or_operator`` is neither callable nor an operator, if ``params``
            is missing for a closure or given with an operator, or on malformed operator
            attributes.
        ValueError: If the operator is not square, empty or not floating point, or the params
            mix dtypes or devices.
    """
    tensors = check_analysis_form(fname, func_or_operator, params)
    if tensors is None:
        size, dtype, device = check_operator(fname, func_or_operator)
        operator: Any = func_or_operator
        if not isinstance(operator.device, torch.device):  # ("cuda:0", say)
            operator = _OnDevice(operator, device)
        return Target(operator, None, size, dtype, device)
    operator = closure_operator(fname, func_or_operator, tensors)
    return Target(operator, tensors, operator.shape[0], operator.dtype, operator.device, owned=True)
