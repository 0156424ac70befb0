"""ResNet-18 on a CPU: whole-model analyses, the per-layer table and the report at real scale.

The network is a ResNet-18 written here (torchvision is not a dependency): BasicBlocks
[2, 2, 2, 2] of widths 64-512, the ImageNet stem (7x7 convolution of stride 2, max pooling),
BatchNorm, 10 classes; 11,181,642 parameters in 62 tensors owned by 41 modules, float32, in
eval mode, randomly initialised under seed 0. The data are three batches of 16 random images
of 3x32x32 with random labels (seed 1), cross-entropy loss.

Stages, each in a fresh process (so that its peak resident memory is its own):

* ``product``: one Hessian-vector product over the three batches, and one gradient;
* ``top eigenvalues``: ``model_top_eigenvalues(k=5)`` (Lanczos, defaults);
* ``trace``: ``model_hessian_trace`` with its defaults (``method="auto"``, budget 100: exact
  where the exact diagonal costs at most 100 products, else Hutch++);
* ``hutch++ trace``: ``model_hessian_trace(method="hutch++")``, 100 products, for comparison;
* ``spectral density``: ``model_spectral_density`` (4 probes x 100 Lanczos steps);
* ``report``: the full default ``torch-secorder report`` on this model and data (its plan
  chooses each trace's method and the per-layer stages; the table of its stages is printed);
* ``exact diagonal``: ``HessianOperator.diagonal()`` over the three batches, the exact
  diagonal of all 11.2M parameters (what ``model_hessian_diagonal`` computes for one batch),
  and its sum, the exact trace; checked against 12 unit-vector products of random entries;
* ``per-layer``: the report's per-layer table with ``--per-layer all``, every module's trace
  (as the report chooses it: a sum of the exact diagonal where that costs at most
  ``--layer-matvecs`` products, default 100 as in the report, else Hutch++) and top
  eigenvalue (Lanczos, ``tol=1e-4``, all 41 modules in one lockstep run).

For each: Hessian-vector products, ``matmat`` calls (passes over the data) and the widest
one, wall-clock seconds, the process's peak resident memory (``ru_maxrss``) and its resident
memory just before the stage (model, data and torch loaded). One torch thread
(``--threads``), ``torch.set_flush_denormal(True)``; every stage runs once (no repeats: the
report stage alone takes tens of minutes).

Usage::

    python benchmarks/bench_resnet18.py --quick          # a narrow ResNet-18, about a minute
    timeout 6h python benchmarks/bench_resnet18.py --json resnet18.json

Not collected by pytest.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

QUICK = os.environ.get("BENCH_RESNET18_QUICK") == "1"
STAGES = (
    "product",
    "top eigenvalues",
    "trace",
    "hutch++ trace",
    "spectral density",
    "report",
    "exact diagonal",
    "per-layer",
)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (torchvision's)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18(num_classes=10)``, layer for layer."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for index, scale in enumerate((1, 2, 4, 8)):
            cout = width * scale
            stride = 1 if index == 0 else 2
            blocks = nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))
            self.add_module(f"layer{index + 1}", blocks)
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def model() -> nn.Module:
    """The benchmark's ResNet-18 (width 8 with ``BENCH_RESNET18_QUICK=1``), in eval mode."""
    torch.manual_seed(0)
    return ResNet18(width=8 if QUICK else 64).eval()


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three batches of 16 random 3x32x32 images with labels (one batch of 4 when quick)."""
    g = torch.Generator().manual_seed(1)
    count, size = (1, 4) if QUICK else (3, 16)
    return [
        (torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(count)
    ]


def resident_gib() -> float:
    """The process's resident memory now (``VmRSS``), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def peak_gib() -> float:
    """The process's peak resident memory (``ru_maxrss``, KiB on Linux), in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_stage(stage: str, args: argparse.Namespace) -> dict:
    """Run one stage in this process; return its figures."""
    import torch_secorder as ts
    from torch_secorder._report import make_plan, per_layer_rows, price_plan

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    net, batches = model(), data()
    loss_fn = nn.CrossEntropyLoss()
    widths: list[int] = []
    matmat = ts.HessianOperator.matmat

    def recording(
        self: ts.HessianOperator, V: torch.Tensor, **kwargs: torch.Tensor
    ) -> torch.Tensor:
        widths.append(V.shape[1])
        return matmat(self, V, **kwargs)

    ts.HessianOperator.matmat = recording  # type: ignore[method-assign]
    before = resident_gib()
    figures: dict = {}
    start = time.perf_counter()
    if stage == "product":
        operator = ts.HessianOperator.from_model(net, loss_fn, batches)
        v = torch.randn(operator.shape[0], generator=torch.Generator().manual_seed(2))
        operator.matvec(v)  # warm-up
        start = time.perf_counter()
        operator.matvec(v)
        figures["seconds_per_product"] = time.perf_counter() - start
        params = [p for p in net.parameters() if p.requires_grad]
        start = time.perf_counter()
        for inputs, targets in batches:
            torch.autograd.grad(loss_fn(net(inputs), targets), params)
        figures["seconds_per_gradient"] = time.perf_counter() - start
        figures["parameters"] = operator.shape[0]
        figures["tensors"] = len(params)
        figures["modules"] = len(make_plan(net).groups)
        products, widths[:] = 1, [1]  # the timed product (matvec does not call matmat)
        start = time.perf_counter() - figures["seconds_per_product"]  # its time in the table
    elif stage == "top eigenvalues":
        result = ts.model_top_eigenvalues(net, loss_fn, batches, k=5)
        figures["eigenvalues"] = result.eigenvalues.tolist()
        figures["converged"] = result.converged
        products = result.num_matvecs
    elif stage in ("trace", "hutch++ trace"):
        method = "auto" if stage == "trace" else "hutch++"
        result = ts.model_hessian_trace(net, loss_fn, batches, method=method, num_matvecs=100)
        figures["trace"] = [float(result.value), float(result.stderr)]
        figures["method"] = result.method
        products = result.num_matvecs
    elif stage == "spectral density":
        result = ts.model_spectral_density(net, loss_fn, batches, num_probes=4, num_matvecs=400)
        figures["nodes"] = [float(result.nodes.min()), float(result.nodes.max())]
        products = result.num_matvecs
    elif stage == "exact diagonal":
        with ts.HessianOperator.from_model(net, loss_fn, batches) as operator:
            diagonal = operator.diagonal()
            products = operator.num_matvecs
            seconds = time.perf_counter() - start
            figures["trace"] = float(diagonal.sum())
            g = torch.Generator().manual_seed(3)
            errors = []
            for j in torch.randint(operator.shape[0], (12,), generator=g).tolist():
                e = torch.zeros(operator.shape[0])
                e[j] = 1
                exact = float(operator.matvec(e)[j])
                errors.append(abs(exact - float(diagonal[j])) / max(abs(exact), 1e-30))
            figures["largest_relative_error"] = max(errors)
        start = time.perf_counter() - seconds  # the check's products left out
    elif stage == "per-layer":
        plan = make_plan(net, per_layer="all", layer_matvecs=args.layer_matvecs)
        with ts.HessianOperator.from_model(net, loss_fn, batches) as operator:
            plan = price_plan(plan, operator, net, loss_fn, batches)
            rows, products = per_layer_rows(operator, plan, net, loss_fn, batches)
        figures["layer_matvecs"] = args.layer_matvecs
        figures["trace_methods"] = sorted({r["trace_method"] for r in rows})
        figures["eigen_products"] = sum(r["eigen_num_matvecs"] for r in rows)
        figures["trace_sum"] = [
            sum(r["trace"] for r in rows),
            sum(r["trace_stderr"] ** 2 for r in rows) ** 0.5,
        ]
        figures["largest_top_eigenvalue"] = max(r["top_eigenvalue"] for r in rows)
        figures["unconverged"] = [r["module"] for r in rows if not r["converged"]]
        figures["rows"] = rows
    else:  # the full default report, as a user would run it
        from torch_secorder.__main__ import main

        out = Path(tempfile.mkdtemp(prefix="resnet18-report-"))
        status = main(
            [
                "report",
                "--model", f"{Path(__file__).resolve()}:model",
                "--data", f"{Path(__file__).resolve()}:data",
                "--threads", str(args.threads),
                "--out", str(out),
                "--no-progress",
            ]
        )  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        figures["status"] = status
        figures["out"] = str(out)
        figures["stage_seconds"] = report["seconds"]
        figures["per_layer"] = report["plan"]["per_layer"]
        figures["plan"] = report["plan"]
        figures["trace"] = [report["trace"]["value"], report["trace"]["stderr"]]
        figures["layer_rows"] = len(report.get("per_layer", []))
        products = report["num_matvecs"]
    figures.update(
        stage=stage,
        products=products,
        seconds=time.perf_counter() - start,
        passes=len(widths),
        widest=max(widths, default=0),
        resident_before_gib=before,
        peak_gib=peak_gib(),
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--layer-matvecs", type=int, default=100, help="Hutch++ per module")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--quick", action="store_true", help="a narrow network, one batch")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per stage")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--summary", type=Path, help="print the table of a --json file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.summary:
        results = json.loads(args.summary.read_text())
        for result in results:
            if result["stage"] == "product":
                result["seconds"] = result["seconds_per_product"]
        summarise(results)
        return
    if args.child:
        print("RESULT " + json.dumps(run_stage(args.child, args)), flush=True)
        return
    env = dict(os.environ, BENCH_RESNET18_QUICK="1" if args.quick else "0")
    env["OMP_NUM_THREADS"] = str(args.threads)
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.processor()}"
        f", {os.cpu_count()} CPUs, {args.threads} torch thread(s); load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    results = []
    for stage in args.stages:
        command = [sys.executable, __file__, "--child", stage]
        command += ["--threads", str(args.threads), "--layer-matvecs", str(args.layer_matvecs)]
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=args.timeout, check=False
            )
        except subprocess.TimeoutExpired:
            print(f"{stage}: stopped after --timeout {args.timeout:.0f} s", flush=True)
            continue
        lines = done.stdout.splitlines()
        for line in lines:
            if not line.startswith("RESULT "):
                print(f"    {line}")
        result = next((json.loads(x[7:]) for x in lines if x.startswith("RESULT ")), None)
        if result is None:
            print(f"{stage}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
            continue
        results.append(result)
        print(
            f"{stage:>17}: {result['products']:6d} products, {result['passes']:5d} passes "
            f"(widest {result['widest']:3d} columns), {result['seconds']:9.1f} s, peak RSS "
            f"{result['peak_gib']:.2f} GiB (before the stage {result['resident_before_gib']:.2f})"
            f"; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        if args.json:  # after every stage: a later one may not finish
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    summarise(results)


def summarise(results: list[dict]) -> None:
    """The table of the README, the targets, and the cross-checks."""
    by_stage = {r["stage"]: r for r in results}
    print("\n| stage | products | passes (widest) | seconds | peak RSS | RSS before |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['stage']} | {r['products']} | {r['passes']} ({r['widest']}) | "
            f"{r['seconds']:.1f} | {r['peak_gib']:.2f} GiB | {r['resident_before_gib']:.2f} GiB |"
        )
    if "product" in by_stage:
        p = by_stage["product"]
        print(
            f"\n{p['parameters']} parameters, {p['tensors']} tensors, {p['modules']} modules; "
            f"one product {p['seconds_per_product']:.2f} s, one gradient "
            f"{p['seconds_per_gradient']:.2f} s over the three batches"
        )
    whole = [by_stage[s]["peak_gib"] for s in STAGES[1:5] if s in by_stage]
    if whole and "per-layer" in by_stage:
        layer = by_stage["per-layer"]
        ratio = layer["peak_gib"] / max(whole)
        print(
            f"per-layer peak / whole-model peak: {ratio:.2f} (target <= 2); per-layer traces sum "
            f"to {layer['trace_sum'][0]:.6g} +- {layer['trace_sum'][1]:.2g}; unconverged: "
            f"{layer['unconverged'] or 'none'}"
        )
    for name in ("trace", "hutch++ trace"):
        if name in by_stage:
            t = by_stage[name]
            print(f"whole-model trace ({t['method']}) {t['trace'][0]:.6g} +- {t['trace'][1]:.2g}")
    if "top eigenvalues" in by_stage:
        print(f"top eigenvalues {by_stage['top eigenvalues']['eigenvalues']}")
    if "exact diagonal" in by_stage:
        d = by_stage["exact diagonal"]
        print(
            f"exact trace {d['trace']:.6g} from the exact diagonal; largest relative error of 12 "
            f"entries against unit-vector products {d['largest_relative_error']:.1e}"
        )
    if "report" in by_stage:
        r = by_stage["report"]
        print(
            f"default report: exit {r['status']}, {r['seconds']:.0f} s, per-layer "
            f"{r['per_layer']['chosen']}, {r['layer_rows']} per-layer rows, trace "
            f"{r['trace'][0]:.6g} +- {r['trace'][1]:.2g}"
        )
        print("\n| report stage | method | products planned | products used | seconds |")
        print("|---|---|---:|---:|---:|")
        for entry in r["plan"]["stages"]:
            bound = "≤ " if entry["at_most"] else ""
            planned = "skipped" if entry["status"] == "skipped" else f"{bound}{entry['products']}"
            seconds = r["stage_seconds"].get(entry["stage"])
            print(
                f"| {entry['stage']} | {entry['method']} | {planned} | "
                f"{entry.get('products_used', '-')} | "
                f"{'-' if seconds is None else f'{seconds:.1f}'} |"
            )


if __name__ == "__main__":
    main()
