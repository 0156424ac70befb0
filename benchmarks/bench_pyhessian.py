"""PyHessian's own ResNet, side by side: top eigenvalue, trace and density on one batch.

The network is the CIFAR-10 ResNet-20 of PyHessian's example (He et al. 2016, "Deep
Residual Learning for Image Recognition", arXiv:1512.03385): a 3x3 convolution to 16
channels, 3 stages of 3 BasicBlocks of 16, 32 and 64 channels (a 1x1 convolution with
BatchNorm where a block changes shape), BatchNorm, 8x8 average pooling and a linear layer
to 10 classes; 272,474 parameters, convolutions initialised as PyHessian's example does
(normal, variance 2 / fan-out) under seed 0, float32, eval mode (PyHessian switches the
model to eval). Written here, nothing is downloaded: one batch of ``--batch`` (default 32;
128 for the README's table) random 3x32x32 images with random labels (generator seed 1),
cross-entropy; both libraries get it as one batch (PyHessian's ``data=`` form, which its
example uses: one gradient graph, every product one backward pass through it).

Stages, each library at its defaults:

* top eigenvalue: PyHessian's power iteration (``maxIter=100, tol=1e-3``) against
  ``model_top_eigenvalues`` (Lanczos, ``tol=1e-4``); and each at another tolerance, PyHessian
  tighter (``tol=1e-5``) and ours looser (``tol=1e-2``), to compare at similar accuracy;
* trace: PyHessian's Hutchinson (``maxIter=100, tol=1e-3``) against ``model_hessian_trace``
  (``method="auto"``: the exact trace where it costs at most 100 products, else Hutch++), and
  our Hutchinson with as many products as PyHessian used in the same repeat;
* density: PyHessian's ``density`` (``iter=100, n_v=1``, with ``torch.eig`` supplied from
  ``torch.linalg.eigh``: torch 2 removed it) against ``model_spectral_density`` at its
  defaults (here PyHessian's budget, 1 probe x 100 steps), and ours with 4 probes x 100.

Every run is a fresh process (``--repeats`` rounds, default 3; a stage's runs in the
reverse order every other round; round ``r`` draws its probes from seed ``r``), so each
run's peak resident memory (``ru_maxrss``) is its own: the table gives it above the
process's resident memory after building the model and the batch. Per run: Hessian-vector
products (PyHessian's counted by wrapping its product function), CPU seconds of the process
and wall seconds (PyHessian's include its constructor, which builds the gradient graph as
our model forms do), and the accuracy: the top eigenvalue's relative error against a
float64 Lanczos at ``tol=1e-8``; the trace's against the exact trace (float64,
``method="exact"``); the density's through its largest node (against the top eigenvalue)
and its first moment (``P * sum(w * node)``, against the trace). The references are cached
in ``--cache``. Medians over the rounds, the range in brackets.
One torch thread (``--threads``), ``torch.set_flush_denormal(True)``.

Usage::

    python benchmarks/bench_pyhessian.py --quick    # a batch of 8, one round: two minutes
    python benchmarks/bench_pyhessian.py            # a batch of 32, 3 rounds: 15 minutes
    python benchmarks/bench_pyhessian.py --batch 128 --json pyhessian.json   # about an hour

Needs PyHessian 0.1 (``pip install --no-deps pyhessian``; it imports only torch and numpy).
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from bench_resnet18 import BasicBlock  # torchvision's, as PyHessian's ResNet uses it
from pyhessian_compat import eig_shim
from torch import Tensor, nn

RUNS = (  # (stage, library, setting)
    ("top eigenvalue", "PyHessian", "power iteration, maxIter=100, tol=1e-3"),
    ("top eigenvalue", "torch_secorder", "model_top_eigenvalues, Lanczos, tol=1e-4"),
    ("top eigenvalue", "PyHessian", "power iteration, maxIter=100, tol=1e-5"),
    ("top eigenvalue", "torch_secorder", "Lanczos, tol=1e-2"),
    ("trace", "PyHessian", "Hutchinson, maxIter=100, tol=1e-3"),
    ("trace", "torch_secorder", "model_hessian_trace, method='auto'"),
    ("trace", "torch_secorder", "Hutchinson, PyHessian's products"),
    ("density", "PyHessian", "density, n_v=1, iter=100"),
    ("density", "torch_secorder", "model_spectral_density, defaults (1 probe x 100)"),
    ("density", "torch_secorder", "4 probes x 100"),
)


# ----------------------------------------------------------------------------- the network
class ResNet20(nn.Module):
    """The CIFAR-10 ResNet of depth 6n + 2 = 20 (n = 3 blocks per stage)."""

    def __init__(self, num_classes: int = 10, blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        cin = 16
        for index, cout in enumerate((16, 32, 64)):
            layer = []
            for b in range(blocks):
                layer.append(BasicBlock(cin, cout, 2 if index > 0 and b == 0 else 1))
                cin = cout
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(cin, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # He init over the fan-out (BatchNorm: 1 and 0)
                fan_out = module.out_channels * math.prod(module.kernel_size)
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def workload(batch: int, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple]:
    """The model (seed 0, eval mode) and one batch of random images and labels (seed 1)."""
    torch.manual_seed(0)
    model = ResNet20().eval().to(dtype)
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch, 3, 32, 32, generator=g).to(dtype)
    targets = torch.randint(0, 10, (batch,), generator=g)
    return model, (inputs, targets)


# ----------------------------------------------------------------------------- one run
def peak_mib() -> float:
    """The process's peak resident memory (``ru_maxrss``, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_pyhessian(stage: str, setting: str, model: nn.Module, batch: tuple, seed: int):
    import numpy as np

    module = importlib.import_module("pyhessian.hessian")
    count = 0
    product = module.hessian_vector_product

    def counted(*args: Any) -> Any:
        nonlocal count
        count += 1
        return product(*args)

    module.hessian_vector_product = counted
    torch.manual_seed(seed)  # PyHessian draws its vectors from the global RNG
    hessian = module.hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=False)
    if stage == "top eigenvalue":
        values, _ = hessian.eigenvalues(tol=float(setting.rsplit("=", 1)[1]))
        out = {"value": values[0]}
    elif stage == "trace":
        out = {"value": float(np.mean(hessian.trace()))}
    else:
        with eig_shim():
            nodes, weights = hessian.density()
        out = {"nodes": np.array(nodes).tolist(), "weights": np.array(weights).tolist()}
    return {"products": count, **out}


def run_ours(stage: str, setting: str, model: nn.Module, batch: tuple, seed: int, m: int):
    import torch_secorder as ts

    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    if stage == "top eigenvalue":
        tol = float(setting.rsplit("=", 1)[1])
        r = ts.model_top_eigenvalues(model, loss_fn, batch, tol=tol, generator=g)
        return {"products": r.num_matvecs, "value": float(r.eigenvalues[0])}
    if stage == "trace":
        if "auto" in setting:
            r = ts.model_hessian_trace(model, loss_fn, batch, generator=g)
        else:
            r = ts.model_hessian_trace(
                model, loss_fn, batch, method="hutchinson", num_matvecs=m, generator=g
            )
        return {"products": r.num_matvecs, "value": float(r.value), "method": r.method}
    more = {"num_probes": 4, "num_matvecs": 400} if setting == "4 probes x 100" else {}
    r = ts.model_spectral_density(model, loss_fn, batch, generator=g, **more)
    return {"products": r.num_matvecs, "nodes": r.nodes.tolist(), "weights": r.weights.tolist()}


def run_reference(model: nn.Module, batch: tuple) -> dict[str, Any]:
    """Float64: the top eigenvalue by Lanczos at ``tol=1e-8``, the exact trace."""
    import torch_secorder as ts

    loss_fn = nn.CrossEntropyLoss()
    model, batch = model.double(), (batch[0].double(), batch[1])
    top = ts.model_top_eigenvalues(model, loss_fn, batch, tol=1e-8)
    trace = ts.model_hessian_trace(model, loss_fn, batch, method="exact")
    return {
        "top": float(top.eigenvalues[0]),
        "top_residual": float(top.residuals[0]),
        "top_products": top.num_matvecs,
        "trace": float(trace.value),
        "trace_products": trace.num_matvecs,
        "products": top.num_matvecs + trace.num_matvecs,
    }


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One run in this fresh process: the figures of ``RUNS[args.child]``."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    # PyHessian differentiates with backward(create_graph=True), which warns about .grad.
    warnings.filterwarnings("ignore", "Using backward.. with create_graph=True")
    model, batch = workload(args.batch)
    with torch.no_grad():
        model(batch[0][:2])  # the convolution kernels' first call, outside the stage
    if args.child < 0:
        import torch_secorder  # noqa: F401
    elif RUNS[args.child][1] == "PyHessian":
        import pyhessian  # noqa: F401
    else:
        import torch_secorder  # noqa: F401
    before = peak_mib()
    cpu, wall = time.process_time(), time.perf_counter()
    if args.child < 0:
        out = run_reference(model, batch)
    else:
        stage, library, setting = RUNS[args.child]
        if library == "PyHessian":
            out = run_pyhessian(stage, setting, model, batch, args.seed)
        else:
            out = run_ours(stage, setting, model, batch, args.seed, args.matvecs)
    out["cpu"], out["wall"] = time.process_time() - cpu, time.perf_counter() - wall
    out["peak_mib"], out["before_mib"] = peak_mib(), before
    return out


# ----------------------------------------------------------------------------- the driver
def spawn(args: argparse.Namespace, index: int, seed: int = 0, matvecs: int = 0) -> dict:
    command = [sys.executable, __file__, "--child", str(index), "--batch", str(args.batch)]
    command += ["--threads", str(args.threads), "--seed", str(seed), "--matvecs", str(matvecs)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"run {index} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def reference(args: argparse.Namespace) -> dict[str, Any]:
    model, batch = workload(args.batch)
    digest = hashlib.sha256()
    for tensor in [*model.state_dict().values(), *batch]:
        digest.update(tensor.detach().double().numpy().tobytes())
    key = f"resnet20-{args.batch}-{torch.__version__}-{digest.hexdigest()[:16]}"
    path = Path(args.cache) / f"{key}.json" if args.cache else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    out = spawn(args, -1)
    print(
        f"reference (float64): top eigenvalue {out['top']:.10g} (residual "
        f"{out['top_residual']:.1e}, {out['top_products']} products), exact trace "
        f"{out['trace']:.10g} ({out['trace_products']} products); {out['wall']:.0f} s",
        flush=True,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    return out


def error(run: dict[str, Any], stage: str, ref: dict[str, Any], size: int) -> dict[str, float]:
    """Relative errors against the references."""
    if stage == "top eigenvalue":
        return {"error": abs(run["value"] - ref["top"]) / abs(ref["top"])}
    if stage == "trace":
        return {"error": abs(run["value"] - ref["trace"]) / abs(ref["trace"])}
    nodes = [x for row in run["nodes"] for x in row]
    moments = [
        size * sum(w * x for w, x in zip(ws, xs)) for ws, xs in zip(run["weights"], run["nodes"])
    ]
    return {
        "error": abs(max(nodes) - ref["top"]) / abs(ref["top"]),
        "moment_error": abs(statistics.fmean(moments) - ref["trace"]) / abs(ref["trace"]),
    }


def spread(values: list[float], fmt: str) -> str:
    """The median, with the range in brackets when the values differ."""
    text = format(statistics.median(values), "g" if fmt == "d" else fmt)
    if len(values) > 1 and min(values) != max(values):
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def summarise(records: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    print(
        "\n| stage | library | setting | products | CPU s | CPU s / product | wall s | "
        "peak RSS above the start | relative error |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    cpu: dict[int, float] = {}
    for index, (stage, library, setting) in enumerate(RUNS):
        runs = [r for r in records if r["run"] == index]
        if not runs:
            continue

        def cell(key: str, fmt: str, runs: list[dict[str, Any]] = runs) -> str:
            return spread([r[key] for r in runs], fmt)

        cpu[index] = statistics.median(r["cpu"] for r in runs)
        per_product = statistics.median(r["cpu"] / r["products"] for r in runs)
        memory = spread([r["peak_mib"] - r["before_mib"] for r in runs], ".0f")
        accuracy = cell("error", ".1e")
        if stage == "density":
            accuracy = f"top node {accuracy}; trace {cell('moment_error', '.1e')}"
        method = {r.get("method") for r in runs} - {None, "hutchinson"}
        if method:
            setting += f" (chose {', '.join(sorted(method))})"
        print(
            f"| {stage} | {library} | {setting} | {cell('products', 'd')} | {cell('cpu', '.1f')} "
            f"| {per_product:.2f} | {cell('wall', '.1f')} | {memory} MiB | {accuracy} |"
        )
    print()
    for stage in ("top eigenvalue", "trace", "density"):
        indices = [i for i, run in enumerate(RUNS) if run[0] == stage and i in cpu]
        pyh = [i for i in indices if RUNS[i][1] == "PyHessian"]
        if not pyh:
            continue
        for i in indices:
            if RUNS[i][1] != "PyHessian":
                print(
                    f"{stage}: PyHessian's CPU time / ours ({RUNS[i][2]}): "
                    f"{cpu[pyh[0]] / cpu[i]:.2f}"
                )
    print(f"references (float64): top eigenvalue {ref['top']:.8g}, exact trace {ref['trace']:.8g}")


def versions() -> str:
    names = [("torch_secorder", "torch-secorder"), ("PyHessian", "pyhessian"), ("torch", "torch")]
    found = []
    for name, dist in names:
        try:
            found.append(f"{name} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="images in the batch")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--runs", type=int, nargs="+", help="indices into RUNS (default all)")
    parser.add_argument("--quick", action="store_true", help="a batch of 8: smoke")
    parser.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "torch_secorder_bench"),
        help="directory for the references ('' for none)",
    )
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--summary", type=Path, help="print the table of a --json file")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--matvecs", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    if args.summary:
        saved = json.loads(args.summary.read_text())
        summarise(saved["records"], saved["reference"])
        return
    if args.quick:
        args.batch, args.repeats = 8, 1
    print(f"{versions()}; Python {platform.python_version()}")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} "
        f"torch thread(s), load average {os.getloadavg()[0]:.1f}; ResNet-20, one batch of "
        f"{args.batch}, float32, eval mode; {args.repeats} round(s)",
        flush=True,
    )
    model, _ = workload(args.batch)
    size = sum(p.numel() for p in model.parameters())
    ref = reference(args)
    chosen = args.runs if args.runs is not None else range(len(RUNS))
    records: list[dict[str, Any]] = []
    for r in range(args.repeats):
        pyhessian_products = 100
        for stage in ("top eigenvalue", "trace", "density"):
            order = [i for i in chosen if RUNS[i][0] == stage]
            if r % 2:  # the reverse order in odd rounds; our Hutchinson after PyHessian's
                order.reverse()
                order.sort(key=lambda i: "PyHessian's products" in RUNS[i][2])
            for index in order:
                run = spawn(args, index, seed=r, matvecs=pyhessian_products)
                if RUNS[index][:2] == ("trace", "PyHessian"):
                    pyhessian_products = run["products"]
                run.update(run=index, round=r, **error(run, stage, ref, size))
                for key in ("nodes", "weights"):
                    run.pop(key, None)
                records.append(run)
                print(
                    f"round {r}: {stage:>14} {RUNS[index][1]:>14} {RUNS[index][2]:42} "
                    f"{run['products']:4d} products, CPU {run['cpu']:6.1f} s, wall "
                    f"{run['wall']:6.1f} s, peak +{run['peak_mib'] - run['before_mib']:5.0f} MiB, "
                    f"error {run['error']:.1e}; load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                if args.json:
                    saved = {"reference": ref, "records": records}
                    args.json.write_text(json.dumps(saved, indent=1) + "\n")
    summarise(records, ref)


if __name__ == "__main__":
    main()
