"""The exact answer where it is cheaper: ``method="auto"`` of the trace and diagonal estimates.

The exact diagonal costs :math:`P` unit-vector products for a closure or a plain operator;
for an operator over a model's data, the plan of the structured diagonal on the first batch
says what it costs (:func:`~torch_secorder.core.operator.planned_diagonal_costs`), often far
fewer (a ResNet's layers from two products per class). Its products count as the estimators'
do, in passes over the data. ``method="auto"`` takes the exact diagonal (its sum for a trace)
whenever that costs no more than the estimator's budget, per group for ``groups=``, and the
estimator otherwise. Planning runs one forward pass and its gradient on the first batch (about
one product's work: a percent of a budget of 100) and, unless even a plan passing every check
for free would exceed the budget, the few products of the independence checks, which the
exact diagonal then reuses. Over :mod:`torch.distributed` the plan is that of the first batch in
rank order, so every process chooses as one holding all the shards would. Later batches of
other sizes may take more products than the first (a parameter's count is the most of any
batch): the plan is the first batch's.
"""

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from torch_secorder.analysis._groups import resolve_groups
from torch_secorder.analysis._memory import check_diagonal_room
from torch_secorder.analysis._operator import Target
from torch_secorder.analysis._variables import variables_exact_or_estimate
from torch_secorder.core._model import model_params
from torch_secorder.core._variables import Variables
from torch_secorder.core.operator import (
    HessianOperator,
    exact_diagonal,
    forget_plan,
    model_operator,
    planned_diagonal_costs,
)


def auto_method(target: Target, num_matvecs: int, estimator: str) -> str:
    """``"exact"`` when the exact diagonal of ``target`` costs at most ``num_matvecs``."""
    operator = target.operator
    if not isinstance(operator, HessianOperator):
        return "exact" if target.size <= num_matvecs else estimator
    if sum(planned_diagonal_costs(operator, num_matvecs)) <= num_matvecs:
        return "exact"
    forget_plan(operator)
    return estimator


def model_exact_or_estimate(
    fname: str,
    model: Any,
    loss_fn: Any,
    data: Any,
    params: Any,
    groups: object,
    budget: float,
    options: dict[str, Any],
    exact: Callable[[list[Tensor], int], Any],
    estimate: Callable[[Any, object], Any],
) -> Any:
    """Each group's exact result where that costs at most ``budget``, else its estimate.

    Args:
        fname: Public function name, for messages.
        model: The model.
        loss_fn: The batch's mean loss.
        data: A batch or an iterable of batches.
        params: Parameter selection, or the variables of activations or inputs
            (:func:`._variables.variables_exact_or_estimate`).
        groups: Group specification (see :func:`._groups.resolve_groups`).
        budget: Products each group may take (``inf``: exact regardless).
        options: Keyword options of :meth:`HessianOperator.from_model`.
        exact: ``exact(diagonal, num_matvecs)``, a group's result from its diagonal (like its
            parameters) and the products it took.
        estimate: ``estimate(params, groups)``, the estimator's results for a selection and
            groups (``None``: the whole selection), as the model form computes them.

    Returns:
        The result, or a dict group name -> result in group order.
    """
    if isinstance(params, Variables):  # activations or inputs
        return variables_exact_or_estimate(
            fname, model, loss_fn, data, params, groups, budget, options, exact, estimate
        )
    names, tensors = model_params(fname, model, params)
    resolved = resolve_groups(fname, model, names, tensors, groups)
    members = {None: list(range(len(names)))} if resolved is None else resolved
    union = sorted({i for indices in members.values() for i in indices})
    size = sum(tensors[i].numel() for i in union)
    check_diagonal_room(math.isinf(budget), size, tensors[0].dtype, tensors[0].device)

    def operator_of(indices: list[int]) -> HessianOperator:
        selection = [names[i] for i in indices]
        return model_operator(fname, model, loss_fn, data, params=selection, **options)

    def cost(operator: HessianOperator, costs: list[int], indices: list[int]) -> int:
        """The planned products of the parameters ``indices``."""
        position = {id(p): k for k, p in enumerate(operator.params)}
        return sum(costs[position[id(tensors[i])]] for i in indices)

    # The groups that fit the budget in the plan of the selection; where that leaves some
    # out, the plan of the rest, which may cost a group more than its share of the whole
    # did (layers' products are shared): again, until every group left fits.
    selected, cheap = union, list(members)
    while cheap:
        operator = operator_of(selected)
        with operator:  # releasing it drops a plan left unused
            costs = planned_diagonal_costs(operator, budget if resolved is None else math.inf)
            cheap = [key for key in cheap if cost(operator, costs, members[key]) <= budget]
            chosen = sorted({i for key in cheap for i in members[key]})
            if cheap and chosen == selected:
                diagonal, used = exact_diagonal(operator)
                break
        selected = chosen
    results: dict[Any, Any] = {}
    if cheap:
        position = {id(p): k for k, p in enumerate(operator.params)}
        for key in cheap:
            rows = [position[id(tensors[i])] for i in members[key]]
            results[key] = exact([diagonal[r] for r in rows], sum(used[r] for r in rows))
    rest = [key for key in members if key not in results]
    if rest and resolved is None:
        results[None] = estimate(params, None)
    elif rest:
        selection = sorted({i for key in rest for i in members[key]})
        subset = {key: [names[i] for i in members[key]] for key in rest}
        results.update(estimate([names[i] for i in selection], subset))
    if resolved is None:
        return results[None]
    return {key: results[key] for key in members}
