"""Time an analysis spends outside its Hessian-vector products, on a ResNet-18.

The ResNet-18 of ``bench_resnet18.py`` (11.2M parameters, eval mode, float32) on one batch
of 8 (``--batch``) random 32×32 images with random labels, cross-entropy, one torch thread.
The analysis runs on the model's :class:`~torch_secorder.HessianOperator` (the trace by Hutch++: the
exact default takes a diagonal, not products), whose ``matmat`` is timed
(CPU time of the process); one product runs first, so that torch's first-call imports are
not counted. Printed: products, total time, time in products, and the time outside them over
the time in them (the target: at most 0.2).

Usage::

    python benchmarks/bench_overhead.py top --k 1           # about 10 seconds
    python benchmarks/bench_overhead.py density --probes 4 --steps 100   # about 2 minutes
    python benchmarks/bench_overhead.py trace               # Hutch++, 100 products: a minute
    python benchmarks/bench_overhead.py top --quick         # a narrow ResNet-18: seconds
    python benchmarks/bench_overhead.py top --batch 64      # products 8 times the cost
    python benchmarks/bench_overhead.py top --groups        # per layer: two minutes

With ``--groups`` the analysis is the model form's per-layer one (``groups="module"``: 41
groups on the ResNet-18, their products side by side in one operator's products).

Not collected by pytest.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
import bench_resnet18  # noqa: E402

import torch_secorder as ts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("analysis", choices=["top", "density", "trace"])
    parser.add_argument("--k", type=int, default=1, help="eigenvalues (top)")
    parser.add_argument("--probes", type=int, default=4, help="probes (density)")
    parser.add_argument("--steps", type=int, default=100, help="steps per probe (density)")
    parser.add_argument("--quick", action="store_true", help="a ResNet-18 of width 8")
    parser.add_argument("--batch", type=int, default=8, help="images in the batch")
    parser.add_argument("--groups", action="store_true", help='groups="module" (model forms)')
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the weights of bench_resnet18.model()
    model = bench_resnet18.ResNet18(width=8 if args.quick else 64).eval()
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(args.batch, 3, 32, 32, generator=g),
        torch.randint(0, 10, (args.batch,), generator=g),
    )
    inside = {"seconds": 0.0, "products": 0}
    matmat = ts.HessianOperator.matmat

    def timed(self: ts.HessianOperator, V: Tensor, **kwargs: Tensor) -> Tensor:
        tic = time.process_time()
        result = matmat(self, V, **kwargs)
        inside["seconds"] += time.process_time() - tic
        inside["products"] += V.shape[1]
        return result

    ts.HessianOperator.matmat = timed  # type: ignore[method-assign]
    operator = ts.HessianOperator.from_model(model, nn.CrossEntropyLoss(), batch)
    operator.matmat(torch.randn(operator.shape[0], 1))
    inside.update(seconds=0.0, products=0)
    generator = torch.Generator().manual_seed(0)
    tic = time.process_time()
    if args.groups:  # the model forms, each with an operator of its own
        loss_fn, options = nn.CrossEntropyLoss(), {"groups": "module", "generator": generator}
        if args.analysis == "top":
            results = ts.model_top_eigenvalues(model, loss_fn, batch, k=args.k, **options)
        elif args.analysis == "density":
            steps = args.probes * args.steps
            results = ts.model_spectral_density(
                model, loss_fn, batch, num_probes=args.probes, num_matvecs=steps, **options
            )
        else:
            results = ts.model_hessian_trace(model, loss_fn, batch, method="hutch++", **options)
        answer = f"{len(results)} groups"
    elif args.analysis == "top":
        result = ts.top_eigenvalues(operator, k=args.k, generator=generator)
        answer = f"eigenvalues {[round(x, 6) for x in result.eigenvalues.tolist()]}"
    elif args.analysis == "density":
        result = ts.spectral_density(
            operator,
            num_probes=args.probes,
            num_matvecs=args.probes * args.steps,
            generator=generator,
        )
        answer = f"nodes in [{float(result.nodes.min()):.4f}, {float(result.nodes.max()):.4f}]"
    else:
        result = ts.hessian_trace(operator, method="hutch++", generator=generator)
        answer = f"trace {float(result.value):.6g} ± {float(result.stderr):.2g} ({result.method})"
    total = time.process_time() - tic
    outside = (total - inside["seconds"]) / inside["seconds"]
    print(
        f"{args.analysis}: {inside['products']} products, {total:.1f} s in all, "
        f"{inside['seconds']:.1f} s in products, outside/inside {outside:.2f}; {answer}"
    )


if __name__ == "__main__":
    main()
