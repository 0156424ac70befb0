"""The Hessian report: a plan, then top eigenvalues, trace, spectral density and a per-layer table.

:func:`make_plan` counts the Hessian-vector products of every stage before any work;
:func:`hessian_report` times one product, prints the plan with estimated times, runs the stages
over one :class:`~torch_secorder.HessianOperator` with a progress bar per stage, and writes
``report.md`` and ``report.json`` (and ``density.png``) after every stage, so that a failure or
an interruption in a later stage keeps what the earlier ones found.
"""

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.analysis import (
    hessian_trace,
    plot_spectral_density,
    spectral_density,
    top_eigenvalues,
)
from torch_secorder.analysis._driver import run
from torch_secorder.analysis._eigensolvers import default_max_matvecs, eigen_steps
from torch_secorder.analysis._estimators import estimator_steps
from torch_secorder.analysis._groups import ROOT, group_problems, module_groups
from torch_secorder.core.operator import HessianOperator
from torch_secorder.core.params import select_params

STAGES = ("top eigenvalues", "trace", "spectral density", "per-layer")
PER_LAYER = ("auto", "all", "trace", "none")
AUTO_FACTOR = 2
"""``per_layer="auto"`` runs the per-layer table when its products are at most this many times
those of the whole-model stages (both counted at their budgets): with top eigenvalues if they
fit, else traces only, else not at all."""
LAYER_TOL = 1e-4
"""Relative residual tolerance of each module's top eigenvalue (the default of
:func:`~torch_secorder.top_eigenvalues`)."""
LAYER_EIGEN_BUDGET = default_max_matvecs("lanczos", 1, "largest")
"""Most products of one module's top eigenvalue."""


class StageFailed(Exception):
    """A stage raised; the report of the stages before it has been written.

    Attributes:
        stage: The stage's name.
        error: What it raised.
        paths: The files written.
    """

    def __init__(self, stage: str, error: BaseException, paths: list[Path]) -> None:
        self.stage, self.error, self.paths = stage, error, paths
        super().__init__(f"stage {stage!r} failed: {_one_line(error)}")


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage; the report of the stages before it has been written."""

    def __init__(self, stage: str, paths: list[Path]) -> None:
        self.stage, self.paths = stage, paths
        super().__init__(stage)


@dataclass
class Plan:
    """What the report will compute, and what each stage costs in products.

    Attributes:
        size: Parameters analysed.
        tensors: Parameter tensors analysed.
        groups: Module name -> indices into the selected parameters (``"(root)"`` for the
            model's own).
        sizes: Sizes of the selected parameters, in order.
        k: Top eigenvalues of the whole model.
        trace_matvecs: Hutch++ budget of the whole-model trace.
        layer_matvecs: Hutch++ budget of each module's trace.
        probes: Spectral density probes.
        steps: Lanczos steps per probe (at most ``size``).
        requested: The per-layer choice asked for (``"auto"``, ``"all"``, ``"trace"``,
            ``"none"``).
        per_layer: The per-layer choice made (``"all"``, ``"trace"`` or ``"none"``).
        layer_costs: Products of the per-layer table with (``"all"``) and without
            (``"trace"``) each module's top eigenvalue; the eigenvalues at their budget.
        products: Products per stage, at most (Lanczos stops once converged); 0 when skipped.
    """

    size: int
    tensors: int
    groups: dict[str, list[int]]
    sizes: list[int]
    k: int
    trace_matvecs: int
    layer_matvecs: int
    probes: int
    steps: int
    requested: str
    per_layer: str
    layer_costs: dict[str, int]
    products: dict[str, int]

    @property
    def whole_products(self) -> int:
        """Products of the whole-model stages, at most."""
        return sum(self.products[stage] for stage in STAGES[:3])


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
) -> Plan:
    """Count the products of every stage and choose the per-layer table (a rule of sizes).

    Args:
        model: The model.
        params: Parameter selection (names or glob patterns; ``None``: all trainable).
        k: Number of top eigenvalues.
        trace_matvecs: Hutch++ budget for the trace.
        layer_matvecs: Hutch++ budget for each module's trace (default ``trace_matvecs``).
        probes: Stochastic Lanczos quadrature probes for the density.
        steps: Lanczos steps per density probe.
        per_layer: ``"all"`` (each module's trace and top eigenvalue), ``"trace"``,
            ``"none"``, or ``"auto"``: ``"all"`` when its products are at most
            :data:`AUTO_FACTOR` times those of the whole-model stages, else ``"trace"`` when
            that fits, else ``"none"``.

    Returns:
        The plan.

    Raises:
        TypeError, ValueError: From :func:`~torch_secorder.select_params`.
        ValueError: On an unknown ``per_layer``.
    """
    if per_layer not in PER_LAYER:
        raise ValueError(f"per_layer must be one of {', '.join(PER_LAYER)}; got {per_layer!r}")
    selected = select_params(model, params)
    tensors = list(selected.values())
    sizes = [p.numel() for p in tensors]
    size = sum(sizes)
    groups = module_groups(model, tensors)
    layer_matvecs = trace_matvecs if layer_matvecs is None else layer_matvecs
    products = {
        "top eigenvalues": default_max_matvecs("lanczos", min(k, size), "largest"),
        "trace": hutch_plus_plus_products(size, trace_matvecs),
        "spectral density": probes * min(steps, size),
    }
    layer_trace = sum(
        hutch_plus_plus_products(sum(sizes[i] for i in indices), layer_matvecs)
        for indices in groups.values()
    )
    costs = {"all": layer_trace + len(groups) * LAYER_EIGEN_BUDGET, "trace": layer_trace}
    chosen = per_layer
    if per_layer == "auto":
        limit = AUTO_FACTOR * sum(products.values())
        chosen = next((mode for mode in ("all", "trace") if costs[mode] <= limit), "none")
    products["per-layer"] = costs.get(chosen, 0)
    return Plan(
        size=size,
        tensors=len(tensors),
        groups=groups,
        sizes=sizes,
        k=min(k, size),
        trace_matvecs=trace_matvecs,
        layer_matvecs=layer_matvecs,
        probes=probes,
        steps=min(steps, size),
        requested=per_layer,
        per_layer=chosen,
        layer_costs=costs,
        products=products,
    )


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan_lines(plan: Plan, seconds_per_product: float | None) -> list[str]:
    """The plan as lines of text, with times estimated from one product's time."""

    def cost(products: int, at_most: bool) -> str:
        bound = "at most " if at_most else ""
        text = f"{bound}{products} products"
        if seconds_per_product is not None:
            text += f", {bound}{_duration(products * seconds_per_product)}"
        return text

    what = {
        "top eigenvalues": f"k={plan.k}, Lanczos: stops once converged, usually far sooner",
        "trace": f"Hutch++, budget {plan.trace_matvecs}",
        "spectral density": f"{plan.probes} probes x {plan.steps} Lanczos steps",
    }
    modules = f"{len(plan.groups)} modules"
    lines = [f"Plan: {plan.size} parameters in {plan.tensors} tensors, {modules}."]
    if seconds_per_product is not None:
        lines.append(
            f"One Hessian-vector product over the data took {seconds_per_product:.3g} s (timed "
            "before the stages); the times below are products times that."
        )
    for index, stage in enumerate(STAGES[:3], 1):
        at_most = stage == "top eigenvalues"
        lines.append(f"  {index}. {stage}: {cost(plan.products[stage], at_most)} ({what[stage]})")
    all_cost = cost(plan.layer_costs["all"], True)
    trace_cost = cost(plan.layer_costs["trace"], False)
    if plan.per_layer == "none":
        why = "--per-layer none" if plan.requested == "none" else "--per-layer auto"
        lines.append(
            f"  4. per-layer: skipped ({why}); for {modules} it would take {all_cost} with "
            f"--per-layer all, {trace_cost} with --per-layer trace"
        )
    else:
        detail = "trace and top eigenvalue" if plan.per_layer == "all" else "trace"
        at_most = plan.per_layer == "all"
        lines.append(
            f"  4. per-layer: {cost(plan.products['per-layer'], at_most)} ({modules}: each "
            f"module's {detail}; Hutch++ budget {plan.layer_matvecs} per module)"
        )
    total = sum(plan.products.values())
    lines.append(f"Total: {cost(total, True)}.")
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
    """Time one product, show the plan, run its stages and write the report after each.

    Args:
        model: The model, in the mode to analyse.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        data: An ``(inputs, targets)`` batch or a re-iterable collection of batches.
        out: Folder for ``report.md``, ``report.json`` and ``density.png``.
        plan: From :func:`make_plan` with the same ``model`` and ``params``.
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
        report["plan"] = _plan_json(plan, seconds_per_product)
        for line in plan_lines(plan, seconds_per_product):
            say(line)
        writer.write()
        stages = [s for s in STAGES if s != "per-layer" or plan.per_layer != "none"]
        for index, stage in enumerate(stages, 1):
            say(f"[{index}/{len(stages)}] {stage} ...")
            bar = _bar(progress, stage, plan.products[stage])
            counted = _Counted(operator, bar)
            start = time.perf_counter()
            try:
                section, used = _run_stage(stage, counted, plan, model, seed)
            except KeyboardInterrupt:
                _status(report, stage, "interrupted")
                raise StageInterrupted(stage, writer.write()) from None
            except Exception as err:
                _status(report, stage, "failed")
                report["failed"] = {"stage": stage, "error": _one_line(err)}
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
            report[_KEYS[stage]] = section
            _status(report, stage, "done")
            paths = writer.write()
            say(f"    {used} products in {_duration(elapsed)}; written to {paths[0]}")
    report["complete"] = True
    return writer.write()


_KEYS = {
    "top eigenvalues": "top_eigenvalues",
    "trace": "trace",
    "spectral density": "spectral_density",
    "per-layer": "per_layer",
}


def _plan_json(plan: Plan, seconds_per_product: float) -> dict[str, Any]:
    status = {stage: "pending" for stage in STAGES}
    if plan.per_layer == "none":
        status["per-layer"] = "skipped"
    return {
        "seconds_per_product": round(seconds_per_product, 4),
        "per_layer": {
            "requested": plan.requested,
            "chosen": plan.per_layer,
            "products_all": plan.layer_costs["all"],
            "products_trace": plan.layer_costs["trace"],
        },
        "stages": [
            {
                "stage": stage,
                "products": plan.products[stage],
                "at_most": stage == "top eigenvalues"
                or (stage == "per-layer" and plan.per_layer == "all"),
                "estimated_seconds": round(plan.products[stage] * seconds_per_product, 1),
                "status": status[stage],
            }
            for stage in STAGES
        ],
    }


def _status(report: dict[str, Any], stage: str, status: str) -> None:
    for entry in report["plan"]["stages"]:
        if entry["stage"] == stage:
            entry["status"] = status


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _run_stage(
    stage: str, operator: _Counted, plan: Plan, model: nn.Module, seed: int
) -> tuple[Any, int]:
    """Run one stage on the operator; return its report section and the products it used."""
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
        trace = hessian_trace(operator, num_matvecs=plan.trace_matvecs, generator=generator)
        section = {
            "value": float(trace.value),
            "stderr": float(trace.stderr),
            "method": "hutch++",
            "num_matvecs": trace.num_matvecs,
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
    rows = per_layer_rows(operator, plan, model, seed)
    return rows, sum(row["num_matvecs"] for row in rows)


def per_layer_rows(operator: Any, plan: Plan, model: nn.Module, seed: int) -> list[dict[str, Any]]:
    """Each module's trace (and top eigenvalue), all modules in one lockstep run.

    The traces are those of :func:`~torch_secorder.model_hessian_trace` with
    ``groups="module"`` and the top eigenvalues those of
    :func:`~torch_secorder.model_top_eigenvalues` (both with a generator seeded ``seed``),
    but all their products run together.
    """
    budget = plan.layer_matvecs

    def trace_problem(n: int, dtype: Any, device: Any, gen: Any, span: int) -> Any:
        return estimator_steps("hutch++", n, budget, dtype, device, gen, span=span)

    def eigen_problem(n: int, dtype: Any, device: Any, gen: Any, span: int) -> Any:
        return eigen_steps(
            "lanczos", n, 1, "largest", LAYER_TOL, LAYER_EIGEN_BUDGET, dtype, device, gen
        )

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    groups, sizes = plan.groups, plan.sizes
    traces = group_problems(operator, sizes, groups, generator(), trace_problem)
    tops = (
        group_problems(operator, sizes, groups, generator(), eigen_problem)
        if plan.per_layer == "all"
        else [None] * len(groups)
    )
    run("per-layer", operator, traces + [p for p in tops if p is not None])
    modules = dict(model.named_modules())
    rows = []
    for (name, indices), trace, top in zip(groups.items(), traces, tops):
        value, stderr = trace.result
        module = model if name == ROOT else modules[name]
        rows.append(
            {
                "module": name,
                "type": type(module).__name__,
                "parameters": sum(sizes[i] for i in indices),
                "trace": float(value),
                "trace_stderr": float(stderr),
                "top_eigenvalue": None if top is None else float(top.result.values[0]),
                "converged": None if top is None else top.result.converged,
                "num_matvecs": trace.num_matvecs + (0 if top is None else top.num_matvecs),
            }
        )
    return rows


class _Writer:
    """Writes the report as it grows."""

    def __init__(self, out: Path, report: dict[str, Any]) -> None:
        self.out, self.report = out, report
        self.plotted = False

    def plot(self, density: Any) -> None:
        try:
            plot_spectral_density(density, log=True, path=self.out / "density.png")
        except ImportError as err:
            self.report["spectral_density_plot"] = f"not written: {_one_line(err)}"
        else:
            self.plotted = True

    def write(self) -> list[Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (self.out / "report.md").write_text(markdown(self.report))
        paths = [self.out / "report.md", self.out / "report.json"]
        return [*paths, self.out / "density.png"] if self.plotted else paths


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    """Format the report, finished or not, as Markdown."""
    plan = report.get("plan", {})
    status = {entry["stage"]: entry["status"] for entry in plan.get("stages", [])}
    seconds = report["seconds"]
    lines = ["# Hessian report", ""]
    if "failed" in report:
        failed = report["failed"]
        lines += [
            f"**Stage '{failed['stage']}' failed** ({failed['error']}); the stages before it "
            "are complete.",
            "",
        ]
    elif not report.get("complete") and plan:
        pending = [stage for stage, state in status.items() if state in ("pending", "interrupted")]
        lines += [f"**Incomplete**: not finished: {', '.join(pending)}.", ""]
    lines += [
        *[f"- {key}: {value}" for key, value in report["setup"].items()],
        f"- parameters analysed: {report['parameters']['count']} "
        f"in {report['parameters']['tensors']} tensors "
        f"({report['parameters']['modules']} modules)",
        f"- Hessian-vector products: {report['num_matvecs']} "
        f"(each a pass over the data set), {sum(seconds.values()):.1f} s",
        "",
    ]
    lines += _eigen_section(report.get("top_eigenvalues"), status.get("top eigenvalues"))
    lines += _trace_section(report.get("trace"), status.get("trace"))
    lines += _density_section(report, status.get("spectral density"))
    lines += _per_layer_section(report.get("per_layer"), status.get("per-layer"), plan)
    if plan:
        lines += ["## Plan and time", ""]
        lines.append(
            f"One product over the data took {plan['seconds_per_product']:.3g} s, timed before "
            "the stages; estimates are products times that."
        )
        lines += ["", "| stage | products planned | estimated | status | products used | time |"]
        lines.append("|---|---:|---:|---|---:|---:|")
        for entry in plan["stages"]:
            stage = entry["stage"]
            bound = "≤ " if entry["at_most"] else ""
            used = report.get(_KEYS[stage], {})
            count = (
                sum(row["num_matvecs"] for row in used)
                if isinstance(used, list)
                else used.get("num_matvecs", "")
            )
            time_used = f"{seconds[stage]:.2f} s" if stage in seconds else ""
            lines.append(
                f"| {stage} | {bound}{entry['products']} | "
                f"{bound}{_duration(entry['estimated_seconds'])} | {entry['status']} | "
                f"{count} | {time_used} |"
            )
        lines.append("")
    return "\n".join(lines)


def _missing(title: str, state: str | None) -> list[str]:
    return [f"## {title}", "", f"Not computed ({state or 'pending'}).", ""]


def _eigen_section(eig: dict[str, Any] | None, state: str | None) -> list[str]:
    if eig is None:
        return _missing("Top eigenvalues", state)
    return [
        "## Top eigenvalues",
        "",
        "Thick-restart Lanczos; residual is ||Hv - λv||"
        + ("." if eig["converged"] else "; NOT converged within the budget."),
        "",
        "| # | eigenvalue | residual |",
        "|---:|---:|---:|",
        *[
            f"| {i + 1} | {value:.6g} | {residual:.2e} |"
            for i, (value, residual) in enumerate(zip(eig["eigenvalues"], eig["residuals"]))
        ],
        "",
        f"{eig['num_matvecs']} products.",
        "",
    ]


def _trace_section(trace: dict[str, Any] | None, state: str | None) -> list[str]:
    if trace is None:
        return _missing("Trace", state)
    return [
        "## Trace",
        "",
        f"tr(H) = {trace['value']:.6g} ± {_number(trace['stderr'], '.2g')} (standard error; "
        f"Hutch++, {trace['num_matvecs']} products).",
        "",
    ]


def _density_section(report: dict[str, Any], state: str | None) -> list[str]:
    dens = report.get("spectral_density")
    if dens is None:
        return _missing("Spectral density", state)
    plot = report.get("spectral_density_plot")
    picture = f"(density.png {plot})" if plot else f"![Spectral density]({dens['plot']})"
    return [
        "## Spectral density",
        "",
        f"Stochastic Lanczos quadrature, {dens['probes']} probes x {dens['steps']} steps "
        f"({dens['num_matvecs']} products); Ritz nodes span "
        f"[{dens['lowest_node']:.4g}, {dens['highest_node']:.4g}].",
        "",
        picture,
        "",
    ]


def _per_layer_section(
    rows: list[dict[str, Any]] | None, state: str | None, plan: dict[str, Any]
) -> list[str]:
    if rows is None:
        if state == "skipped":
            costs = plan["per_layer"]
            return [
                "## Per layer",
                "",
                f"Skipped (--per-layer {costs['requested']}): it would take at most "
                f"{costs['products_all']} products with --per-layer all, "
                f"{costs['products_trace']} with --per-layer trace.",
                "",
            ]
        return _missing("Per layer", state)
    with_top = plan["per_layer"]["chosen"] == "all"
    root = any(row["module"] == ROOT for row in rows)
    lines = [
        "## Per layer",
        "",
        "Each module's own diagonal block of the Hessian (Hutch++ trace"
        + (", Lanczos top eigenvalue" if with_top else "")
        + "), all modules analysed together"
        + (f"; {ROOT} holds the parameters the model owns itself." if root else "."),
        "",
        "| module | type | parameters | trace | ± | top eigenvalue | products |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        top = _number(row["top_eigenvalue"], ".6g")
        if row["converged"] is False:
            top += " (not converged)"
        lines.append(
            f"| {row['module']} | {row['type']} | {row['parameters']} | {row['trace']:.6g} | "
            f"{_number(row['trace_stderr'], '.2g')} | {top} | {row['num_matvecs']} |"
        )
    lines.append("")
    return lines
