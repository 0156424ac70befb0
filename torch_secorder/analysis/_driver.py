r"""Run any number of analyses in lockstep over one operator, one batched product per step.

Every algorithm is written as a generator that yields a block of vectors ``V`` of shape
``(n, j)`` (``n`` the size of its problem) and receives the products ``HV = yield V``; its
return value is its result. :func:`run` advances several such generators together: each step
it stacks all their requests, zero-padded outside each problem's rows, into one ``matmat``,
restricts the products back to each problem's rows (so a problem on rows :math:`g` sees the
diagonal block :math:`H_{gg}`), and counts each problem's products. A single analysis is the
same driver with one problem. Over a data set, one step is one pass over the data for all
problems.

Along the way each problem's first two product vectors :math:`u, v` test symmetry for free:
:math:`u^\top(Hv)` must equal :math:`v^\top(Hu)` up to rounding.
"""

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Steps = Generator[Tensor, Tensor, Any]
"""An algorithm: yields ``(n, j)`` blocks of vectors, receives their products, returns a result."""

BLOCK_BYTES = 2**30
"""Memory a block of independent probes may take; estimators with more probes yield chunks."""


def max_columns(n: int, dtype: torch.dtype) -> int:
    """Most ``n``-vectors of ``dtype`` that fit in :data:`BLOCK_BYTES` (at least one)."""
    return max(1, BLOCK_BYTES // (n * torch.finfo(dtype).bits // 8))


class SymmetryCheck:
    r"""Compare :math:`u^\top(Hv)` with :math:`v^\top(Hu)` for the first two product vectors.

    The relative difference :math:`|a - b| / (|a| + |b| + \sqrt{\varepsilon}\,c)`, with
    :math:`c = \|u\|\|Hv\| + \|v\|\|Hu\|` guarding products that vanish, must stay below
    :math:`\varepsilon^{1/4}` (:math:`\varepsilon` the dtype's machine epsilon, about
    :math:`10^{-4}` in float64 and :math:`2 \cdot 10^{-2}` in float32). The test is skipped for
    half precisions, whose rounding is too coarse for it.
    """

    def __init__(self, fname: str, dtype: torch.dtype) -> None:
        self.fname = fname
        self.eps = torch.finfo(dtype).eps
        self.done = self.eps > 1e-4
        self.first: tuple[Tensor, Tensor] | None = None

    def update(self, V: Tensor, HV: Tensor) -> None:
        """Look at a block of vectors and their products."""
        if self.done or V.shape[1] == 0:
            return
        if self.first is None:
            if V.shape[1] == 1:
                self.first = (V[:, 0].clone(), HV[:, 0].clone())
                return
            u, Hu = V[:, 0], HV[:, 0]
        else:
            u, Hu = self.first
        v, Hv = V[:, -1], HV[:, -1]
        self.done, self.first = True, None
        u, Hu, v, Hv = (t.double() for t in (u, Hu, v, Hv))
        a, b = float(u @ Hv), float(v @ Hu)
        scale = float(u.norm() * Hv.norm() + v.norm() * Hu.norm())
        denominator = abs(a) + abs(b) + self.eps**0.5 * scale
        if denominator > 0 and abs(a - b) > self.eps**0.25 * denominator:
            raise ValueError(
                f"{self.fname}: func_or_operator is not symmetric: u^T (A v) = {a:.6g} but "
                f"v^T (A u) = {b:.6g} for two of its product vectors; expected a symmetric "
                "operator such as a Hessian."
            )


@dataclass(eq=False)
class Problem:
    """One analysis in a lockstep run.

    Attributes:
        steps: The algorithm's generator.
        rows: Its rows in the operator's flat space: ``None`` for all, a ``slice`` or an
            index tensor.
        num_matvecs: Products it has used so far.
        result: Its return value, once finished.
    """

    steps: Steps
    rows: slice | Tensor | None = None
    num_matvecs: int = 0
    result: Any = None
    request: Tensor | None = field(default=None, repr=False)


def run(fname: str, operator: Any, problems: Sequence[Problem]) -> list[Any]:
    """Advance every problem's generator to its end, all together, one ``matmat`` per step.

    Args:
        fname: Public function name, for messages.
        operator: The operator (``matmat``, ``shape``, ``dtype``, ``device``), validated.
        problems: The problems; their ``result`` and ``num_matvecs`` are filled in.

    Returns:
        The problems' results, in order.

    Raises:
        ValueError: If ``matmat`` returns the wrong shape or the operator is not symmetric.
    """
    size = int(operator.shape[0])
    dtype = operator.dtype
    checks = [SymmetryCheck(fname, dtype) for _ in problems]
    for problem in problems:
        _advance(problem, None)
    active = [i for i, p in enumerate(problems) if p.request is not None]
    while active:
        requests = [problems[i].request for i in active]
        widths = [r.shape[1] for r in requests]  # type: ignore[union-attr]
        total = sum(widths)
        whole = len(active) == 1 and problems[active[0]].rows is None
        if total == 0:
            products = requests[0].new_zeros(size, 0)  # type: ignore[union-attr]
        else:
            if whole:
                stacked = requests[0]
            else:
                stacked = requests[0].new_zeros(size, total)  # type: ignore[union-attr]
                offset = 0
                for i, request, width in zip(active, requests, widths):
                    _put(stacked, problems[i].rows, offset, request)  # type: ignore[arg-type]
                    offset += width
            products = operator.matmat(stacked)
            if not isinstance(products, Tensor) or tuple(products.shape) != (size, total):
                got = tuple(products.shape) if isinstance(products, Tensor) else type(products)
                raise ValueError(
                    f"{fname}: func_or_operator.matmat returned {got} for a ({size}, {total}) "
                    f"input; expected a tensor of shape ({size}, {total})."
                )
        offset = 0
        for i, request, width in zip(active, requests, widths):
            problem = problems[i]
            block = products[:, offset : offset + width]
            if not whole:
                block = _take(block, problem.rows)
            offset += width
            problem.num_matvecs += width
            checks[i].update(request, block)  # type: ignore[arg-type]
            _advance(problem, block)
        active = [i for i in active if problems[i].request is not None]
    return [p.result for p in problems]


def _advance(problem: Problem, products: Tensor | None) -> None:
    try:
        if products is None:
            problem.request = next(problem.steps)
        else:
            problem.request = problem.steps.send(products)
    except StopIteration as stop:
        problem.request = None
        problem.result = stop.value


def _put(stacked: Tensor, rows: slice | Tensor | None, offset: int, block: Tensor) -> None:
    columns = slice(offset, offset + block.shape[1])
    if rows is None:
        stacked[:, columns] = block
    else:
        stacked[rows, columns] = block


def _take(block: Tensor, rows: slice | Tensor | None) -> Tensor:
    if rows is None:
        return block
    return block[rows]
