"""The Hessian report: top eigenvalues, trace, spectral density and a per-layer table.

:func:`hessian_report` runs the analyses of :mod:`torch_secorder.analysis` on a model and a
data set and returns a JSON-ready dict; :func:`write_report` writes it as ``report.md``,
``report.json`` and ``density.png`` into a folder.
"""

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torch_secorder.analysis import (
    model_hessian_trace,
    model_spectral_density,
    model_top_eigenvalues,
    plot_spectral_density,
)
from torch_secorder.core.params import select_params

STAGES = ("top eigenvalues", "trace", "spectral density", "per-layer")


@contextmanager
def _stage(report: dict[str, Any], name: str, progress: Any) -> Iterator[None]:
    if progress is not None:
        progress.set_description(name)
    start = time.perf_counter()
    yield
    report["seconds"][name] = round(time.perf_counter() - start, 3)
    if progress is not None:
        progress.update()


def hessian_report(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    params: Any = None,
    k: int = 5,
    trace_matvecs: int = 100,
    probes: int = 4,
    steps: int = 100,
    seed: int = 0,
    progress: Any = None,
) -> tuple[dict[str, Any], Any]:
    """Run the analyses and collect their results.

    Args:
        model: The model, in the mode to analyse.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        data: An ``(inputs, targets)`` batch or a re-iterable collection of batches.
        params: Parameter selection (names or glob patterns; ``None``: all trainable).
        k: Number of top eigenvalues.
        trace_matvecs: Hutch++ budget for the trace (and per layer).
        probes: Stochastic Lanczos quadrature probes for the density.
        steps: Lanczos steps per density probe.
        seed: Seed of the analyses' private random generators.
        progress: A tqdm bar to advance per stage, or ``None``.

    Returns:
        The report as a JSON-ready dict, and the :class:`DensityResult` for the plot.
    """
    selected = select_params(model, params)
    size = sum(p.numel() for p in selected.values())
    common = {"params": params}
    report: dict[str, Any] = {
        "parameters": {"count": size, "tensors": len(selected)},
        "seconds": {},
    }

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    with _stage(report, "top eigenvalues", progress):
        eigen = model_top_eigenvalues(
            model, loss_fn, data, k=min(k, size), generator=generator(), **common
        )
        report["top_eigenvalues"] = {
            "eigenvalues": eigen.eigenvalues.tolist(),
            "residuals": eigen.residuals.tolist(),
            "converged": eigen.converged,
            "num_matvecs": eigen.num_matvecs,
        }
    with _stage(report, "trace", progress):
        trace = model_hessian_trace(
            model, loss_fn, data, num_matvecs=trace_matvecs, generator=generator(), **common
        )
        report["trace"] = {
            "value": float(trace.value),
            "stderr": float(trace.stderr),
            "method": "hutch++",
            "num_matvecs": trace.num_matvecs,
        }
    with _stage(report, "spectral density", progress):
        density = model_spectral_density(
            model,
            loss_fn,
            data,
            num_matvecs=probes * min(steps, size),
            num_probes=probes,
            generator=generator(),
            **common,
        )
        report["spectral_density"] = {
            "plot": "density.png",
            "probes": probes,
            "steps": density.nodes.shape[-1],
            "lowest_node": float(density.nodes.min()),
            "highest_node": float(density.nodes.max()),
            "num_matvecs": density.num_matvecs,
        }
    with _stage(report, "per-layer", progress):
        traces = model_hessian_trace(
            model,
            loss_fn,
            data,
            groups="module",
            num_matvecs=trace_matvecs,
            generator=generator(),
            **common,
        )
        tops = model_top_eigenvalues(
            model, loss_fn, data, groups="module", generator=generator(), **common
        )
        modules = dict(model.named_modules())
        report["per_layer"] = [
            {
                "module": name,
                "type": type(modules[name]).__name__,
                "parameters": sum(
                    p.numel() for n, p in selected.items() if n.rpartition(".")[0] == name
                ),
                "trace": float(traces[name].value),
                "trace_stderr": float(traces[name].stderr),
                "top_eigenvalue": float(tops[name].eigenvalues[0]),
                "num_matvecs": traces[name].num_matvecs + tops[name].num_matvecs,
            }
            for name in traces
        ]
    report["num_matvecs"] = (
        report["top_eigenvalues"]["num_matvecs"]
        + report["trace"]["num_matvecs"]
        + report["spectral_density"]["num_matvecs"]
        + sum(row["num_matvecs"] for row in report["per_layer"])
    )
    return report, density


def write_report(report: dict[str, Any], density: Any, out: Path) -> list[Path]:
    """Write ``report.md``, ``report.json`` and ``density.png`` into ``out``.

    Returns:
        The paths written.
    """
    out.mkdir(parents=True, exist_ok=True)
    plot_spectral_density(density, log=True, path=out / "density.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return [out / "report.md", out / "report.json", out / "density.png"]


def markdown(report: dict[str, Any]) -> str:
    """Format the report as Markdown."""
    eig = report["top_eigenvalues"]
    trace = report["trace"]
    dens = report["spectral_density"]
    lines = [
        "# Hessian report",
        "",
        *[f"- {key}: {value}" for key, value in report["setup"].items()],
        f"- parameters analysed: {report['parameters']['count']} "
        f"in {report['parameters']['tensors']} tensors",
        f"- Hessian-vector products: {report['num_matvecs']} "
        f"(each a pass over the data set), {sum(report['seconds'].values()):.1f} s",
        "",
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
        "## Trace",
        "",
        f"tr(H) = {trace['value']:.6g} ± {trace['stderr']:.2g} (standard error; Hutch++, "
        f"{trace['num_matvecs']} products).",
        "",
        "## Spectral density",
        "",
        f"Stochastic Lanczos quadrature, {dens['probes']} probes x {dens['steps']} steps "
        f"({dens['num_matvecs']} products); Ritz nodes span "
        f"[{dens['lowest_node']:.4g}, {dens['highest_node']:.4g}].",
        "",
        f"![Spectral density]({dens['plot']})",
        "",
        "## Per layer",
        "",
        "Each module's own diagonal block of the Hessian; all modules analysed together.",
        "",
        "| module | type | parameters | trace | ± | top eigenvalue |",
        "|---|---|---:|---:|---:|---:|",
        *[
            f"| {row['module']} | {row['type']} | {row['parameters']} | {row['trace']:.6g} | "
            f"{row['trace_stderr']:.2g} | {row['top_eigenvalue']:.6g} |"
            for row in report["per_layer"]
        ],
        "",
        "## Time",
        "",
        *[f"- {stage}: {seconds:.2f} s" for stage, seconds in report["seconds"].items()],
        "",
    ]
    return "\n".join(lines)
