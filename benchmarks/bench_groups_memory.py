"""Per-layer analyses against whole-model ones: peak memory and time on a deep MLP.

The network is a tanh MLP of 21 ``Linear`` modules (256 inputs, 20 hidden layers of 256, 10
outputs; 1,318,410 parameters), float32, on one batch of 256 random inputs with random labels,
cross-entropy. Each analysis runs with its defaults, once for the whole model and once per
module (``groups="module"``: 21 groups, whose products run together in lockstep), each in a
fresh process so that its peak resident memory (``ru_maxrss``) is its own; the table gives the
peak above the process's resident memory before the analysis (model, data and torch loaded)
and the per-layer peak over the whole-model one. The target: per-layer analyses at most
twice the whole-model peak.

Usage::

    python benchmarks/bench_groups_memory.py            # about 15 minutes on one core
    python benchmarks/bench_groups_memory.py --quick    # a narrower MLP: a minute
    python benchmarks/bench_groups_memory.py --analyses "top eigenvalue"   # one of them

Not collected by pytest.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
from torch import nn

ANALYSES = ("trace", "top eigenvalue", "spectral density")


def workload(width: int, batch: int) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The MLP (seed 0) and one batch (seed 1)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(width, width), nn.Tanh()]
    for _ in range(19):
        layers += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch, width, generator=g)
    return model, (inputs, torch.randint(0, 10, (batch,), generator=g))


def child(analysis: str, per_layer: bool, width: int, batch: int) -> dict[str, float]:
    import torch_secorder as ts

    torch.set_num_threads(1)
    model, data = workload(width, batch)
    loss_fn = nn.CrossEntropyLoss()
    groups = "module" if per_layer else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    began = time.perf_counter()
    if analysis == "trace":
        result = ts.model_hessian_trace(model, loss_fn, data, groups=groups)
    elif analysis == "top eigenvalue":
        result = ts.model_top_eigenvalues(model, loss_fn, data, groups=groups)
    else:
        result = ts.model_spectral_density(model, loss_fn, data, groups=groups)
    seconds = time.perf_counter() - began
    results = result.values() if isinstance(result, dict) else [result]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "products": sum(r.num_matvecs for r in results),
        "seconds": seconds,
        "peak_mib": peak - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 64 instead of 256")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument(
        "--analyses", nargs="+", choices=ANALYSES, default=ANALYSES, help="(default: all)"
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        analysis, per_layer, width, batch = args.child
        out = child(analysis, per_layer == "1", int(width), int(batch))
        print("RESULT " + json.dumps(out), flush=True)
        return
    width, batch = (64, 64) if args.quick else (256, 256)
    model, _ = workload(width, batch)
    size = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__}, {platform.machine()}, one thread, load average "
        f"{os.getloadavg()[0]:.1f}; MLP of 21 Linear modules, {size:,} parameters, batch {batch}"
    )
    print("\n| analysis | whole model: products, s, peak | per module: products, s, peak | ratio |")
    print("|---|---|---|---:|")
    figures = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for analysis in args.analyses:
        runs = []
        for per_layer in ("0", "1"):
            command = [sys.executable, __file__, "--child", analysis, per_layer, str(width)]
            done = subprocess.run(
                [*command, str(batch)], env=env, capture_output=True, text=True, check=False
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(f"{analysis} failed:\n{done.stderr[-3000:]}")
            runs.append(json.loads(lines[-1][7:]))
        whole, layers = runs
        figures[analysis] = runs
        print(
            f"| {analysis} | {whole['products']}, {whole['seconds']:.1f} s, "
            f"{whole['peak_mib']:.0f} MiB | {layers['products']}, {layers['seconds']:.1f} s, "
            f"{layers['peak_mib']:.0f} MiB | {layers['peak_mib'] / whole['peak_mib']:.2f}x |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(figures, file, indent=1)


if __name__ == "__main__":
    main()
