"""Model forms: per-layer groups of parameters, all analysed together over one operator.

A model form builds one :class:`~torch_secorder.core.operator.HessianOperator` over the
parameters of all groups and runs one problem per group through :func:`._driver.run`: every
step multiplies the groups' vectors, zero-padded outside each group's rows in memory-bounded
chunks of columns, with the operator over the data; each group sees its own diagonal block
:math:`H_{gg}`. Each group's vectors are held at the group's size, so all groups together
hold what one analysis of the whole selection would, plus one chunk.

Names: a module group is named by :meth:`~torch.nn.Module.named_modules` (``"body.0"``), and
the parameters the model itself owns form the group ``""``, the model's own name there. A
parameter shared by several modules (tied weights) is selected, grouped and reported once,
under its first name in :meth:`~torch.nn.Module.named_parameters` and in the group of the
first module owning it, as :func:`~torch_secorder.select_params` does.
"""

import fnmatch
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder._checks import check_bool
from torch_secorder.analysis._driver import Budget, MakeSteps, Problem, budget_of, run
from torch_secorder.analysis._sampling import make_generator, spawn
from torch_secorder.analysis._variables import run_variables
from torch_secorder.core._model import model_params
from torch_secorder.core._progress import require_tqdm
from torch_secorder.core._variables import Variables
from torch_secorder.core.operator import HessianOperator, kept_gradient, model_operator
from torch_secorder.core.params import shared_names

GROUP_KINDS = ("module", "parameter")


def resolve_groups(
    fname: str, model: nn.Module, names: list[str], tensors: list[Tensor], groups: object
) -> dict[str, list[int]] | None:
    """Map group names to indices into the selected parameters (model order).

    Args:
        fname: Public function name, for messages.
        model: The model.
        names: Names of the selected parameters, in model order.
        tensors: The selected parameters.
        groups: ``None``, ``"module"``, ``"parameter"`` or a dict name -> names/patterns.

    Returns:
        ``None`` for ``groups=None``, else the groups in order, each a sorted index list.

    Raises:
        TypeError: If ``groups`` is of the wrong kind.
        ValueError: If ``groups`` is an unknown string, an empty dict, or a group or pattern
            matches no selected parameter.
    """
    if groups is None:
        return None
    if isinstance(groups, str):
        if groups not in GROUP_KINDS:
            raise ValueError(
                f"{fname}: groups must be None, 'module', 'parameter' or a dict of name -> "
                f"parameter names or patterns; got {groups!r}."
            )
        if groups == "parameter":
            return {name: [i] for i, name in enumerate(names)}
        return module_groups(model, tensors)
    if not isinstance(groups, dict):
        raise TypeError(
            f"{fname}: groups must be None, 'module', 'parameter' or a dict of name -> "
            f"parameter names or patterns; got {type(groups).__name__}."
        )
    if not groups:
        raise ValueError(f"{fname}: groups is an empty dict; expected at least one group.")
    resolved = {}
    for key, patterns in groups.items():
        if not isinstance(key, str):
            raise TypeError(f"{fname}: groups keys must be str; got {type(key).__name__}.")
        entries = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(entries, (list, tuple)) or not all(isinstance(e, str) for e in entries):
            raise TypeError(
                f"{fname}: groups[{key!r}] must be a parameter name or pattern or a list of "
                f"them; got {type(patterns).__name__}."
            )
        if not entries:
            raise ValueError(f"{fname}: groups[{key!r}] is empty; expected names or patterns.")
        chosen: set[int] = set()
        for pattern in entries:
            matches = {i for i, name in enumerate(names) if fnmatch.fnmatchcase(name, pattern)}
            if not matches:
                raise ValueError(
                    f"{fname}: groups[{key!r}] entry {pattern!r} matches no selected parameter; "
                    f"{_tied_hint(model, pattern)}the selected parameters are: {_listing(names)}."
                )
            chosen |= matches
        resolved[key] = sorted(chosen)
    return resolved


def _tied_hint(model: nn.Module, pattern: str) -> str:
    """Where ``pattern`` names only second names of shared parameters, say under which name."""
    tied = shared_names(model, pattern)
    if not tied:
        return ""
    name, shared = tied[0]
    return (
        f"{name!r} is a parameter shared with {shared!r}, the name it is selected and grouped "
        "under; "
    )


def module_groups(model: nn.Module, tensors: list[Tensor]) -> dict[str, list[int]]:
    """One group per module owning selected parameters directly, by qualified module name.

    A shared parameter belongs to the first module owning it; the model's own parameters form
    the group ``""`` (its module name).
    """
    position = {id(t): i for i, t in enumerate(tensors)}
    seen: set[int] = set()
    grouped: dict[str, list[int]] = {}
    for qualname, module in model.named_modules():
        own = []
        for p in module.parameters(recurse=False):
            if id(p) in position and id(p) not in seen:
                seen.add(id(p))
                own.append(position[id(p)])
        if own:
            grouped[qualname] = sorted(own)
    return grouped


def _listing(names: list[str]) -> str:
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def rows_of(indices: list[int], sizes: list[int], device: torch.device) -> slice | Tensor:
    """Flat rows of the parameters ``indices``: a slice when contiguous, else an index tensor."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    if indices == list(range(indices[0], indices[-1] + 1)):
        return slice(offsets[indices[0]], offsets[indices[-1] + 1])
    return torch.cat([torch.arange(offsets[i], offsets[i + 1], device=device) for i in indices])


def run_model(
    fname: str,
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    params: Any,
    groups: object,
    generator: torch.Generator | None,
    make_steps: MakeSteps,
    finish: Callable[[Any, int, list[Tensor]], Any],
    options: dict[str, Any],
    budget: Budget = None,
    certain: bool = True,
) -> Any:
    """Run one problem per group (or one for the whole selection) over the data's Hessian.

    Args:
        fname: Public function name, for messages.
        model: The model.
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        data: One ``(inputs, targets)`` batch or an iterable of batches.
        params: Parameter selection (``None``: all trainable), or the
            :class:`~torch_secorder.core._activations.Variables` of activations or inputs
            (:func:`._variables.run_variables`).
        groups: Group specification (see :func:`resolve_groups`).
        generator: The caller's generator or ``None``; with groups, each group draws from its
            own generator derived from it in group order.
        make_steps: ``make_steps(n, dtype, device, generator, span, gradient, group)``, the
            algorithm for a block of size ``n`` of an operator of size ``span``, which sizes
            its memory (chunks of probes, bases held at once) for ``span`` so that all groups
            together hold what one analysis of the whole operator would; ``gradient()`` gives
            the block's rows of the loss gradient where the operator keeps it
            (:func:`~torch_secorder.core.operator.kept_gradient`), else ``None``; ``group``
            names the group in messages (``None`` for the whole selection).
        finish: ``finish(raw_result, num_matvecs, group_params)``, the public result.
        options: Keyword options of :meth:`HessianOperator.from_model` (``seed``,
            ``distributed``), and ``progress`` for a bar over the analysis's products.
        budget: Products each group's algorithm may use at most, where known (a function of
            the group's size where that decides it).
        certain: Whether the algorithms use about their budget (not an eigen-solver's cap).

    Returns:
        The result, or a dict group name -> result when ``groups`` is given.
    """
    if isinstance(params, Variables):  # activations or inputs
        return run_variables(
            fname,
            model,
            loss_fn,
            data,
            params,
            groups,
            generator,
            make_steps,
            finish,
            options,
            budget,
            certain,
        )
    names, tensors = model_params(fname, model, params)
    resolved = resolve_groups(fname, model, names, tensors, groups)
    union = (
        list(range(len(names)))
        if resolved is None
        else sorted({i for indices in resolved.values() for i in indices})
    )
    selection = params if resolved is None else [names[i] for i in union]
    raw, members, problems, operator = _run_groups(
        fname,
        model,
        loss_fn,
        data,
        selection,
        resolved,
        tensors,
        generator,
        make_steps,
        options,
        budget,
        certain,
    )
    results = {
        key: finish(result, problem.num_matvecs, [operator.params[i] for i in indices])
        for (key, indices), result, problem in zip(members.items(), raw, problems)
    }
    return results[None] if resolved is None else results


def _run_groups(
    fname: str,
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    selection: Any,
    resolved: dict[str, list[int]] | None,
    tensors: list[Tensor],
    generator: torch.Generator | None,
    make_steps: MakeSteps,
    options: dict[str, Any],
    budget: Budget,
    certain: bool,
) -> tuple[list[Any], dict[Any, list[int]], list[Problem], HessianOperator]:
    progress = options.get("progress", False)
    check_bool(fname, "progress", progress)
    if progress:
        require_tqdm(fname)
    quiet = {**options, "progress": False}  # the bar counts the analysis's products instead
    operator = model_operator(fname, model, loss_fn, data, params=selection, **quiet)
    with operator:
        position = {id(p): i for i, p in enumerate(operator.params)}
        members: dict[Any, list[int]]
        if resolved is None:
            members = {None: list(range(len(operator.params)))}
        else:
            members = {
                key: sorted(position[id(tensors[i])] for i in indices)
                for key, indices in resolved.items()
            }
        sizes = [p.numel() for p in operator.params]
        problems = group_problems(
            operator,
            sizes,
            members,
            generator,
            make_steps,
            whole=resolved is None,
            budget=budget,
            certain=certain,
        )
        raw = run(fname, operator, problems, progress=progress)
    return raw, members, problems, operator


def group_problems(
    operator: Any,
    sizes: list[int],
    members: dict[Any, list[int]],
    generator: torch.Generator | None,
    make_steps: MakeSteps,
    *,
    whole: bool = False,
    budget: Budget = None,
    certain: bool = True,
    gradient: Callable[[], Tensor | None] | None = None,
) -> list[Problem]:
    """One problem per group of an operator's parameters, for :func:`._driver.run`.

    Args:
        operator: The operator over all groups' parameters.
        sizes: Sizes of the operator's parameters, in flat order.
        members: Group name -> sorted indices into the operator's parameters.
        generator: The caller's generator or ``None``; each group draws from its own
            generator derived from it in group order (unless ``whole``).
        make_steps: As for :func:`run_model`.
        whole: A single group spanning the whole operator (it uses ``generator`` itself).
        budget: Products each problem may use at most, where known (as for
            :func:`run_model`).
        certain: Whether the problems use about their budget.
        gradient: Gives the operator's flat loss gradient or ``None`` (default:
            :func:`~torch_secorder.core.operator.kept_gradient` of ``operator``); asked once,
            by the first group that wants its rows.

    Returns:
        The problems, in group order.
    """
    base = make_generator(generator)
    generators = [base] if whole else spawn(base, len(members))
    whole_gradient = functools.cache(gradient or (lambda: kept_gradient(operator)))

    def block(rows: slice | Tensor | None) -> Tensor | None:
        full = whole_gradient()
        return full if full is None or rows is None else full[rows]

    problems = []
    for (name, indices), gen in zip(members.items(), generators):
        rows = None if whole else rows_of(indices, sizes, operator.device)
        count = sum(sizes[i] for i in indices)
        steps = make_steps(
            count,
            operator.dtype,
            operator.device,
            gen,
            operator.shape[0],
            lambda rows=rows: block(rows),
            None if whole else name,
        )
        problems.append(Problem(steps, rows, budget_of(budget, count), certain))
    return problems
