"""Benchmark HessianOperator: batched columns over a data set, memory, graph reuse.

Measures, on tanh MLPs with float32 data:

a. a k-column ``matmat`` vs k ``matvec`` calls over a 4-batch data set (time per column);
b. peak memory of one product over 4, 16 and 64 batches (each in a fresh process: flat means
   memory does not grow with the data set);
c. one product with the closure operator's reused graph vs a fresh ``hvp`` (forward, gradient
   and product each time), on a ~100k-parameter MLP.

Usage: python benchmarks/bench_operator.py [--repeats 7] [--threads 1] [--quick]
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import torch_secorder
from torch_secorder import HessianOperator, hvp


def mlp(width, depth, inputs=32, outputs=10, seed=0):
    torch.manual_seed(seed)
    layers, size = [], inputs
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.Tanh()]
        size = width
    return nn.Sequential(*layers, nn.Linear(size, outputs))


def batches(count, batch_size, seed=1, inputs=32, classes=10):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, inputs, generator=g),
            torch.randint(0, classes, (batch_size,), generator=g),
        )
        for _ in range(count)
    ]


def median_times(fns, repeats):
    """Median time of each function, the functions interleaved within every repeat so that
    load changes on a shared machine hit all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def columns_vs_vectors(repeats, k, batch_size):
    model = mlp(64, 2)
    data = batches(4, batch_size)
    H = HessianOperator.from_model(model, nn.CrossEntropyLoss(), data)
    V = torch.randn(H.shape[0], k, generator=torch.Generator().manual_seed(2))
    t_matmat, t_matvecs = median_times(
        [lambda: H.matmat(V), lambda: [H.matvec(V[:, j]) for j in range(k)]], repeats
    )
    return {
        "workload": f"MLP {num_params(model)} params, 4 batches of {batch_size}, k={k}",
        "matmat per column (ms)": 1e3 * t_matmat / k,
        "matvec per column (ms)": 1e3 * t_matvecs / k,
        "matvec / matmat": t_matvecs / t_matmat,
    }


def peak_memory_child(count, batch_size):
    """Run in a fresh process: peak RSS growth of one 8-column product over `count` batches."""
    model = mlp(256, 2)
    data = batches(count, batch_size)
    H = HessianOperator.from_model(model, nn.CrossEntropyLoss(), data)
    V = torch.randn(H.shape[0], 8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    H.matmat(V)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mib": (after - before) / 1024, "params": num_params(model)}))


def peak_memory(counts, batch_size, threads):
    rows = []
    for count in counts:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                str(count),
                "--batch-size",
                str(batch_size),
                "--threads",
                str(threads),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        rows.append(
            {
                "batches": count,
                "params": result["params"],
                "peak growth (MiB)": result["growth_mib"],
            }
        )
    return rows


def reused_vs_fresh(repeats, width, batch_size):
    model = mlp(width, 3)
    ((x, y),) = batches(1, batch_size)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def loss():
        return nn.functional.cross_entropy(model(x), y)

    H = HessianOperator(loss, params)
    flat = torch.cat([t.reshape(-1) for t in v])
    H.matvec(flat)  # builds the graph once
    t_reused, t_fresh = median_times(
        [lambda: H.matvec(flat), lambda: hvp(loss, params, v)], repeats
    )
    return {
        "workload": f"MLP {num_params(model)} params, batch {batch_size}",
        "reused graph (ms)": 1e3 * t_reused,
        "fresh hvp (ms)": 1e3 * t_fresh,
        "reused / fresh": t_reused / t_fresh,
    }


def table(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [
            f"{row[key]:.3g}" if isinstance(row[key], float) else str(row[key]) for key in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="smoke run with small sizes")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.memory_child is not None:
        peak_memory_child(args.memory_child, args.batch_size)
        return
    repeats = 2 if args.quick else args.repeats
    batch_size = 32 if args.quick else args.batch_size
    print(
        f"torch_secorder {torch_secorder.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), {repeats} repeats (medians)\n"
    )
    print("a. k columns at once vs k single products, over 4 batches")
    print(table([columns_vs_vectors(repeats, args.k, batch_size)]), "\n")
    print(
        f"b. peak memory of one 8-column product, batches of {8 * batch_size} (fresh process each)"
    )
    print(table(peak_memory([4, 16, 64], 8 * batch_size, args.threads)), "\n")
    print("c. one product: reused graph vs fresh hvp")
    print(table([reused_vs_fresh(repeats, 64 if args.quick else 210, batch_size)]))


if __name__ == "__main__":
    main()
