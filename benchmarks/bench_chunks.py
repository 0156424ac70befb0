"""Per-vector time of many Hessian-vector products: a loop against batched calls, by product size.

For tanh MLPs and small CNNs (eval-mode BatchNorm, ReLU) of growing size, ``k`` products on one
kept gradient graph run as a loop (one ``torch.autograd.grad`` per vector), batched by
``torch.func.vmap`` around ``torch.autograd.grad`` in chunks of 4, 8 and 32, and batched by
``is_grads_batched`` in chunks of 8 and 32. Each time is the median over repeats (the methods
alternate within each repeat) per vector, divided by the time of one gradient measured in the
same process. The column ``estimate`` is the library's memory estimate of one product
(``torch_secorder.core._chunks.product_bytes``), on which its chunk rule decides.

With ``--sizes``, the vmap engine in chunks of the given sizes instead, each time relative to
the best of its row, beside the chunk the library's rule takes (``chunk_size=None``).

Usage::

    python benchmarks/bench_chunks.py                 # all workloads, one thread
    python benchmarks/bench_chunks.py --models mlp64x256 cnn8x32x12 --repeats 9
    python benchmarks/bench_chunks.py --models resnet8 cnn8x32x16 --k 64 --sizes 1 8 16 32

Not collected by pytest.
"""

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from torch_secorder.core import _chunks
from torch_secorder.core._autograd import GradientGraph


def mlp(width: int, batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    )
    return model, torch.randn(batch, 64), torch.randint(0, 10, (batch,))


def cnn(channels: int, batch: int, size: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * channels, 10),
    ).eval()
    return model, torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))


def _resnet8() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The CIFAR ResNet-8 of ``bench_core.py`` (width 8, 8 images of 16x16)."""
    from bench_core import resnet

    w = resnet(8, 8, 16, torch.float32, torch.device("cpu"))
    return w.model, w.inputs, w.targets


WORKLOADS = {
    "mlp16x32": lambda: mlp(16, 32),
    "mlp32x64": lambda: mlp(32, 64),
    "mlp32x256": lambda: mlp(32, 256),
    "mlp64x128": lambda: mlp(64, 128),
    "mlp64x256": lambda: mlp(64, 256),
    "mlp128x256": lambda: mlp(128, 256),
    "mlp128x512": lambda: mlp(128, 512),
    "mlp256x256": lambda: mlp(256, 256),
    "mlp256x512": lambda: mlp(256, 512),
    "mlp256x1024": lambda: mlp(256, 1024),
    "mlp512x1024": lambda: mlp(512, 1024),
    "cnn4x16x8": lambda: cnn(4, 16, 8),
    "cnn8x32x12": lambda: cnn(8, 32, 12),
    "cnn8x32x16": lambda: cnn(8, 32, 16),
    "cnn16x32x16": lambda: cnn(16, 32, 16),
    "cnn16x64x16": lambda: cnn(16, 64, 16),
    "cnn32x64x32": lambda: cnn(32, 64, 32),
    "cnn8x64x16": lambda: cnn(8, 64, 16),
    "resnet8": lambda: _resnet8(),
}
"""Name -> (model, inputs, targets): ``mlp{width}x{batch}``, ``cnn{channels}x{batch}x{side}``."""

METHODS = [
    ("loop", None, 1),
    ("vmap 4", "vmap", 4),
    ("vmap 8", "vmap", 8),
    ("vmap 32", "vmap", 32),
    ("is_grads_batched 8", "is_grads_batched", 8),
    ("is_grads_batched 32", "is_grads_batched", 32),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--k", type=int, default=32, help="products per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", help="vmap chunk sizes to compare")
    args = parser.parse_args()
    methods = METHODS if not args.sizes else [(str(c), "vmap", c) for c in args.sizes]
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), float32"
    )
    print("times relative to the row's best" if args.sizes else "per-vector time / one gradient")
    header = "| workload | parameters | estimate | " + " | ".join(m for m, _, _ in methods)
    print(header + (" | the rule's chunk |" if args.sizes else " |"))
    print("|---|---:|---:|" + "---:|" * (len(methods) + bool(args.sizes)))
    loss_fn = nn.CrossEntropyLoss()
    for name in args.models:
        torch.manual_seed(0)
        model, x, y = WORKLOADS[name]()
        params = list(model.parameters())
        func = lambda model=model, x=x, y=y: loss_fn(model(x), y)  # noqa: E731
        graph = GradientGraph(func, params, fname="bench")
        estimate = _chunks.product_bytes(graph, params)
        gen = torch.Generator().manual_seed(1)
        vectors = [torch.randn((args.k, *p.shape), generator=gen) for p in params]
        times: dict[str, list[float]] = {label: [] for label, _, _ in methods + [("gradient",) * 3]}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for label, engine, chunk in methods:
                graph.engine = engine
                tic = time.perf_counter()
                for start in range(0, args.k, chunk):
                    width = min(chunk, args.k - start)
                    graph._chunk([v[start : start + width] for v in vectors], params, width, False)
                if repeat:
                    times[label].append((time.perf_counter() - tic) / args.k)
            tic = time.perf_counter()
            torch.autograd.grad(func(), params)
            if repeat:
                times["gradient"].append(time.perf_counter() - tic)
        unit = statistics.median(times["gradient"])
        if args.sizes:
            unit = min(statistics.median(times[m]) for m, _, _ in methods)
        cells = " | ".join(f"{statistics.median(times[m]) / unit:.2f}" for m, _, _ in methods)
        if args.sizes:
            cells += f" | {_chunks.chunk_size(graph, args.k, params)}"
        size = sum(p.numel() for p in params)
        print(f"| {name} | {size} | {estimate / 2**20:.2f} MiB | {cells} |", flush=True)


if __name__ == "__main__":
    main()
