r"""Model forms over activations and inputs: groups of variables, samples, exact where cheaper.

With ``wrt="activations"`` or ``wrt="inputs"`` a model form analyses the operator of
:meth:`HessianOperator.from_model(..., wrt=...) <torch_secorder.HessianOperator.from_model>`,
block diagonal over the batches. Its groups are sets of rows of that operator:

* ``None``: every row, the whole operator;
* ``"module"`` (activations) or ``"input"`` (inputs): one group per variable, its block in
  every batch, named by the module or input;
* a dict name -> module names or patterns: the union of those modules' blocks;
* ``"sample"``: one group per sample (keys ``0, 1, ...`` in data order), the sample's slice of
  every variable of its batch (the variables' leading dimension must count the samples). A
  sample's group is analysed on :math:`N H`, so that its block is
  :math:`n_b \nabla^2_{z_i} f_b`, the Hessian of the sample's own loss :math:`\ell_i` when the
  samples are independent (no batch statistics): the per-sample quantities do not shrink with
  the size of the data set.

Different samples of different batches are different variables, and where the checks of
:meth:`~torch_secorder.core._activations.ActivationProducts.independent_samples` prove the
blocks between samples of one batch zero, so are those: the requests of such samples go to the
operator together, one column carrying one vector of every sample (:func:`packed`), so that
all samples of the data set advance for the products of one. Otherwise samples are packed one
per batch. Each sample's result counts its own products.

``method="auto"`` (trace, diagonal estimate) takes the exact diagonal of the groups whose
planned products fit the budget (:meth:`~torch_secorder.HessianOperator.diagonal`: unit vectors
of all batches, and of all independent samples, at once) and the estimator for the others, on
the same operator.
"""

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder import _flat
from torch_secorder._checks import type_name
from torch_secorder.analysis._driver import (
    Budget,
    MakeSteps,
    Problem,
    Steps,
    budget_of,
    delivered,
    run,
    split_request,
)
from torch_secorder.analysis._memory import check_diagonal_room
from torch_secorder.analysis._sampling import make_generator, spawn
from torch_secorder.core._activations import activation_operator
from torch_secorder.core._progress import require_tqdm
from torch_secorder.core._variables import Variables, variables_of
from torch_secorder.core.operator import HessianOperator, forget_plan, planned_diagonal_costs

KINDS = {"activations": ("module", "sample"), "inputs": ("input", "sample")}
"""The group kinds of each ``wrt`` besides ``None`` and dicts (activations only)."""


def model_selection(
    fname: str, params: object, wrt: object, modules: object, groups: object
) -> Any:
    """``params`` for ``wrt="params"``, else the :class:`Variables`, with ``groups`` checked.

    Raises:
        TypeError: On arguments of the wrong kind.
        ValueError: On an unknown ``wrt``, ``params`` or ``modules`` given where they do not
            apply, or a group kind that does not apply to ``wrt``.
    """
    variables = variables_of(fname, params, wrt, modules)
    if variables is None:
        return params
    kinds = KINDS[variables.wrt]
    listed = ", ".join(repr(kind) for kind in kinds)
    also = " or a dict of name -> module names or patterns" if wrt == "activations" else ""
    if isinstance(groups, str) and groups not in kinds:
        raise ValueError(
            f"{fname}: groups must be None, {listed}{also} with wrt={wrt!r}; got {groups!r}."
        )
    if groups is not None and not isinstance(groups, str):
        if not isinstance(groups, dict) or wrt != "activations":
            raise TypeError(
                f"{fname}: groups must be None, {listed}{also} with wrt={wrt!r}; got "
                f"{type_name(groups)}."
            )
        if not groups:
            raise ValueError(f"{fname}: groups is an empty dict; expected at least one group.")
        for key, patterns in groups.items():
            entries = [patterns] if isinstance(patterns, str) else patterns
            if not isinstance(key, str):
                raise TypeError(f"{fname}: groups keys must be str; got {type_name(key)}.")
            if not isinstance(entries, (list, tuple)) or not all(
                isinstance(e, str) for e in entries
            ):
                raise TypeError(
                    f"{fname}: groups[{key!r}] must be a module name or pattern or a list of "
                    f"them; got {type_name(patterns)}."
                )
            if not entries:
                raise ValueError(f"{fname}: groups[{key!r}] is empty; expected module names.")
    return variables


@dataclass(frozen=True)
class Group:
    """Rows of the operator analysed together.

    Attributes:
        rows: ``None`` (all), a slice, or an index tensor, in flat order.
        shapes: The shapes of its variables' parts (results come in this structure).
        variables: The variables (indices within a batch) it touches.
        sample: ``(batch, index in batch)`` for a sample's group.
    """

    rows: slice | Tensor | None
    shapes: list[torch.Size]
    variables: list[int]
    sample: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return sum(s.numel() for s in self.shapes)


@dataclass(frozen=True)
class Resolved:
    """Groups of an operator's rows; sample groups see the operator times ``scale``."""

    members: dict[Any, Group]
    scale: float = 1.0
    whole: bool = False


def resolve(fname: str, operator: HessianOperator, groups: object) -> Resolved:
    """The groups of ``groups`` (checked by :func:`model_selection`) as rows of ``operator``.

    Raises:
        ValueError: If a dict entry matches no module, or ``groups="sample"`` and a
            variable's leading dimension does not count its batch's samples.
    """
    if isinstance(groups, Resolved):
        return groups
    names = operator.names or []
    blocks = _blocks(operator)
    if groups is None:
        shapes = [shape for _, _, shape in operator.variables]  # type: ignore[union-attr]
        return Resolved({None: Group(None, shapes, list(range(len(names))))}, whole=True)
    if groups == "sample":
        return _samples(fname, operator, blocks)
    if isinstance(groups, dict):
        chosen = {}
        for key, patterns in groups.items():
            entries = [patterns] if isinstance(patterns, str) else patterns
            picked: set[int] = set()
            for pattern in entries:
                matches = {v for v, name in enumerate(names) if fnmatch.fnmatchcase(name, pattern)}
                if not matches:
                    raise ValueError(
                        f"{fname}: groups[{key!r}] entry {pattern!r} matches no module of "
                        f"modules=; those are: {', '.join(names)}."
                    )
                picked |= matches
            chosen[key] = sorted(picked)
    else:
        chosen = {name: [v] for v, name in enumerate(names)}
    return Resolved(
        {
            key: Group(
                _rows([blocks[b][v] for b in range(len(blocks)) for v in members], operator),
                [blocks[b][v][2] for b in range(len(blocks)) for v in members],
                members,
            )
            for key, members in chosen.items()
        }
    )


Block = tuple[int, int, torch.Size]
"""A variable's block in one batch: its first row, its size, its shape."""


def _blocks(operator: HessianOperator) -> list[list[Block]]:
    """Per batch, per variable, where its block lies."""
    blocks: list[list[Block]] = []
    offset = 0
    for batch, _, shape in operator.variables:  # type: ignore[union-attr]
        if batch == len(blocks):
            blocks.append([])
        blocks[batch].append((offset, shape.numel(), shape))
        offset += shape.numel()
    return blocks


def _rows(parts: list[Block], operator: HessianOperator) -> slice | Tensor:
    """The rows of some blocks (or parts of blocks), in flat order: a slice if contiguous."""
    if all(a[0] + a[1] == b[0] for a, b in zip(parts, parts[1:])):
        return slice(parts[0][0], parts[-1][0] + parts[-1][1])
    return torch.cat([torch.arange(s, s + n, device=operator.device) for s, n, _ in parts])


def _samples(fname: str, operator: HessianOperator, blocks: list[list[Block]]) -> Resolved:
    names = operator.names or []
    members: dict[Any, Group] = {}
    for b, batch in enumerate(blocks):
        n = operator._source.sizes[b]
        for (_, _, shape), name in zip(batch, names):
            if not shape or shape[0] != n:
                raise ValueError(
                    f"{fname}: groups='sample' needs each variable's leading dimension to count "
                    f"the samples, but {name!r} has shape {tuple(shape)} in data batch {b} of "
                    f"{n} samples."
                )
        for i in range(n):
            parts = [
                (start + i * (size // n), size // n, shape[1:]) for start, size, shape in batch
            ]
            shapes = [shape for _, _, shape in parts]
            every = list(range(len(names)))
            members[len(members)] = Group(_rows(parts, operator), shapes, every, (b, i))
    return Resolved(members, scale=float(operator.num_samples), whole=False)  # type: ignore[arg-type]


class _Scaled:
    """An operator times a constant (``matmat``, ``shape``, ``dtype``, ``device``)."""

    def __init__(self, operator: HessianOperator, factor: float) -> None:
        self.operator, self.factor = operator, factor
        self.shape, self.dtype, self.device = operator.shape, operator.dtype, operator.device

    def matmat(self, V: Tensor) -> Tensor:
        return self.operator.matmat(V).mul_(self.factor)


def packed(steps: list[Steps], rows: list[slice | Tensor], size: int) -> Steps:
    """Run algorithms on disjoint rows with zero blocks between them, as one.

    Each step puts every algorithm's request on its own rows of one ``(size, j)`` block
    (``j`` the widest request), whose products with a block-diagonal operator restrict to each
    algorithm's rows as products with its own block. Returns each algorithm's result and
    its products, in order.
    """
    requests: dict[int, tuple[Tensor, Tensor | None]] = {}
    results: list[Any] = [None] * len(steps)
    counts = [0] * len(steps)

    def advance(i: int, products: Tensor | None) -> None:
        try:
            request = next(steps[i]) if products is None else steps[i].send(products)
            requests[i] = split_request(request)
        except StopIteration as stop:
            requests.pop(i, None)
            results[i] = stop.value

    for i in range(len(steps)):
        advance(i, None)
    while requests:
        first = next(iter(requests.values()))[0]
        width = max(V.shape[1] for V, _ in requests.values())
        block = first.new_zeros(size, width)
        for i, (V, _) in requests.items():
            block[rows[i], : V.shape[1]] = V
        products = yield block
        del block
        for i, (V, out) in list(requests.items()):
            counts[i] += V.shape[1]
            advance(i, delivered(products[rows[i], : V.shape[1]], out))
        del products
    return list(zip(results, counts))


def _packed_budget(budget: Budget, sizes: list[int]) -> int | None:
    """The budget of algorithms run as one (:func:`packed`): the largest of theirs."""
    budgets = [budget_of(budget, n) for n in sizes]
    return None if None in budgets else max(budgets)  # type: ignore[type-var]


@contextlib.contextmanager
def _opened(
    fname: str, model: Any, loss_fn: Any, data: Any, variables: Variables, options: dict[str, Any]
) -> Iterator[HessianOperator]:
    """The variables' operator: the one given (left open), or a new one released after."""
    if variables.operator is not None:
        yield variables.operator
        return
    quiet = {**options, "progress": False}
    operator = activation_operator(
        fname, model, loss_fn, data, variables, quiet["seed"], quiet["distributed"], False
    )
    with operator:
        yield operator


def _no_gradient() -> None:
    """Activations and inputs start their eigen-solvers at random (no parameter gradient)."""


def run_variables(
    fname: str,
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    variables: Variables,
    groups: object,
    generator: torch.Generator | None,
    make_steps: MakeSteps,
    finish: Callable[[Any, int, list[Tensor]], Any],
    options: dict[str, Any],
    budget: Budget = None,
    certain: bool = True,
) -> Any:
    """:func:`._groups.run_model` for activations and inputs (see the module docstring)."""
    progress = options.get("progress", False)
    if progress:
        require_tqdm(fname)
    with _opened(fname, model, loss_fn, data, variables, options) as operator:
        resolved = resolve(fname, operator, groups)
        dtype, device, size = operator.dtype, operator.device, operator.shape[0]
        base = make_generator(generator)
        whole = resolved.whole
        gens = [base] if whole else spawn(base, len(resolved.members))
        groups_ = list(resolved.members.values())
        steps = [
            make_steps(g.size, dtype, device, gen, size, _no_gradient, None if whole else key)
            for (key, g), gen in zip(resolved.members.items(), gens)
        ]
        target = operator if resolved.scale == 1 else _Scaled(operator, resolved.scale)
        if resolved.scale != 1:  # samples: packed where their blocks are decoupled
            slots = _slots(operator, groups_)
            problems = [
                Problem(
                    packed([steps[i] for i in slot], [groups_[i].rows for i in slot], size),  # type: ignore[misc]
                    None,
                    _packed_budget(budget, [groups_[i].size for i in slot]),
                    certain,
                )
                for slot in slots
            ]
            run(fname, target, problems, progress=progress)
            outcome: list[Any] = [None] * len(groups_)
            for slot, problem in zip(slots, problems):
                for i, pair in zip(slot, problem.result):
                    outcome[i] = pair
        else:
            problems = [
                Problem(s, None if resolved.whole else g.rows, budget_of(budget, g.size), certain)
                for s, g in zip(steps, groups_)
            ]
            run(fname, target, problems, progress=progress)
            outcome = [(p.result, p.num_matvecs) for p in problems]
    results = {
        key: finish(result, used, _like(group.shapes, dtype))
        for (key, group), (result, used) in zip(resolved.members.items(), outcome)
    }
    return results[None] if groups is None else results


def _slots(operator: HessianOperator, groups: list[Group]) -> list[list[int]]:
    """Samples whose requests may share columns, in slots of positions in ``groups``.

    All of them where the samples are proven independent, else one per batch (the ``j``-th
    sample of every batch).
    """
    independent, _ = operator._source.independent_samples()
    if independent:
        return [list(range(len(groups)))]
    slots: dict[int, list[int]] = {}
    for i, group in enumerate(groups):
        slots.setdefault(group.sample[1], []).append(i)  # type: ignore[index]
    return list(slots.values())


def _like(shapes: list[torch.Size], dtype: torch.dtype) -> list[Tensor]:
    """Tensors (without storage) of the given shapes, to structure results like them."""
    return [torch.empty(shape, dtype=dtype, device="meta") for shape in shapes]


def exact_groups(
    operator: HessianOperator, members: dict[Any, list[int]], budget: float, planning: float
) -> tuple[list[Any], list[int], list[int]]:
    """The groups of variables whose exact diagonal fits ``budget``, as ``method="auto"`` takes.

    A batch's checks count for the first variable of the diagonal taken, so a plan of fewer
    variables may cost a group more than its share of the plan of all: planned again for the
    groups that fit until all of them do. The plan of the last is kept for the diagonal.

    Args:
        operator: An operator over activations or inputs.
        members: Group key -> the indices of its variables.
        budget: Products a group's share of the diagonal may take.
        planning: ``budget`` of :meth:`plan_diagonal` (checks run only where they can help).

    Returns:
        The keys of the groups that fit, in order, the variables of their diagonal, and the
        products per variable in the last plan.
    """
    costs = planned_diagonal_costs(operator, planning)

    def within(keys: list[Any]) -> list[Any]:
        return [key for key in keys if sum(costs[v] for v in members[key]) <= budget]

    cheap, needed = within(list(members)), []
    while cheap:
        needed = sorted({v for key in cheap for v in members[key]})
        costs = operator._source.plan_diagonal(planning, needed)
        fitting = within(cheap)
        if fitting == cheap:
            break
        cheap = fitting
    return cheap, needed, costs


def variables_exact_or_estimate(
    fname: str,
    model: Any,
    loss_fn: Any,
    data: Any,
    variables: Variables,
    groups: object,
    budget: float,
    options: dict[str, Any],
    exact: Callable[[list[Tensor], int], Any],
    estimate: Callable[[Any, object], Any],
) -> Any:
    """:func:`._exact.model_exact_or_estimate` for activations and inputs.

    Each group whose variables' planned diagonal products fit ``budget`` is exact (all from
    one diagonal of those variables); the others are estimated on the same operator.
    """
    with _opened(fname, model, loss_fn, data, variables, options) as operator:
        resolved = resolve(fname, operator, groups)
        size, dtype, device = operator.shape[0], operator.dtype, operator.device
        check_diagonal_room(math.isinf(budget), size, dtype, device)
        planning = budget if groups is None and math.isfinite(budget) else math.inf
        members = {key: group.variables for key, group in resolved.members.items()}
        cheap, needed, _ = exact_groups(operator, members, budget, planning)
        results: dict[Any, Any] = {}
        if cheap:
            (diagonal,), used = operator._source.diagonal(needed)
            operator.num_matvecs += sum(used)
            diagonal = diagonal * resolved.scale if resolved.scale != 1 else diagonal
            for key in cheap:
                group = resolved.members[key]
                values = diagonal if group.rows is None else diagonal[group.rows]
                parts = _flat.split(values, _like(group.shapes, operator.dtype))
                results[key] = exact(parts, sum(used[v] for v in group.variables))
        else:
            forget_plan(operator)
        rest = {key: group for key, group in resolved.members.items() if key not in results}
        if rest:
            subset = Resolved(rest, resolved.scale, resolved.whole)
            results.update(estimate(Variables(variables.wrt, variables.modules, operator), subset))
    if groups is None:
        return results[None]
    return {key: results[key] for key in resolved.members}
