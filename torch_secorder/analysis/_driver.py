r"""Run any number of analyses in lockstep over one operator, in memory-bounded products.

Every algorithm is written as a generator that yields a block of vectors ``V`` of shape
``(n, j)`` (``n`` the size of its problem) and receives the products ``HV = yield V``; its
return value is its result. :func:`run` advances several such generators together: each step
it collects all their requests and multiplies them with the operator, restricts the products
back to each problem's rows (so a problem on rows :math:`g` sees the diagonal block
:math:`H_{gg}`), and counts each problem's products. A single analysis is the same driver with
one problem.

The operator multiplies full-length columns, so a problem's vectors are zero-padded outside
its rows, but only a chunk at a time: the step's columns (all problems' requests side by
side) are cut into consecutive chunks of at most :func:`max_columns` columns of the
operator's size (:data:`._memory.BLOCK_BYTES`, or a sixteenth of the analysis's memory
budget), each chunk padded, multiplied with one ``matmat`` and scattered back to each
problem at the problem's own size. Requests and products are never held at full length for
more than one chunk, so problems over blocks of one operator take the memory of one problem
over all of it plus one chunk (the algorithms size what they hold, such as chunks of probes
or Lanczos bases, by the operator's size, their ``span``, not by their block's); a
whole-operator request that fits one chunk goes to ``matmat`` unchanged. Over a data set
every ``matmat`` is one pass over the data; a step takes as many passes as it has chunks, a
rule of sizes only (results are reproducible bitwise). Where the operator ``keeps_graph``
(its products cost the same in one ``matmat`` or in several: a closure, or one batch), a
chunk is also no wider than the widest request, or :data:`LOCKSTEP_COLUMNS` columns: its
padded columns then take about what one problem over the whole operator would send.

Cost: a product of a problem on rows :math:`g` is a full product with the operator, whatever
the size of :math:`g`, so :math:`G` problems of :math:`s` products each cost :math:`G s`
products, as :math:`G` analyses one after another would; what running them together saves is
passes over the data (one per chunk of a step instead of one per problem and step) and what
the lockstep bounds is memory.

Along the way each problem's first two product vectors :math:`u, v` test symmetry for free:
:math:`u^\top(Hv)` must equal :math:`v^\top(Hu)` up to rounding.
"""

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from torch_secorder.analysis._memory import max_columns
from torch_secorder.analysis._rows import inner_rows
from torch_secorder.core._progress import Meter
from torch_secorder.core.operator import HessianOperator

LOCKSTEP_COLUMNS = 8
"""Columns a chunk of an operator that ``keeps_graph`` may have however narrow the requests."""

Request = Tensor | tuple[Tensor, Tensor]
"""What an algorithm yields: an ``(n, j)`` block of vectors ``V``, or ``(V, out)`` with ``out``
an ``(n, j)`` tensor of contiguous columns (the transpose of rows the algorithm keeps) not
overlapping ``V``: the products are then written there (by a
:class:`~torch_secorder.HessianOperator` itself, copied from other operators), and the
algorithm receives ``out``. Memory written again costs nothing to touch first, where new
memory of a product's size costs about a fifth of a ResNet-18's product on a CPU."""

Steps = Generator[Request, Tensor, Any]
"""An algorithm: yields requests (blocks of vectors), receives their products, returns a result."""

MakeSteps = Callable[
    [int, torch.dtype, torch.device, torch.Generator, int, Callable[[], Tensor | None], Any],
    Steps,
]
"""``make_steps(n, dtype, device, generator, span, gradient, group)``: an algorithm for a block
of size ``n`` of an operator of size ``span``, ``gradient()`` the block's loss gradient or
``None``, ``group`` the block's group name (``None`` for the whole operator), for messages
(:func:`._groups.run_model`)."""

Budget = int | Callable[[int], int] | None
"""Products a problem may use at most: a number, a function of the problem's size ``n``
(an algorithm whose default budget grows or shrinks with it), or ``None`` where unknown."""


def budget_of(budget: Budget, n: int) -> int | None:
    """The budget of a problem of size ``n``."""
    return budget(n) if callable(budget) else budget


def split_request(request: Request) -> tuple[Tensor, Tensor | None]:
    """``(V, out)`` of a request (``out`` ``None`` where it names none)."""
    return request if isinstance(request, tuple) else (request, None)


def delivered(products: Tensor, out: Tensor | None) -> Tensor:
    """The products as the algorithm receives them: in ``out``, where it gave one."""
    if out is None or products.data_ptr() == out.data_ptr():
        return products
    return out.copy_(products)


def chunk_widths(total: int, cap: int) -> list[int]:
    """Split ``total`` columns into the fewest chunks of at most ``cap``, as even as possible.

    Example:
        >>> chunk_widths(50, 24), chunk_widths(24, 24), chunk_widths(0, 24)
        ([17, 17, 16], [24], [])
    """
    count = -(-total // cap)
    return [total // count + (i < total % count) for i in range(count)] if count else []


class SymmetryCheck:
    r"""Compare :math:`u^\top(Hv)` with :math:`v^\top(Hu)` for the first two product vectors.

    The relative difference :math:`|a - b| / (|a| + |b| + 2\sqrt{\varepsilon}\,R\,\|u\|\|v\|)`
    must stay below :math:`\varepsilon^{1/4}` (:math:`\varepsilon` the dtype's machine epsilon,
    about :math:`10^{-4}` in float64 and :math:`2 \cdot 10^{-2}` in float32), the sums in float64
    (:func:`~._rows.inner_rows`: no float64 copies of the four vectors). :math:`R`, the
    largest :math:`\|Hx\|/\|x\|` any problem of the run has seen (:attr:`reach`; the
    problems of one run share the operator), guards products that vanish: a group's block that
    is zero up to rounding (a bias before a BatchNorm in training mode) has products of
    rounding noise, as asymmetric as they are small, and passes the test beside groups of
    larger curvature. :meth:`update` measures, :meth:`judge` decides once the run's other
    problems have measured too. The test is skipped for half precisions, whose rounding is
    too coarse for it. A first product that is not finite (a NaN loss) is refused at once.
    """

    def __init__(self, fname: str, dtype: torch.dtype) -> None:
        self.fname = fname
        self.eps = torch.finfo(dtype).eps
        self.done = self.eps > 1e-4
        self.first: tuple[Tensor, Tensor] | None = None
        self.reach = 0.0
        self.measured: tuple[float, float, float] | None = None  # a, b and |u| |v|

    def update(self, V: Tensor, HV: Tensor) -> None:
        """Look at a block of vectors and their products."""
        if self.done or V.shape[1] == 0:
            return
        if self.first is None:
            if not bool(torch.isfinite(HV[:, 0]).all()):
                raise ValueError(
                    f"{self.fname}: the operator's products are not finite (NaN or infinite "
                    "entries): so is the loss or its gradient; check the data, the model and "
                    "the loss for NaN and inf."
                )
            if V.shape[1] == 1:
                self.first = (V[:, 0].clone(), HV[:, 0].clone())
                return
            u, Hu = V[:, 0], HV[:, 0]
        else:
            u, Hu = self.first
        v, Hv = V[:, -1], HV[:, -1]
        self.done, self.first = True, None
        u, Hu, v, Hv = (t[None] for t in (u, Hu, v, Hv))
        a, b = float(inner_rows(u, Hv)), float(inner_rows(v, Hu))
        norms = [float(inner_rows(x, x)) ** 0.5 for x in (u, Hu, v, Hv)]
        for x, Hx in (norms[:2], norms[2:]):
            if x > 0:
                self.reach = max(self.reach, Hx / x)
        self.measured = (a, b, norms[0] * norms[2])

    def judge(self, reach: float) -> None:
        """Decide on the measured pair, ``reach`` the largest of the run's problems.

        Raises:
            ValueError: If the operator is not symmetric.
        """
        if self.measured is None:
            return
        (a, b, size), self.measured = self.measured, None
        denominator = abs(a) + abs(b) + 2 * self.eps**0.5 * max(reach, self.reach) * size
        if denominator > 0 and abs(a - b) > self.eps**0.25 * denominator:
            raise ValueError(
                f"{self.fname}: the operator is not symmetric: u^T (A v) = {a:.6g} but "
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
        budget: Products it may use at most, where known (for progress and cost warnings).
        certain: Whether it uses about its budget (an estimator), or may stop far short of it
            (an eigen-solver): only the first warn of their cost.
        num_matvecs: Products it has used so far.
        result: Its return value, once finished.
        request: The vectors it asks to multiply next (``None`` once finished).
        out: Where it asks for their products (``None``: new memory).
    """

    steps: Steps
    rows: slice | Tensor | None = None
    budget: int | None = None
    certain: bool = True
    num_matvecs: int = 0
    result: Any = None
    request: Tensor | None = field(default=None, repr=False)
    out: Tensor | None = field(default=None, repr=False)


def run(
    fname: str, operator: Any, problems: Sequence[Problem], *, progress: bool = False
) -> list[Any]:
    """Advance every problem's generator to its end, all together, in memory-bounded products.

    Each step multiplies the requests of all active problems, in chunks of at most
    :func:`max_columns` full-length columns (one ``matmat`` per chunk); see the module
    docstring. With the problems' budgets known, a :class:`~torch_secorder.core._progress.Meter`
    counts the products against them: a progress bar with the time left (``progress``), and a
    warning when the first products show that the whole will take long.

    Args:
        fname: Public function name, for messages.
        operator: The operator (``matmat``, ``shape``, ``dtype``, ``device``), validated.
        problems: The problems; their ``result`` and ``num_matvecs`` are filled in.
        progress: Show a progress bar over the products (needs ``tqdm``).

    Returns:
        The problems' results, in order.

    Raises:
        ValueError: If ``matmat`` returns the wrong shape or the operator is not symmetric.
    """
    budgets = [p.budget for p in problems]
    total = sum(budgets) if all(b is not None for b in budgets) else 0  # type: ignore[arg-type]
    hint = "A smaller budget, or a parameter subset (params=), takes fewer products."
    certain = all(p.certain for p in problems)
    meter = Meter(fname, total, progress and bool(total), "analysis", hint, certain=certain)
    with meter:
        return _run(fname, operator, problems, meter if total else None)


def _run(fname: str, operator: Any, problems: Sequence[Problem], meter: Meter | None) -> list[Any]:
    size = int(operator.shape[0])
    cap = max_columns(size, operator.dtype, operator.device)
    narrow = bool(getattr(operator, "keeps_graph", False))
    checks = [SymmetryCheck(fname, operator.dtype) for _ in problems]
    for problem in problems:
        _advance(problem, None)
    active = [i for i, p in enumerate(problems) if p.request is not None]
    while active:
        rows = [problems[i].rows for i in active]
        requests: list[Tensor] = [problems[i].request for i in active]  # type: ignore[misc]
        products: list[Tensor | None] = [problems[i].out for i in active]
        widths = [r.shape[1] for r in requests]
        # (as wide as one request of a problem over the whole operator would be)
        width = min(cap, max(LOCKSTEP_COLUMNS, *widths)) if narrow else cap
        for chunk in _pieces(widths, width):
            _multiply(fname, operator, size, rows, requests, products, chunk)
            if meter is not None:
                meter.update(sum(piece[2] for piece in chunk))
        held: list[tuple[Tensor, Tensor] | None] = [
            (r, r.new_empty(r.shape) if p is None else p)  # (None: a request of no columns)
            for r, p in zip(requests, products)
        ]
        del requests, products
        for position, i in enumerate(active):
            # Hold no reference to a request while its algorithm computes the next one, so
            # that the algorithm can free it (products stay referenced during the send).
            request, block = held[position]  # type: ignore[misc]
            held[position] = None
            problems[i].request = problems[i].out = None
            problems[i].num_matvecs += request.shape[1]
            checks[i].update(request, block)
            del request
            _advance(problems[i], block)
            del block
        reach = max(check.reach for check in checks)
        for check in checks:
            check.judge(reach)
        active = [i for i in active if problems[i].request is not None]
    return [p.result for p in problems]


Piece = tuple[int, int, int, int]
"""Part of a chunk: ``(problem, first column of its request, width, column in the chunk)``."""


def _pieces(widths: list[int], cap: int) -> list[list[Piece]]:
    """Cut the requests' columns, side by side, into chunks (see :func:`chunk_widths`)."""
    chunks: list[list[Piece]] = []
    problem, column = 0, 0
    for width in chunk_widths(sum(widths), cap):
        chunk: list[Piece] = []
        filled = 0
        while filled < width:
            while column == widths[problem]:
                problem, column = problem + 1, 0
            take = min(width - filled, widths[problem] - column)
            chunk.append((problem, column, take, filled))
            column += take
            filled += take
        chunks.append(chunk)
    return chunks


def _multiply(
    fname: str,
    operator: Any,
    size: int,
    rows: list[slice | Tensor | None],
    requests: list[Tensor],
    products: list[Tensor | None],
    chunk: list[Piece],
) -> None:
    """One ``matmat`` of a chunk: pad its pieces to full length, scatter the products back.

    ``products`` holds each request's ``out`` (or ``None``) on entry. A whole-operator
    request goes to the operator as it is, and a :class:`~torch_secorder.HessianOperator`
    writes its products into its ``out`` directly. A whole-operator request multiplied whole
    without an ``out`` receives the operator's result itself where that is a tensor of its
    own, contiguous or the transpose of a contiguous one (an operator that writes its
    products as rows: no transposing copy of the products per step, which on a ResNet-18 took
    as long as the product of four columns); every other product is gathered into its
    ``out`` or memory of its problem's size.
    """
    width = sum(piece[2] for piece in chunk)
    first, start, _, _ = chunk[0]
    target = None
    if len(chunk) == 1 and rows[first] is None:
        padded = requests[first][:, start : start + width]  # a whole-operator request: as is
        if width == requests[first].shape[1]:
            padded = requests[first]
        out = products[first]
        if out is not None and isinstance(operator, HessianOperator):
            target = out[:, start : start + width]
    else:
        padded = requests[first].new_zeros(size, width)
        for index, begin, count, at in chunk:
            block = requests[index][:, begin : begin + count]
            _put(padded, rows[index], at, block)
    result = operator.matmat(padded) if target is None else operator.matmat(padded, out=target)
    if result is target:
        return
    whole = padded is requests[first] and products[first] is None
    del padded
    if not isinstance(result, Tensor) or tuple(result.shape) != (size, width):
        got = tuple(result.shape) if isinstance(result, Tensor) else type(result)
        raise ValueError(
            f"{fname}: func_or_operator.matmat returned {got} for a ({size}, {width}) "
            f"input; expected a tensor of shape ({size}, {width})."
        )
    request = requests[first]
    if (
        whole
        and (result.is_contiguous() or result.T.is_contiguous())
        and (result.dtype, result.device) == (request.dtype, request.device)
        and result.untyped_storage().data_ptr() != request.untyped_storage().data_ptr()
    ):
        products[first] = result
        return
    for index, begin, count, at in chunk:
        product = products[index]
        if product is None:  # (contiguous columns: the next chunk's out, for a HessianOperator)
            length, columns = requests[index].shape
            product = products[index] = requests[index].new_empty(columns, length).T
        product[:, begin : begin + count] = _take(result[:, at : at + count], rows[index])


def _advance(problem: Problem, products: Tensor | None) -> None:
    try:
        request = next(problem.steps) if products is None else problem.steps.send(products)
        problem.request, problem.out = split_request(request)
    except StopIteration as stop:
        problem.request = problem.out = None
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
