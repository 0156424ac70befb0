"""The Hessian report: a plan, then top eigenvalues, trace, spectral density and per-layer tables.

:func:`make_plan` counts the Hessian-vector products of every stage before any work, pricing
the traces with Hutch++; :func:`hessian_report` times one product, plans the exact diagonal on
the first batch (:func:`price_plan`: the traces whose exact value costs no more than their
budget become sums of the exact diagonal, computed once for all of them), prints the plan with
each stage's method, products and estimated time, runs the stages over one
:class:`~torch_secorder.HessianOperator` with a progress bar per stage, and writes
``report.md`` and ``report.json`` (and ``density.png``) after every stage, so that a failure or
an interruption in a later stage keeps what the earlier ones found.
"""

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder._report_markdown import duration, markdown, one_line
from torch_secorder.analysis import (
    hessian_trace,
    plot_spectral_density,
    spectral_density,
    top_eigenvalues,
)
from torch_secorder.analysis._driver import Problem, run
from torch_secorder.analysis._eigensolvers import default_max_matvecs, eigen_steps
from torch_secorder.analysis._estimators import estimator_steps
from torch_secorder.analysis._groups import ROOT, group_problems, module_groups, rows_of
from torch_secorder.analysis._sampling import make_generator, spawn
from torch_secorder.core.operator import (
    HessianOperator,
    exact_diagonal,
    forget_plan,
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
class Plan:
    """What the report will compute, by which method, and what each stage costs in products.

    Attributes:
        size: Parameters analysed.
        tensors: Parameter tensors analysed.
        names: Their names, in model order.
        groups: Module name -> indices into the selected parameters (``"(root)"`` for the
            model's own).
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
    probes: int = 4,
    steps: int = 100,
    per_layer: str = "auto",
    diagonal: list[int] | None = None,
    subset_products: Callable[[list[str]], int] | None = None,
) -> Plan:
    """Count the products of every stage, choose the traces' methods and the per-layer stages.

    Without ``diagonal`` every trace is priced as Hutch++ (a rule of sizes, before any data is
    seen); :func:`price_plan` plans the exact diagonal and makes the plan again with it.

    With ``diagonal``, the whole-model trace is exact when the whole diagonal costs at most
    ``trace_matvecs``; then every module's trace is exact too, a sum of the same diagonal at no
    further cost. Otherwise a module's trace is exact when its parameters' share of the
    diagonal costs at most ``layer_matvecs``, computed as one diagonal of those modules'
    parameters, and Hutch++ else; when that takes every module (the whole diagonal) and the
    per-layer traces run, the whole-model trace, which runs first, computes it and is exact
    as well.

    Args:
        model: The model.
        params: Parameter selection (names or glob patterns; ``None``: all trainable).
        k: Number of top eigenvalues.
        trace_matvecs: Budget of the whole-model trace.
        layer_matvecs: Budget of each module's trace (default ``trace_matvecs``).
        probes: Stochastic Lanczos quadrature probes for the density.
        steps: Lanczos steps per density probe.
        per_layer: ``"all"`` (each module's trace and top eigenvalue), ``"trace"``,
            ``"none"``, or ``"auto"``: the traces when their products are at most
            :data:`AUTO_FACTOR` times those of the whole-model stages, with the top
            eigenvalues when traces and eigenvalues together fit, else ``"none"``.
        diagonal: Planned products of the exact diagonal per selected parameter.
        subset_products: ``subset_products(modules)``, the planned products of the exact
            diagonal of those modules' parameters (default: the sum of their shares of
            ``diagonal``).

    Returns:
        The plan.

    Raises:
        TypeError, ValueError: From :func:`~torch_secorder.select_params`.
        ValueError: On an unknown ``per_layer``, or a ``diagonal`` of another length.
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
    plan = Plan(
        size=sum(sizes),
        tensors=len(tensors),
        names=names,
        groups=module_groups(model, tensors),
        sizes=sizes,
        k=min(k, sum(sizes)),
        trace_matvecs=trace_matvecs,
        layer_matvecs=trace_matvecs if layer_matvecs is None else layer_matvecs,
        probes=probes,
        steps=min(steps, sum(sizes)),
        requested=per_layer,
        per_layer="none",
        diagonal=diagonal,
        subset=None,
        trace_method=HUTCH,
        layer_methods={},
        layer_costs={},
        products={},
    )
    return _choose(plan, subset_products)


def _choose(plan: Plan, subset_products: Callable[[list[str]], int] | None) -> Plan:
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
    plan = replace(plan, layer_methods=layer_methods, subset=None)
    exact = plan.exact_modules()
    hutch = sum(
        hutch_plus_plus_products(sum(plan.sizes[i] for i in groups[name]), plan.layer_matvecs)
        for name in groups
        if layer_methods[name] == HUTCH
    )
    everything = len(exact) == len(groups)
    layer_trace = hutch
    if exact and not whole_exact and everything:
        layer_trace += total
    elif exact and not whole_exact and subset_products and plan.requested != "none":
        layer_trace += subset_products(exact)  # a plan of that selection
    elif exact and not whole_exact:
        layer_trace += sum(plan.share(name) for name in exact)
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
    return replace(
        plan,
        per_layer=chosen,
        trace_method=trace_method,
        subset=subset,
        layer_costs=costs,
        products=products,
    )


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

    def subset_products(modules: list[str]) -> int:
        names = module_names(plan, modules)
        with HessianOperator.from_model(model, loss_fn, data, params=names) as subset:
            return sum(planned_diagonal_costs(subset))

    try:
        diagonal = planned_diagonal_costs(operator, budget)
        forget_plan(operator)
        return _choose(replace(plan, diagonal=diagonal), subset_products)
    except Exception as err:  # the report goes on with Hutch++, and says why
        forget_plan(operator)
        return replace(plan, note=f"the exact diagonal could not be planned ({one_line(err)})")


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
    return methods


def at_most(stage: str) -> bool:
    """Whether the stage's products are a bound (Lanczos stops once converged)."""
    return stage in ("top eigenvalues", "per-layer top eigenvalues")


def plan_lines(plan: Plan, seconds_per_product: float | None) -> list[str]:
    """The plan as lines of text, with times estimated from one product's time."""

    def cost(products: int, bound: bool) -> str:
        word = "at most " if bound else ""
        text = f"{word}{products} products"
        if seconds_per_product is not None:
            text += f", {word}{duration(products * seconds_per_product)}"
        return text

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
    for index, (stage, (method, detail, skipped)) in enumerate(stage_methods(plan).items(), 1):
        if skipped:
            lines.append(f"  {index}. {stage}: skipped ({detail})")
        elif stage == "per-layer traces" and plan.products[stage] == 0:
            lines.append(f"  {index}. {stage}: {method}, no further products ({detail})")
        else:
            products = cost(plan.products[stage], at_most(stage))
            lines.append(f"  {index}. {stage}: {method}, {products} ({detail})")
    lines.append(f"Total: {cost(sum(plan.products.values()), True)}.")
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
) -> list[Path]:
    """Time one product, plan the exact diagonal, show the plan, run its stages, write after each.

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

    Returns:
        The files written.

    Raises:
        StageFailed: If a stage raised (the finished stages are written).
        StageInterrupted: On Ctrl-C during a stage (the finished stages are written).
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
    operator = HessianOperator.from_model(model, loss_fn, data, params=params)
    with operator:
        seconds_per_product = time_one_product(operator, seed)
        if plan.diagonal is None and plan.note is None:
            plan = price_plan(plan, operator, model, loss_fn, data)
        report["plan"] = _plan_json(plan, seconds_per_product)
        for line in plan_lines(plan, seconds_per_product):
            say(line)
        writer.write()
        shared = _Stages(operator, plan, model, loss_fn, data, seed)
        stages = [s for s in STAGES if _status_of(report, s) == "pending"]
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
                writer.plot(density)
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
}
"""The key of each stage's section in ``report.json``; the per-layer stages share a table."""


def _plan_json(plan: Plan, seconds_per_product: float) -> dict[str, Any]:
    methods = stage_methods(plan)
    return {
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
                "estimated_seconds": round(plan.products[stage] * seconds_per_product, 1),
                "status": "skipped" if methods[stage][2] else "pending",
            }
            for stage in STAGES
        ],
    }


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
    shared.rows, used = layer_top_eigenvalues(shared, operator)
    return shared.rows, used


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
        module = shared.model if name == ROOT else modules[name]
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

    def eigen_problem(n: int, dtype: Any, device: Any, gen: Any, span: int) -> Any:
        return eigen_steps(
            "lanczos", n, 1, "largest", LAYER_TOL, LAYER_EIGEN_BUDGET, dtype, device, gen
        )

    generator = torch.Generator().manual_seed(shared.seed)
    tops = group_problems(operator, plan.sizes, plan.groups, generator, eigen_problem)
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

    def plot(self, density: Any) -> None:
        try:
            plot_spectral_density(density, log=True, path=self.out / "density.png")
        except ImportError as err:
            self.report["spectral_density_plot"] = f"not written: {one_line(err)}"
        else:
            self.plotted = True

    def write(self) -> list[Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (self.out / "report.md").write_text(markdown(self.report))
        paths = [self.out / "report.md", self.out / "report.json"]
        return [*paths, self.out / "density.png"] if self.plotted else paths
