"""The Hessian report as Markdown, from its JSON form (finished or not)."""

import math
from typing import Any

ROOT = "(root)"
"""How the tables show the model itself (its module name is empty)."""


def duration(seconds: float) -> str:
    """Seconds as text in s, min or h."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def one_line(err: BaseException) -> str:
    """An exception's type and the first line of its message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return "n/a" if math.isnan(value) else format(value, spec)


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
    lines += _per_layer_section(report.get("per_layer"), status, plan)
    if "activation traces" in status:
        lines += _activation_section(report.get("activations"), status)
    if plan:
        lines += _plan_section(plan, seconds)
    return "\n".join(lines)


def _plan_section(plan: dict[str, Any], seconds: dict[str, float]) -> list[str]:
    lines = ["## Plan and time", ""]
    lines.append(
        f"One product over the data took {plan['seconds_per_product']:.3g} s, timed before "
        "the stages; estimates are products times that."
    )
    activations = plan.get("activations")
    if activations and activations.get("seconds_per_product") is not None:
        lines.append(
            f"One product with respect to the activations took "
            f"{activations['seconds_per_product']:.3g} s; the activation stages are estimated "
            "from that."
        )
    diagonal = plan.get("exact_diagonal", {})
    if diagonal.get("products") is not None:
        lines.append(
            f"The exact diagonal, planned on the first batch, takes {diagonal['products']} "
            "products; a trace is exact (a sum of it, computed once for all exact traces) "
            "where that costs no more than its budget, else Hutch++."
        )
    elif diagonal.get("note"):
        lines.append(f"Every trace by Hutch++: {diagonal['note']}.")
    lines += [
        "",
        "| stage | method | products planned | estimated | status | products used | time |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for entry in plan["stages"]:
        stage = entry["stage"]
        bound = "≤ " if entry["at_most"] else ""
        skipped = entry["status"] == "skipped"
        planned = "-" if skipped else f"{bound}{entry['products']}"
        estimate = "-" if skipped else f"{bound}{duration(entry['estimated_seconds'])}"
        time_used = f"{seconds[stage]:.2f} s" if stage in seconds else ""
        lines.append(
            f"| {stage} | {entry['method']} | {planned} | {estimate} | {entry['status']} | "
            f"{entry.get('products_used', '')} | {time_used} |"
        )
    lines.append("")
    lines += [f"{index}. {entry['stage']}: {entry['detail']}." for index, entry in
              enumerate(plan["stages"], 1)]  # fmt: skip
    lines.append("")
    return lines


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
    if trace["method"] == "exact":
        text = (
            f"tr(H) = {trace['value']:.6g}, exact: the sum of the exact diagonal "
            f"({trace['num_matvecs']} products)."
        )
    elif trace["stderr"] is None or math.isnan(trace["stderr"]):  # (a single probe)
        text = (
            f"tr(H) = {trace['value']:.6g} (Hutch++, {trace['num_matvecs']} products: one "
            "probe, no standard error"
        )
    else:
        text = (
            f"tr(H) = {trace['value']:.6g} ± {trace['stderr']:.2g} (standard error; "
            f"Hutch++, {trace['num_matvecs']} products"
        )
    if trace["method"] != "exact":
        exact = trace.get("exact_diagonal_products")
        text += f"; the exact diagonal would take {exact})." if exact is not None else ")."
    return ["## Trace", "", text, ""]


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
    rows: list[dict[str, Any]] | None, status: dict[str, str], plan: dict[str, Any]
) -> list[str]:
    traces, tops = status.get("per-layer traces"), status.get("per-layer top eigenvalues")
    if rows is None:
        if traces == "skipped":
            costs = plan["per_layer"]
            return [
                "## Per layer",
                "",
                f"Skipped (--per-layer {costs['requested']}): the modules' traces would take "
                f"{costs['products_trace']} products, with their top eigenvalues at most "
                f"{costs['products_all']}.",
                "",
            ]
        return _missing("Per layer", traces)
    methods = {row["trace_method"] for row in rows}
    how = _trace_methods(methods)
    if tops == "done":
        how += ", Lanczos top eigenvalues"
    elif tops == "skipped":
        how += f"; top eigenvalues skipped (--per-layer {plan['per_layer']['requested']})"
    else:
        how += f"; top eigenvalues not computed ({tops or 'pending'})"
    root = any(row["module"] == "" for row in rows)
    lines = [
        "## Per layer",
        "",
        f"Each module's own diagonal block of the Hessian: {how}"
        + (f"; {ROOT} holds the parameters the model owns itself." if root else ".")
        + (
            " An exact trace's products are its parameters' share of the exact diagonal."
            if "exact" in methods
            else ""
        ),
        "",
        "| module | type | parameters | trace | ± | method | top eigenvalue | products |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        top = _number(row["top_eigenvalue"], ".6g")
        if row["converged"] is False:
            top += " (not converged)"
        exact = row["trace_method"] == "exact"
        error = "" if exact else _number(row["trace_stderr"], ".2g")
        lines.append(
            f"| {row['module'] or ROOT} | {row['type']} | {row['parameters']} | "
            f"{row['trace']:.6g} | {error} | {'exact' if exact else 'Hutch++'} | {top} | "
            f"{row['num_matvecs']} |"
        )
    lines.append("")
    return lines


def _trace_methods(methods: set[str]) -> str:
    """How a table's traces were computed, for its introduction."""
    return " and ".join(
        text
        for method, text in (
            ("exact", "exact traces (sums of the exact diagonal; no ±)"),
            ("hutch++", "Hutch++ traces (± their standard errors)"),
        )
        if method in methods
    )


def _activation_section(rows: list[dict[str, Any]] | None, status: dict[str, str]) -> list[str]:
    traces, tops = status.get("activation traces"), status.get("activation top eigenvalues")
    if rows is None:
        return _missing("Activations", traces)
    methods = {row["trace_method"] for row in rows}
    how = _trace_methods(methods)
    if tops == "done":
        how += ", Lanczos top eigenvalues"
    else:
        how += f"; top eigenvalues not computed ({tops or 'pending'})"
    lines = [
        "## Activations",
        "",
        "The Hessian of the loss with respect to each module's output, parameters held fixed "
        "(the model split at the module, all curvature after it): how sensitive the loss is "
        "to perturbing that layer's activations, as HAWQ ranks layers for quantization. Over "
        "the data set it is block diagonal over the batches, and over the samples where they "
        "are independent: its trace is then the mean over the samples of their own traces, "
        "and its top eigenvalue the largest of the samples' own divided by their number. "
        "Per output is the trace divided by the module's outputs per sample.",
        "",
        f"{how[0].upper()}{how[1:]}.",
        "",
        "| module | type | outputs per sample | trace | ± | method | per output | "
        "top eigenvalue | products |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        top = _number(row["top_eigenvalue"], ".6g")
        if row["converged"] is False:
            top += " (not converged)"
        exact = row["trace_method"] == "exact"
        error = "" if exact else _number(row["trace_stderr"], ".2g")
        per_sample = row["entries_per_sample"]
        lines.append(
            f"| {row['module'] or ROOT} | {row['type']} | "
            f"{'-' if per_sample is None else per_sample} | {row['trace']:.6g} | {error} | "
            f"{'exact' if exact else 'Hutch++'} | "
            f"{_number(row['trace_per_entry'], '.4g')} | {top} | {row['num_matvecs']} |"
        )
    lines.append("")
    return lines
