"""The Hessian report: a plan, then top eigenvalues, trace, spectral density and per-layer tables.

:func:`make_plan` counts the Hessian-vector products of every stage before any work, pricing
the traces with Hutch++; :func:`hessian_report` times one product, plans the exact diagonal on
the first batch (:func:`price_plan`: the traces whose exact value costs no more than their
budget become sums of the exact diagonal, computed once for all of them), prints the plan with
each stage's method, products and estimated time, runs the stages over one
:class:`~torch_secorder.HessianOperator` with a progress bar per stage, and writes
``report.md`` and ``report.json`` (and ``density.png``) after every stage, so that a failure or
an interruption in a later stage keeps what the earlier ones found.

On request (``activations=`` of :func:`make_plan`) two more stages make a table of the Hessian
with respect to chosen modules' outputs: each module's trace, exact where the planned diagonal
of its output fits the module budget (as ``method="auto"`` chooses), and its top eigenvalue,
as :func:`~torch_secorder.model_hessian_trace` and :func:`~torch_secorder.model_top_eigenvalues`
compute them with ``wrt="activations", groups="module"``, over one activation operator
(:func:`activation_table_operator`, timed and planned before the stages as well).
"""

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder._report_markdown import ROOT, duration, markdown, one_line
from torch_secorder.analysis import (
    hessian_trace,
    plot_spectral_density,
    spectral_density,
    top_eigenvalues,
)
from torch_secorder.analysis._driver import Problem, run
from torch_secorder.analysis._eigensolvers import (
    default_max_matvecs,
    eigen_steps,
    model_eigenpairs,
)
from torch_secorder.analysis._estimators import estimator_maker, estimator_steps
from torch_secorder.analysis._groups import (
    group_problems,
    module_groups,
    rows_of,
    run_model,
)
from torch_secorder.analysis._sampling import make_generator, spawn
from torch_secorder.analysis._variables import exact_groups, variables_exact_or_estimate
from torch_secorder.analysis.density import _default_probes
from torch_secorder.analysis.results import TraceEstimate
from torch_secorder.core._variables import Variables, select_modules
from torch_secorder.core.operator import (
    HessianOperator,
    exact_diagonal,
    forget_plan,
    kept_gradient,
    planned_diagonal_costs,
)
from torch_secorder.core.params import select_params

STAGES = (
    "top eigenvalues",
    "trace",
    "spectral density",
    "per-layer traces",
    "per-layer top eigenvalues",
)
WHOLE = STAGES[:3]
"""The whole-model stages."""
ACTIVATION_STAGES = ("activation traces", "activation top eigenvalues")
"""The stages of the activation table, after :data:`STAGES` when it is asked for."""
PER_LAYER = ("auto", "all", "trace", "none")
AUTO_FACTOR = 2
"""``per_layer="auto"`` runs the per-layer traces when their products are at most this many
times those of the whole-model stages (all counted at their budgets; exact traces from the
diagonal the whole-model trace computes cost none), and adds each module's top eigenvalue when
traces and eigenvalues together fit."""
LAYER_TOL = 1e-4
"""Relative residual tolerance of each module's top eigenvalue (the default of
:func:`~torch_secorder.top_eigenvalues`)."""
LAYER_EIGEN_BUDGET = default_max_matvecs("lanczos", 1, "largest")
"""Most products of one module's top eigenvalue."""
EXACT, HUTCH = "exact", "hutch++"
LONG_WARNING = r".*Hessian-vector products.*which can take long"
"""The library's warning of a long computation, which the report's plan makes redundant."""


class StageFailed(Exception):
    """A stage raised; the report of the stages before it has been written.

    Attributes:
        stage: The stage's name.
        error: What it raised.
        paths: The files written.
    """

    def __init__(self, stage: str, error: BaseException, paths: list[Path]) -> None:
        self.stage, self.error, self.paths = stage, error, paths
        super().__init__(f"stage {stage!r} failed: {one_line(error)}")


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage; the report of the stages before it has been written."""

    def __init__(self, stage: str, paths: list[Path]) -> None:
        self.stage, self.paths = stage, paths
        super().__init__(stage)


@dataclass
class ActivationPlan:
    """The modules of the activation table and how their traces are computed.

    Attributes:
        modules: The modules whose outputs are analysed, in model order, by their names of
            :meth:`~torch.nn.Module.named_modules` (``""``: the model's own output).
        sizes: Entries of each module's output over the data set (every batch's); ``None``
            before the operator is built.
        per_sample: Entries of each module's output per sample, where its leading dimension
            counts the samples of every batch and the rest has one shape (else ``None``).
        diagonal: Products of the exact diagonal of each module's output, planned on the
            first batch; ``None`` before it is planned, or when planning failed.
        exact_products: Products of the one exact diagonal of the outputs whose trace is
            exact, as planned.
        exact: The modules whose trace is exact, as planned (``method="auto"``: those whose
            share fits the budget in the plan of the diagonal that computes them).
        methods: Module name -> the method of its trace.
        note: Why the exact diagonal was not planned, if it was not.
    """

    modules: list[str]
    sizes: list[int] | None = None
    per_sample: list[int | None] | None = None
    diagonal: list[int] | None = None
    exact_products: int | None = None
    exact: list[str] = field(default_factory=list)
    methods: dict[str, str] = field(default_factory=dict)
    note: str | None = None

    def exact_modules(self) -> list[str]:
        """The modules whose trace is exact, in model order."""
        return [name for name, method in self.methods.items() if method == EXACT]


@dataclass
class Plan:
    """What the report will compute, by which method, and what each stage costs in products.

    Attributes:
        size: Parameters analysed.
        tensors: Parameter tensors analysed.
        names: Their names, in model order.
        groups: Module name -> indices into the selected parameters (``""`` for the model's
            own).
        sizes: Sizes of the selected parameters, in order.
        k: Top eigenvalues of the whole model.
        trace_matvecs: Budget of the whole-model trace: exact when the exact diagonal takes at
            most this many products, else Hutch++ with this many.
        layer_matvecs: The same per module.
        probes: Spectral density probes.
        steps: Lanczos steps per probe (at most ``size``).
        requested: The per-layer choice asked for (``"auto"``, ``"all"``, ``"trace"``,
            ``"none"``).
        per_layer: The per-layer choice made (``"all"``, ``"trace"`` or ``"none"``).
        diagonal: Products of the exact diagonal per selected parameter, planned on the first
            batch (a layer's products shared among its parameters by size); ``None`` before
            it is planned, or when planning failed.
        subset: Products of the exact diagonal of the parameters of the modules with an exact
            trace, when they are only part of the selection and the whole-model trace is
            Hutch++ (planned as well); else ``None``.
        trace_method: ``"exact"`` (the sum of the exact diagonal) or ``"hutch++"``.
        layer_methods: Module name -> the method of its trace.
        layer_costs: Products of the per-layer stages with (``"all"``) and without
            (``"trace"``) each module's top eigenvalue; the eigenvalues at their budget.
        products: Products per stage, at most (Lanczos stops once converged); 0 when skipped.
        note: Why the exact diagonal was not planned, if it was not.
        activations: The activation table's plan; ``None`` when it is not asked for.
    """

    size: int
    tensors: int
    names: list[str]
    groups: dict[str, list[int]]
    sizes: list[int]
    k: int
    trace_matvecs: int
    layer_matvecs: int
    probes: int
    steps: int
    requested: str
    per_layer: str
    diagonal: list[int] | None
    subset: int | None
    trace_method: str
    layer_methods: dict[str, str]
    layer_costs: dict[str, int]
    products: dict[str, int]
    note: str | None = None
    activations: ActivationPlan | None = None

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages, in order: :data:`STAGES`, then those of the activation table if asked."""
        return STAGES if self.activations is None else STAGES + ACTIVATION_STAGES

    @property
    def whole_products(self) -> int:
        """Products of the whole-model stages, at most."""
        return sum(self.products[stage] for stage in WHOLE)

    @property
    def diagonal_products(self) -> int | None:
        """Products of the exact diagonal of every selected parameter, as planned."""
        return None if self.diagonal is None else sum(self.diagonal)

    def share(self, module: str) -> int:
        """The planned products of a module's parameters in the exact diagonal."""
        return sum(self.diagonal[i] for i in self.groups[module]) if self.diagonal else 0

    def exact_modules(self) -> list[str]:
        """The modules whose trace is exact, in model order."""
        return [name for name, method in self.layer_methods.items() if method == EXACT]


def hutch_plus_plus_products(n: int, num_matvecs: int) -> int:
    """Products Hutch++ uses on ``n`` rows: ``num_matvecs``, or ``2n`` when it sketches all."""
    return 2 * n if num_matvecs // 3 >= n else num_matvecs


def make_plan(
    model: nn.Module,
    params: Any = None,
    *,
    k: int = 5,
    trace_matvecs: int = 100,
    layer_matvecs: int | None = None,
    probes: int | None = None,
    steps: int = 100,
    per_layer: str = "auto",
    diagonal: list[int] | None = None,
    subset_costs: Callable[[list[str]], dict[str, int]] | None = None,
    activations: Sequence[str] | None = None,
) -> Plan:
    """Count the products of every stage, choose the traces' methods and the per-layer stages.

    Without ``diagonal`` every trace is priced as Hutch++ (a rule of sizes, before any data is
    seen); :func:`price_plan` plans the exact diagonal and makes the plan again with it.

    With ``diagonal``, the whole-model trace is exact when the whole diagonal costs at most
    ``trace_matvecs``; then every module's trace is exact too, a sum of the same diagonal at no
    further cost. Otherwise a module's trace is exact when its parameters' share of the
    diagonal costs at most ``layer_matvecs``, also in the plan of one diagonal of those
    modules' parameters (``subset_costs``, as ``method="auto"`` of
    :func:`~torch_secorder.model_hessian_trace` chooses), and Hutch++ else; when that takes
    every module (the whole diagonal) and the per-layer traces run, the whole-model trace,
    which runs first, computes it and is exact as well.

    With ``activations``, the activation table's traces are priced with Hutch++ at
    ``layer_matvecs`` each, and its top eigenvalues at their budget, until
    :func:`price_activations` plans the exact diagonal of the modules' outputs.

    Args:
        model: The model.
        params: Parameter selection (names or glob patterns; ``None``: all trainable).
        k: Number of top eigenvalues.
        trace_matvecs: Budget of the whole-model trace.
        layer_matvecs: Budget of each module's trace (default ``trace_matvecs``).
        probes: Stochastic Lanczos quadrature probes for the density (``None``: as
            :func:`~torch_secorder.spectral_density` takes them by default for the
            selection's size, 4 on small models and one from 65,536 parameters on).
        steps: Lanczos steps per density probe.
        per_layer: ``"all"`` (each module's trace and top eigenvalue), ``"trace"``,
            ``"none"``, or ``"auto"``: the traces when their products are at most
            :data:`AUTO_FACTOR` times those of the whole-model stages, with the top
            eigenvalues when traces and eigenvalues together fit, else ``"none"``.
        diagonal: Planned products of the exact diagonal per selected parameter.
        subset_costs: ``subset_costs(modules)``, module name -> the planned products of its
            parameters in the exact diagonal of those modules' parameters (default: their
            shares of ``diagonal``).
        activations: Module names or glob patterns of the activation table (``""``: the
            model's own output), as ``modules=`` of the model forms takes them; an empty
            list: the modules owning the selected parameters (the per-layer table's);
            ``None`` (default): no activation table.

    Returns:
        The plan.

    Raises:
        TypeError, ValueError: From :func:`~torch_secorder.select_params`.
        ValueError: On an unknown ``per_layer``, a ``diagonal`` of another length, or an
            ``activations`` entry that matches no module.
    """
    if per_layer not in PER_LAYER:
        raise ValueError(f"per_layer must be one of {', '.join(PER_LAYER)}; got {per_layer!r}")
    selected = select_params(model, params)
    names, tensors = list(selected), list(selected.values())
    if diagonal is not None and len(diagonal) != len(tensors):
        raise ValueError(
            f"diagonal must hold one count per selected parameter; expected {len(tensors)}, "
            f"got {len(diagonal)}"
        )
    sizes = [p.numel() for p in tensors]
    groups = module_groups(model, tensors)
    if activations is None:
        chosen = None
    elif activations:
        picked = select_modules("make_plan", model, list(activations))
        chosen = ActivationPlan([name for name, _ in picked])
    else:
        chosen = ActivationPlan(list(groups))
    plan = Plan(
        size=sum(sizes),
        tensors=len(tensors),
        names=names,
        groups=groups,
        sizes=sizes,
        k=min(k, sum(sizes)),
        trace_matvecs=trace_matvecs,
        layer_matvecs=trace_matvecs if layer_matvecs is None else layer_matvecs,
        probes=probes or _default_probes(sum(sizes)),
        steps=min(steps, sum(sizes)),
        requested=per_layer,
        per_layer="none",
        diagonal=diagonal,
        subset=None,
        trace_method=HUTCH,
        layer_methods={},
        layer_costs={},
        products={},
        activations=chosen,
    )
    return _choose(plan, subset_costs)


def _choose(plan: Plan, subset_costs: Callable[[list[str]], dict[str, int]] | None) -> Plan:
    """Fill in the methods, the per-layer choice and the products of ``plan``'s stages."""
    groups, planned = plan.groups, plan.diagonal_products
    total = planned or 0
    whole_exact = planned is not None and total <= plan.trace_matvecs
    if whole_exact or planned is None:
        layer_methods = dict.fromkeys(groups, EXACT if whole_exact else HUTCH)
    else:
        layer_methods = {
            name: EXACT if plan.share(name) <= plan.layer_matvecs else HUTCH for name in groups
        }
    exact = [name for name in groups if layer_methods[name] == EXACT]
    everything = len(exact) == len(groups)
    shares = {name: plan.share(name) for name in exact}
    while exact and not everything and subset_costs and plan.requested != "none":
        # as method="auto" of model_hessian_trace: a plan of those modules' parameters alone
        # may cost a module more than its share of the whole; again until all left fit
        shares = subset_costs(exact)
        fitting = [name for name in exact if shares[name] <= plan.layer_matvecs]
        if fitting == exact:
            break
        exact = fitting
    layer_methods = {name: EXACT if name in exact else HUTCH for name in groups}
    plan = replace(plan, layer_methods=layer_methods, subset=None)
    hutch = sum(
        hutch_plus_plus_products(sum(plan.sizes[i] for i in groups[name]), plan.layer_matvecs)
        for name in groups
        if layer_methods[name] == HUTCH
    )
    layer_trace = hutch
    if exact and not whole_exact and everything:
        layer_trace += total
    elif exact and not whole_exact:
        layer_trace += sum(shares[name] for name in exact)
    products = {
        "top eigenvalues": default_max_matvecs("lanczos", plan.k, "largest"),
        "trace": total if whole_exact else hutch_plus_plus_products(plan.size, plan.trace_matvecs),
        "spectral density": plan.probes * plan.steps,
    }
    layer_eigen = len(groups) * LAYER_EIGEN_BUDGET
    costs = {"all": layer_trace + layer_eigen, "trace": layer_trace}
    chosen = plan.requested
    if chosen == "auto":
        limit = AUTO_FACTOR * sum(products.values())
        chosen = next((mode for mode in ("all", "trace") if costs[mode] <= limit), "none")
    trace_method = EXACT if whole_exact else HUTCH
    subset = None
    if exact and not whole_exact and chosen != "none":
        if everything:  # the whole diagonal: the whole-model trace computes and shares it
            trace_method, products["trace"] = EXACT, total
            costs = {"all": layer_eigen, "trace": 0}
        else:
            subset = layer_trace - hutch
    products["per-layer traces"] = 0 if chosen == "none" else costs["trace"]
    products["per-layer top eigenvalues"] = layer_eigen if chosen == "all" else 0
    plan = replace(
        plan,
        per_layer=chosen,
        trace_method=trace_method,
        subset=subset,
        layer_costs=costs,
        products=products,
    )
    return _choose_activations(plan)


def _choose_activations(plan: Plan) -> Plan:
    """Fill in the methods of the activation table's traces and the products of its stages.

    A module's trace is exact when :func:`price_activations` found its output's share of one
    diagonal within ``plan.layer_matvecs`` products (all such modules from that diagonal),
    else Hutch++ with that many, as ``method="auto"`` of
    :func:`~torch_secorder.model_hessian_trace` chooses.
    """
    act = plan.activations
    if act is None:
        return plan
    budget = plan.layer_matvecs
    methods = {name: EXACT if name in act.exact else HUTCH for name in act.modules}
    shared = act.exact_products or 0
    traces = shared
    for i, name in enumerate(act.modules):
        if methods[name] == EXACT:
            continue
        if act.sizes is None:  # priced before the operator's sizes are known
            traces += budget
        else:
            traces += hutch_plus_plus_products(act.sizes[i], budget)
    products = {
        **plan.products,
        "activation traces": traces,
        "activation top eigenvalues": len(act.modules) * LAYER_EIGEN_BUDGET,
    }
    act = replace(act, methods=methods, exact_products=shared)
    return replace(plan, activations=act, products=products)


def module_names(plan: Plan, modules: list[str]) -> list[str]:
    """The names of the parameters of ``modules``, in model order."""
    indices = sorted(i for name in modules for i in plan.groups[name])
    return [plan.names[i] for i in indices]


def price_plan(
    plan: Plan,
    operator: HessianOperator,
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
) -> Plan:
    """Plan the exact diagonal on the first batch and make ``plan`` again with its products.

    The plan is dropped afterwards (the trace stage makes it again, at the cost of a gradient
    on the first batch), so that its gradient graph is not held through the stages before.
    A failure to plan leaves every trace to Hutch++ and is noted in the plan.

    Args:
        plan: From :func:`make_plan` without ``diagonal``.
        operator: The report's operator over ``plan``'s parameters.
        model: The model.
        loss_fn: The mean loss of a batch.
        data: A batch or a re-iterable collection of batches.

    Returns:
        The plan with the traces' methods chosen.
    """
    # Checks that help the modules' choice run only when per-layer traces may be wanted.
    budget = plan.trace_matvecs if plan.requested == "none" else math.inf

    def subset_costs(modules: list[str]) -> dict[str, int]:
        names = module_names(plan, modules)
        with HessianOperator.from_model(model, loss_fn, data, params=names) as subset:
            costs = dict(zip(names, planned_diagonal_costs(subset)))
        return {m: sum(costs[plan.names[i]] for i in plan.groups[m]) for m in modules}

    try:
        diagonal = planned_diagonal_costs(operator, budget)
        forget_plan(operator)
        return _choose(replace(plan, diagonal=diagonal), subset_costs)
    except Exception as err:  # the report goes on with Hutch++, and says why
        forget_plan(operator)
        return replace(plan, note=f"the exact diagonal could not be planned ({one_line(err)})")


def activation_table_operator(
    plan: Plan, model: nn.Module, loss_fn: Callable[..., Tensor], data: Any
) -> HessianOperator:
    """The Hessian with respect to the outputs of the activation table's modules.

    Building it runs the model once over the data, forward only, and checks that each module
    is called once and returns one floating-point tensor.

    Raises:
        TypeError, ValueError: From :meth:`HessianOperator.from_model
            <torch_secorder.HessianOperator.from_model>`, naming the module.
    """
    if plan.activations is None:
        raise ValueError("the plan has no activation table")
    return HessianOperator.from_model(
        model, loss_fn, data, wrt="activations", modules=plan.activations.modules
    )


def price_activations(plan: Plan, operator: HessianOperator) -> Plan:
    """Plan the exact diagonal of the activation operator and choose its traces' methods.

    As :func:`~torch_secorder.model_hessian_trace` with ``groups="module"`` plans it (on the
    first batch, with the checks of independent samples), then dropped, as
    :func:`price_plan` drops its own; a failure to plan leaves every activation trace to
    Hutch++ and is noted.

    Args:
        plan: A plan with ``activations``.
        operator: From :func:`activation_table_operator`.

    Returns:
        The plan with the activation table's sizes, methods and products.
    """
    act = plan.activations
    if act is None:
        return plan
    batch_sizes = operator._source.sizes
    modules = list(operator.names or [])  # the operator's order, the model's
    sizes = [0] * len(modules)
    shapes: list[set[Any]] = [set() for _ in modules]
    for batch, name, shape in operator.variables or []:
        sizes[modules.index(name)] += shape.numel()
        counted = len(shape) > 0 and shape[0] == batch_sizes[batch]
        shapes[modules.index(name)].add(shape[1:].numel() if counted else None)
    per_sample = [kinds.pop() if len(kinds) == 1 else None for kinds in shapes]
    diagonal, note, exact_products, exact = None, None, None, []
    try:
        diagonal = planned_diagonal_costs(operator)
        members = {v: [v] for v in range(len(modules))}
        cheap, needed, costs = exact_groups(operator, members, plan.layer_matvecs, math.inf)
        exact = [modules[v] for v in cheap]
        exact_products = sum(costs[v] for v in needed)
    except Exception as err:  # the report goes on with Hutch++, and says why
        diagonal, note = None, f"the exact diagonal could not be planned ({one_line(err)})"
    finally:
        forget_plan(operator)
    act = replace(
        act,
        modules=modules,
        sizes=sizes,
        per_sample=per_sample,
        diagonal=diagonal,
        exact_products=exact_products,
        exact=exact,
        note=note,
    )
    return _choose_activations(replace(plan, activations=act))


def stage_methods(plan: Plan) -> dict[str, tuple[str, str, bool]]:
    """Each stage's method, what it computes (or why it is skipped), and whether it is skipped."""
    count = len(plan.groups)
    total, exact = plan.diagonal_products, plan.exact_modules()
    shared = plan.per_layer != "none"
    if plan.trace_method == EXACT and total is not None and total <= plan.trace_matvecs:
        trace = "the exact diagonal" + (", shared with the per-layer traces" if shared else "")
    elif plan.trace_method == EXACT:
        trace = (
            f"the exact diagonal: above the budget of {plan.trace_matvecs}, but the per-layer "
            "traces take all of it and share it"
        )
    else:
        trace = f"budget {plan.trace_matvecs}"
        if total is not None:
            trace += f"; the exact diagonal would take {total} products"
        elif plan.note:
            trace += f"; {plan.note}"
    methods = {
        "top eigenvalues": (
            "Lanczos",
            f"k={plan.k}; stops once converged, usually far sooner",
            False,
        ),
        "trace": ("exact" if plan.trace_method == EXACT else "Hutch++", trace, False),
        "spectral density": (
            "stochastic Lanczos quadrature",
            f"{plan.probes} probes x {plan.steps} Lanczos steps",
            False,
        ),
    }
    kinds = {EXACT: "exact", HUTCH: "Hutch++"}
    method = " and ".join(kinds[m] for m in (EXACT, HUTCH) if m in plan.layer_methods.values())
    limit = f"more than {AUTO_FACTOR} x the {plan.whole_products} products of stages 1-3"
    if plan.per_layer == "none":
        why = "--per-layer none" if plan.requested == "none" else f"--per-layer auto: {limit}"
        detail = f"{why}; {count} modules would take {plan.layer_costs['trace']} products"
    elif len(exact) == count and plan.trace_method == EXACT:
        detail = f"{count} modules: sums of the exact diagonal of stage 2"
    elif exact:
        hutch = plan.products["per-layer traces"] - (plan.subset or 0)
        detail = (
            f"{count} modules: {len(exact)} exact, from one exact diagonal of their parameters "
            f"({plan.subset} products); {count - len(exact)} by Hutch++, budget "
            f"{plan.layer_matvecs} each ({hutch} products)"
        )
    else:
        detail = f"{count} modules, budget {plan.layer_matvecs} each" + (
            "; their exact diagonals would take more" if total is not None else ""
        )
    methods["per-layer traces"] = (method, detail, plan.per_layer == "none")
    eigen = (
        f"{count} modules, at most {LAYER_EIGEN_BUDGET} products each, tol {LAYER_TOL:g}; "
        "stops once converged"
    )
    if plan.per_layer != "all":
        bound = count * LAYER_EIGEN_BUDGET
        eigen = (
            f"--per-layer {plan.requested}: Lanczos for {count} modules would take at most "
            f"{bound} products"
        )
        if plan.requested == "auto":
            eigen += f" ({plan.layer_costs['all']} with the traces), {limit}"
        eigen += "; --per-layer all runs it"
    methods["per-layer top eigenvalues"] = ("Lanczos", eigen, plan.per_layer != "all")
    if plan.activations is not None:
        methods.update(_activation_methods(plan))
    return methods


def _activation_methods(plan: Plan) -> dict[str, tuple[str, str, bool]]:
    """The methods and details of the activation table's stages."""
    act = plan.activations
    assert act is not None
    count, budget = len(act.modules), plan.layer_matvecs
    exact = act.exact_modules()
    kinds = {EXACT: "exact", HUTCH: "Hutch++"}
    method = " and ".join(kinds[m] for m in (EXACT, HUTCH) if m in act.methods.values())
    outputs = f"{count} module output{'s' if count > 1 else ''}"
    if exact:
        shared = act.exact_products
        if len(exact) == count:
            detail = f"{outputs}, from one exact diagonal ({shared} products)"
        else:
            hutch = plan.products["activation traces"] - shared
            detail = (
                f"{outputs}: {len(exact)} exact, from one exact diagonal ({shared} products); "
                f"{count - len(exact)} by Hutch++, budget {budget} each ({hutch} products)"
            )
    else:
        detail = f"{outputs}, Hutch++ with budget {budget} each"
        if act.diagonal is not None:
            detail += "; their exact diagonals would take more"
        elif act.note is not None:
            detail += f"; {act.note}"
    eigen = (
        f"{outputs}, at most {LAYER_EIGEN_BUDGET} products each, tol {LAYER_TOL:g}; stops once "
        "converged"
    )
    return {
        "activation traces": (method, detail, False),
        "activation top eigenvalues": ("Lanczos", eigen, False),
    }


def at_most(stage: str) -> bool:
    """Whether the stage's products are a bound (Lanczos stops once converged)."""
    return stage in ("top eigenvalues", "per-layer top eigenvalues", "activation top eigenvalues")


def plan_lines(
    plan: Plan, seconds_per_product: float | None, activation_seconds: float | None = None
) -> list[str]:
    """The plan as lines of text, with times estimated from one product's time.

    The activation table's stages are timed by ``activation_seconds``, one product of the
    activation operator, where given.
    """

    def rate(stage: str) -> float | None:
        if stage in ACTIVATION_STAGES and activation_seconds is not None:
            return activation_seconds
        return seconds_per_product

    def cost(products: int, bound: bool, seconds: float | None) -> str:
        word = "at most " if bound else ""
        text = f"{word}{products} products"
        if seconds is not None:
            text += f", {word}{duration(seconds)}"
        return text

    def estimate(stage: str) -> float | None:
        seconds = rate(stage)
        return None if seconds is None else plan.products[stage] * seconds

    lines = [f"Plan: {plan.size} parameters in {plan.tensors} tensors, {len(plan.groups)} modules."]
    if seconds_per_product is not None:
        lines.append(
            f"One Hessian-vector product over the data took {seconds_per_product:.3g} s (timed "
            "before the stages); the times below are products times that."
        )
    if plan.diagonal is not None:
        lines.append(
            f"The exact diagonal, planned on the first batch, takes {plan.diagonal_products} "
            f"products for all {plan.size} parameters."
        )
    elif plan.note is not None:
        lines.append(f"Every trace by Hutch++: {plan.note}.")
    act = plan.activations
    if act is not None:
        count = len(act.modules)
        listed = ", ".join(name or ROOT for name in act.modules[:8]) + (
            ", ..." if count > 8 else ""
        )
        text = f"Activations: the outputs of {count} module{'s' if count > 1 else ''} ({listed})"
        if act.sizes is not None:
            text += f", {sum(act.sizes)} entries over the data"
        if activation_seconds is not None:
            text += f"; one product with respect to them took {activation_seconds:.3g} s"
        lines.append(text + ".")
        if act.diagonal is not None:
            lines.append(
                f"Their exact diagonal, planned on the first batch, takes {sum(act.diagonal)} "
                "products."
            )
        elif act.note is not None:
            lines.append(f"Every activation trace by Hutch++: {act.note}.")
    for index, (stage, (method, detail, skipped)) in enumerate(stage_methods(plan).items(), 1):
        if skipped:
            lines.append(f"  {index}. {stage}: skipped ({detail})")
        elif stage == "per-layer traces" and plan.products[stage] == 0:
            lines.append(f"  {index}. {stage}: {method}, no further products ({detail})")
        else:
            products = cost(plan.products[stage], at_most(stage), estimate(stage))
            lines.append(f"  {index}. {stage}: {method}, {products} ({detail})")
    times = [estimate(stage) for stage in plan.stages]
    total = None if None in times else sum(times)  # type: ignore[arg-type]
    lines.append(f"Total: {cost(sum(plan.products.values()), True, total)}.")
    return lines


class _Counted:
    """An operator that advances a progress bar by the columns of every product."""

    def __init__(self, operator: Any, bar: Any) -> None:
        self.operator, self.bar = operator, bar
        self.shape, self.dtype, self.device = operator.shape, operator.dtype, operator.device

    def matmat(self, V: Tensor) -> Tensor:
        result = self.operator.matmat(V)
        if self.bar is not None:
            self.bar.update(V.shape[1])
        return result


class _Tracked:
    """An activation operator whose products, its exact diagonal's included, advance a bar.

    The analyses of activations use more of the operator than ``matmat`` (its variables, the
    plan and products of its exact diagonal), which this wrapper passes through; the
    diagonal's products arrive as an increase of :attr:`num_matvecs`.
    """

    def __init__(self, operator: HessianOperator, bar: Any) -> None:
        self.__dict__.update(operator=operator, bar=bar)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.operator, name)

    @property
    def num_matvecs(self) -> int:
        return self.operator.num_matvecs

    @num_matvecs.setter
    def num_matvecs(self, value: int) -> None:
        self._advance(value - self.operator.num_matvecs)
        self.operator.num_matvecs = value

    def matmat(self, V: Tensor) -> Tensor:
        result = self.operator.matmat(V)
        self._advance(V.shape[1])
        return result

    def _advance(self, products: int) -> None:
        if self.bar is not None and products > 0:
            self.bar.update(products)


def _bar(enabled: bool, stage: str, total: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=stage, unit="product", leave=False)


def time_one_product(operator: HessianOperator, seed: int = 0) -> float:
    """Seconds one Hessian-vector product over the data takes: the second of two, timed.

    The first product pays for what happens once (allocations, kernel set-up and, for a single
    batch, the gradient graph that later products reuse): 1.3 s against 0.67 s on a ResNet-18
    over three batches, 0.41 s against 0.02 s on a narrow one over one batch.
    """
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(operator.shape[0], generator=g, dtype=torch.float64)
    v = v.to(dtype=operator.dtype, device=operator.device)
    cuda = operator.device.type == "cuda"
    operator.matvec(v)
    if cuda:
        torch.cuda.synchronize(operator.device)
    start = time.perf_counter()
    operator.matvec(v)
    if cuda:
        torch.cuda.synchronize(operator.device)
    return time.perf_counter() - start


@dataclass
class _Stages:
    """What the stages share: the operator, the plan, and the exact traces once computed."""

    operator: HessianOperator
    plan: Plan
    model: nn.Module
    loss_fn: Callable[..., Tensor]
    data: Any
    seed: int
    sums: dict[str, tuple[float, int]] | None = None
    rows: list[dict[str, Any]] | None = None
    activations: HessianOperator | None = None
    activation_rows: list[dict[str, Any]] | None = None


def hessian_report(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    out: Path,
    plan: Plan,
    *,
    params: Any = None,
    seed: int = 0,
    setup: dict[str, Any] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    activations: HessianOperator | None = None,
) -> list[Path]:
    """Time one product, plan the exact diagonal, show the plan, run its stages, write after each.

    With the plan's activation table, the activation operator is timed and its exact diagonal
    planned (:func:`price_activations`) first, and its graph released before the parameters'
    operator is timed, so that the two are not held together.

    Args:
        model: The model, in the mode to analyse.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        data: An ``(inputs, targets)`` batch or a re-iterable collection of batches.
        out: Folder for ``report.md``, ``report.json`` and ``density.png``.
        plan: From :func:`make_plan` with the same ``model`` and ``params``; without its
            ``diagonal``, the report plans it (:func:`price_plan`).
        params: Parameter selection (names or glob patterns; ``None``: all trainable).
        seed: Seed of the analyses' private random generators.
        setup: What the report says about the model and data.
        progress: Show a progress bar of products per stage (needs ``tqdm``).
        log: Where the plan and a line per finished stage go (``None``: nowhere).
        activations: The operator of the plan's activation table, from
            :func:`activation_table_operator` (built here if ``None`` and the plan has the table).

    Returns:
        The files written.

    Raises:
        StageFailed: If a stage raised (the finished stages are written).
        StageInterrupted: On Ctrl-C during a stage (the finished stages are written).
        TypeError, ValueError: From :func:`activation_table_operator`, before any stage.
    """
    say = log or (lambda line: None)
    report: dict[str, Any] = {
        "setup": dict(setup or {}),
        "parameters": {"count": plan.size, "tensors": plan.tensors, "modules": len(plan.groups)},
        "plan": {},
        "seconds": {},
        "num_matvecs": 0,
    }
    writer = _Writer(out, report)
    if plan.activations is not None and activations is None:
        activations = activation_table_operator(plan, model, loss_fn, data)
    operator = HessianOperator.from_model(model, loss_fn, data, params=params)
    kept = contextlib.nullcontext() if activations is None else activations
    with operator, kept:
        activation_seconds = None
        if activations is not None:
            activation_seconds = time_one_product(activations, seed)
            act = plan.activations
            if act is not None and act.sizes is None:
                plan = price_activations(plan, activations)
            activations.release()
        seconds_per_product = time_one_product(operator, seed)
        if plan.diagonal is None and plan.note is None:
            plan = price_plan(plan, operator, model, loss_fn, data)
        report["plan"] = _plan_json(plan, seconds_per_product, activation_seconds)
        for line in plan_lines(plan, seconds_per_product, activation_seconds):
            say(line)
        writer.write()
        shared = _Stages(operator, plan, model, loss_fn, data, seed, activations=activations)
        stages = [s for s in plan.stages if _status_of(report, s) == "pending"]
        for index, stage in enumerate(stages, 1):
            say(f"[{index}/{len(stages)}] {stage} ...")
            bar = _bar(progress, stage, plan.products[stage])
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    # the plan has stated every stage's products and time
                    warnings.filterwarnings("ignore", LONG_WARNING, UserWarning)
                    section, used = _run_stage(stage, shared, _Counted(operator, bar))
            except KeyboardInterrupt:
                _status(report, stage, "interrupted")
                raise StageInterrupted(stage, writer.write()) from None
            except Exception as err:
                _status(report, stage, "failed")
                report["failed"] = {"stage": stage, "error": one_line(err)}
                raise StageFailed(stage, err, writer.write()) from err
            finally:
                if bar is not None:
                    bar.close()
            elapsed = time.perf_counter() - start
            report["seconds"][stage] = round(elapsed, 3)
            report["num_matvecs"] += used
            if stage == "spectral density":
                density = section.pop("result")
                if not writer.plot(density):
                    section["plot"] = None
            report[KEYS[stage]] = section
            _status(report, stage, "done", used)
            paths = writer.write()
            say(f"    {used} products in {duration(elapsed)}; written to {paths[0]}")
    report["complete"] = True
    return writer.write()


KEYS = {
    "top eigenvalues": "top_eigenvalues",
    "trace": "trace",
    "spectral density": "spectral_density",
    "per-layer traces": "per_layer",
    "per-layer top eigenvalues": "per_layer",
    "activation traces": "activations",
    "activation top eigenvalues": "activations",
}
"""The key of each stage's section in ``report.json``; the per-layer stages share a table, and
so do the activation stages."""


def _plan_json(
    plan: Plan, seconds_per_product: float, activation_seconds: float | None = None
) -> dict[str, Any]:
    methods = stage_methods(plan)

    def rate(stage: str) -> float:
        if stage in ACTIVATION_STAGES and activation_seconds is not None:
            return activation_seconds
        return seconds_per_product

    section: dict[str, Any] = {
        "seconds_per_product": round(seconds_per_product, 4),
        "exact_diagonal": {"products": plan.diagonal_products, "note": plan.note},
        "per_layer": {
            "requested": plan.requested,
            "chosen": plan.per_layer,
            "products_all": plan.layer_costs["all"],
            "products_trace": plan.layer_costs["trace"],
            "trace_methods": plan.layer_methods,
        },
        "stages": [
            {
                "stage": stage,
                "method": methods[stage][0],
                "detail": methods[stage][1],
                "products": plan.products[stage],
                "at_most": at_most(stage),
                "estimated_seconds": round(plan.products[stage] * rate(stage), 1),
                "status": "skipped" if methods[stage][2] else "pending",
            }
            for stage in plan.stages
        ],
    }
    act = plan.activations
    if act is not None:
        section["activations"] = {
            "modules": act.modules,
            "seconds_per_product": (
                None if activation_seconds is None else round(activation_seconds, 4)
            ),
            "exact_diagonal": {
                "products": None if act.diagonal is None else dict(zip(act.modules, act.diagonal)),
                "note": act.note,
            },
            "trace_methods": act.methods,
        }
    return section


def _status_of(report: dict[str, Any], stage: str) -> str:
    return next(e["status"] for e in report["plan"]["stages"] if e["stage"] == stage)


def _status(report: dict[str, Any], stage: str, status: str, used: int | None = None) -> None:
    for entry in report["plan"]["stages"]:
        if entry["stage"] == stage:
            entry["status"] = status
            if used is not None:
                entry["products_used"] = used


def _run_stage(stage: str, shared: _Stages, operator: _Counted) -> tuple[Any, int]:
    """Run one stage on the operator; return its report section and the products it used."""
    plan, seed = shared.plan, shared.seed
    generator = torch.Generator().manual_seed(seed)
    if stage == "top eigenvalues":
        with warnings.catch_warnings():
            # the report states convergence itself
            warnings.filterwarnings("ignore", "top_eigenvalues: .*", RuntimeWarning)
            eigen = top_eigenvalues(operator, k=plan.k, generator=generator)
        section = {
            "eigenvalues": eigen.eigenvalues.tolist(),
            "residuals": eigen.residuals.tolist(),
            "converged": eigen.converged,
            "num_matvecs": eigen.num_matvecs,
        }
        return section, eigen.num_matvecs
    if stage == "trace":
        if plan.trace_method == EXACT:
            value, shared.sums, used = exact_traces(shared.operator, plan, list(plan.groups))
            if operator.bar is not None:
                operator.bar.update(used)
            section = {"value": value, "stderr": 0.0, "method": EXACT, "num_matvecs": used}
            return section, used
        trace = hessian_trace(
            operator, method=HUTCH, num_matvecs=plan.trace_matvecs, generator=generator
        )
        section = {
            "value": float(trace.value),
            "stderr": float(trace.stderr),
            "method": HUTCH,
            "num_matvecs": trace.num_matvecs,
            "exact_diagonal_products": plan.diagonal_products,
        }
        return section, trace.num_matvecs
    if stage == "spectral density":
        density = spectral_density(
            operator,
            num_matvecs=plan.probes * plan.steps,
            num_probes=plan.probes,
            generator=generator,
        )
        section = {
            "plot": "density.png",
            "probes": plan.probes,
            "steps": density.nodes.shape[-1],
            "lowest_node": float(density.nodes.min()),
            "highest_node": float(density.nodes.max()),
            "num_matvecs": density.num_matvecs,
            "result": density,
        }
        return section, density.num_matvecs
    if stage == "per-layer traces":
        shared.rows, used = layer_traces(shared, operator)
        return shared.rows, used
    if stage == "per-layer top eigenvalues":
        shared.rows, used = layer_top_eigenvalues(shared, operator)
        return shared.rows, used
    tracked = _Tracked(shared.activations, operator.bar)  # type: ignore[arg-type]
    if stage == "activation traces":
        shared.activation_rows, used = activation_traces(shared, tracked)
    else:
        shared.activation_rows, used = activation_top_eigenvalues(shared, tracked)
    return shared.activation_rows, used


def exact_traces(
    operator: HessianOperator, plan: Plan, modules: list[str]
) -> tuple[float, dict[str, tuple[float, int]], int]:
    """The exact diagonal of ``operator``, summed: in all and per module.

    The operator's kept gradient graph (of a lone batch) is released first, so that it is not
    held beside the diagonal's.

    Returns:
        The sum of the diagonal, module name -> (its trace, its parameters' products), and
        the products the diagonal took.
    """
    operator.release()
    diagonal, costs = exact_diagonal(operator)
    position = {name: i for i, name in enumerate(operator.names or [])}
    sums = {}
    for module in modules:
        rows = [position[plan.names[i]] for i in plan.groups[module]]
        value = sum(float(diagonal[r].sum(dtype=torch.float64)) for r in rows)
        sums[module] = (value, sum(costs[r] for r in rows))
    whole = sum(float(d.sum(dtype=torch.float64)) for d in diagonal)
    return whole, sums, sum(costs)


def layer_traces(shared: _Stages, operator: _Counted) -> tuple[list[dict[str, Any]], int]:
    """Each module's trace: exact (a sum of the exact diagonal) or Hutch++, as planned.

    The exact ones come from the whole diagonal of the trace stage, or from one diagonal of
    their modules' parameters; the Hutch++ ones run together, each module from its own
    generator derived from ``seed`` in module order, as
    :func:`~torch_secorder.model_hessian_trace` with ``groups="module"`` draws them.

    Returns:
        The rows of the per-layer table (top eigenvalues ``None``) and the products used.
    """
    plan, used = shared.plan, 0
    exact = plan.exact_modules()
    sums = shared.sums or {}
    if exact and shared.sums is None:
        names = module_names(plan, exact)
        shared.operator.release()
        subset = HessianOperator.from_model(shared.model, shared.loss_fn, shared.data, params=names)
        with subset:
            _, sums, used = exact_traces(subset, plan, exact)
        if operator.bar is not None:
            operator.bar.update(used)
    generators = spawn(make_generator(torch.Generator().manual_seed(shared.seed)), len(plan.groups))
    problems = {}
    for (name, indices), gen in zip(plan.groups.items(), generators):
        if plan.layer_methods[name] == HUTCH:
            n = sum(plan.sizes[i] for i in indices)
            steps = estimator_steps(
                HUTCH, n, plan.layer_matvecs, operator.dtype, operator.device, gen,
                span=operator.shape[0],
            )  # fmt: skip
            problems[name] = Problem(steps, rows_of(indices, plan.sizes, operator.device))
    if problems:
        run("per-layer traces", operator, list(problems.values()))
    modules = dict(shared.model.named_modules())
    rows = []
    for name, indices in plan.groups.items():
        if name in problems:
            (value, stderr), products = problems[name].result, problems[name].num_matvecs
            used += products
        else:
            (value, products), stderr = sums[name], 0.0
        module = modules[name]
        rows.append(
            {
                "module": name,
                "type": type(module).__name__,
                "parameters": sum(plan.sizes[i] for i in indices),
                "trace": float(value),
                "trace_stderr": float(stderr),
                "trace_method": plan.layer_methods[name],
                "trace_num_matvecs": products,
                "top_eigenvalue": None,
                "converged": None,
                "eigen_num_matvecs": None,
                "num_matvecs": products,
            }
        )
    return rows, used


def layer_top_eigenvalues(shared: _Stages, operator: _Counted) -> tuple[list[dict[str, Any]], int]:
    """Each module's top eigenvalue by Lanczos, all modules in one lockstep run.

    As :func:`~torch_secorder.model_top_eigenvalues` with ``groups="module"`` computes them
    (with a generator seeded ``seed``), but all their products run together.

    Returns:
        The rows of the per-layer traces with their top eigenvalues, and the products used.
    """
    plan = shared.plan

    def eigen_problem(
        n: int, dtype: Any, device: Any, gen: Any, span: int, gradient: Any, group: Any
    ) -> Any:
        return eigen_steps(
            "lanczos", n, 1, "largest", LAYER_TOL, LAYER_EIGEN_BUDGET, dtype, device, gen,
            gradient,
        )  # fmt: skip

    generator = torch.Generator().manual_seed(shared.seed)
    tops = group_problems(
        operator,
        plan.sizes,
        plan.groups,
        generator,
        eigen_problem,
        gradient=lambda: kept_gradient(shared.operator),
    )
    run("per-layer top eigenvalues", operator, tops)
    rows = []
    for row, top in zip(shared.rows or [], tops):
        rows.append(
            {
                **row,
                "top_eigenvalue": float(top.result.values[0]),
                "converged": top.result.converged,
                "eigen_num_matvecs": top.num_matvecs,
                "num_matvecs": row["trace_num_matvecs"] + top.num_matvecs,
            }
        )
    return rows, sum(top.num_matvecs for top in tops)


def activation_traces(shared: _Stages, operator: Any) -> tuple[list[dict[str, Any]], int]:
    """Each module's activation-Hessian trace, exact or Hutch++ as the plan chose.

    As :func:`~torch_secorder.model_hessian_trace` computes them with ``wrt="activations",
    modules=..., groups="module", num_matvecs=layer_matvecs`` and a generator seeded ``seed``
    (``method="auto"``: one exact diagonal of the modules whose planned products fit the
    budget, Hutch++ for the others), on the report's activation operator.

    Args:
        shared: What the stages share, with the activation operator.
        operator: That operator, or a :class:`_Tracked` view of it.

    Returns:
        The rows of the activation table (top eigenvalues ``None``) and the products used; the
        graphs of both operators are released.
    """
    plan, act = shared.plan, shared.plan.activations
    assert act is not None
    assert act.sizes is not None
    assert act.per_sample is not None
    fname, budget = "model_hessian_trace", plan.layer_matvecs
    generator = torch.Generator().manual_seed(shared.seed)
    options = {"seed": 0, "distributed": None, "progress": False}

    make_steps = estimator_maker(HUTCH, budget)

    def finish(result: tuple[Tensor, Tensor], count: int, _: list[Tensor]) -> TraceEstimate:
        return TraceEstimate(result[0], result[1], count, HUTCH)

    def estimate(selection: Any, groups: object) -> Any:
        return run_model(
            fname, shared.model, shared.loss_fn, shared.data, selection, groups, generator,
            make_steps, finish, options, budget,
        )  # fmt: skip

    def exact(diagonal: list[Tensor], count: int) -> TraceEstimate:
        value = torch.stack([d.sum() for d in diagonal]).sum()
        return TraceEstimate(value, torch.zeros_like(value), count, EXACT)

    shared.operator.release()  # the parameters' kept graph (of a lone batch) is not needed here
    before = operator.num_matvecs
    selection = Variables("activations", act.modules, operator)
    if act.diagonal is None:  # not planned: every trace by Hutch++
        traces = estimate(selection, "module")
    else:
        traces = variables_exact_or_estimate(
            fname, shared.model, shared.loss_fn, shared.data, selection, "module", budget,
            options, exact, estimate,
        )  # fmt: skip
    operator.release()
    modules = dict(shared.model.named_modules())
    rows = []
    for name, size, per_sample in zip(act.modules, act.sizes, act.per_sample):
        trace = traces[name]
        value = float(trace.value)
        rows.append(
            {
                "module": name,
                "type": type(modules[name]).__name__,
                "entries": size,
                "entries_per_sample": per_sample,
                "trace": value,
                "trace_stderr": float(trace.stderr),
                "trace_method": trace.method,
                "trace_per_entry": None if not per_sample else value / per_sample,
                "trace_num_matvecs": trace.num_matvecs,
                "top_eigenvalue": None,
                "converged": None,
                "eigen_num_matvecs": None,
                "num_matvecs": trace.num_matvecs,
            }
        )
    return rows, operator.num_matvecs - before


def activation_top_eigenvalues(shared: _Stages, operator: Any) -> tuple[list[dict[str, Any]], int]:
    """Each module's activation-Hessian top eigenvalue by Lanczos, all modules in lockstep.

    As :func:`~torch_secorder.model_top_eigenvalues` computes them with
    ``wrt="activations", modules=..., groups="module"`` and its defaults (``k=1``,
    ``tol=1e-4``, at most 300 products each) and a generator seeded ``seed``, on the report's
    activation operator.

    Returns:
        The rows of the activation traces with their top eigenvalues, and the products used.
    """
    act = shared.plan.activations
    assert act is not None
    generator = torch.Generator().manual_seed(shared.seed)
    options = {"seed": 0, "distributed": None, "progress": False}
    solver = ("lanczos", 1, "largest", LAYER_TOL, LAYER_EIGEN_BUDGET)
    shared.operator.release()
    before = operator.num_matvecs
    with warnings.catch_warnings():
        # the table states convergence itself
        warnings.filterwarnings("ignore", "model_top_eigenvalues: .*", RuntimeWarning)
        tops = model_eigenpairs(
            "model_top_eigenvalues", shared.model, shared.loss_fn, shared.data,
            Variables("activations", act.modules, operator), "module", generator, options,
            solver,
        )  # fmt: skip
    operator.release()
    rows = []
    for row in shared.activation_rows or []:
        top = tops[row["module"]]  # type: ignore[index]
        rows.append(
            {
                **row,
                "top_eigenvalue": float(top.eigenvalues[0]),
                "converged": bool(top.converged),
                "eigen_num_matvecs": top.num_matvecs,
                "num_matvecs": row["trace_num_matvecs"] + top.num_matvecs,
            }
        )
    return rows, operator.num_matvecs - before


def per_layer_rows(
    operator: HessianOperator,
    plan: Plan,
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """The per-layer table as the report computes it, without the whole-model stages.

    The exact diagonal where the plan's whole-model trace takes it, then each module's trace
    and, with ``plan.per_layer == "all"``, its top eigenvalue.

    Args:
        operator: The report's operator over ``plan``'s parameters.
        plan: From :func:`price_plan`.
        model: The model.
        loss_fn: The mean loss of a batch.
        data: A batch or a re-iterable collection of batches.
        seed: Seed of the random generators.

    Returns:
        The rows and the products used.
    """
    shared = _Stages(operator, plan, model, loss_fn, data, seed)
    counted, used = _Counted(operator, None), 0
    if plan.trace_method == EXACT:
        _, shared.sums, used = exact_traces(operator, plan, list(plan.groups))
    shared.rows, more = layer_traces(shared, counted)
    used += more
    if plan.per_layer == "all":
        shared.rows, more = layer_top_eigenvalues(shared, counted)
        used += more
    return shared.rows, used


class _Writer:
    """Writes the report as it grows."""

    def __init__(self, out: Path, report: dict[str, Any]) -> None:
        self.out, self.report = out, report
        self.plotted = False
        # (a plot of an earlier report in the folder would not match this one)
        (out / "density.png").unlink(missing_ok=True)

    def plot(self, density: Any) -> bool:
        """Draw ``density.png``; whether it was written."""
        try:
            plot_spectral_density(density, log=True, path=self.out / "density.png")
        except ImportError as err:
            self.report["spectral_density_plot"] = f"not written: {one_line(err)}"
        else:
            self.plotted = True
        return self.plotted

    def write(self) -> list[Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        document = json.dumps(_finite(self.report), indent=2, allow_nan=False)
        (self.out / "report.json").write_text(document + "\n")
        (self.out / "report.md").write_text(markdown(self.report))
        paths = [self.out / "report.md", self.out / "report.json"]
        return [*paths, self.out / "density.png"] if self.plotted else paths


def _finite(value: Any) -> Any:
    """``value`` for standard JSON, where a number that is not finite becomes ``null``.

    (An undefined standard error, of one probe, is NaN in the report.)
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
