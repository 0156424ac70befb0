"""Warm against cold checks of CurvatureMonitor over training runs: products per check.

Two monitors ride along one training run (the monitor leaves training bitwise unchanged, so
both see the same weights at every check): one warm-starts each check's Lanczos from the
previous check's eigenvectors (the default), one starts every check from a random vector
(``warm_start=False``); both stop at the same relative residual ``tol``. Reported per setup:
checks, Hessian-vector products per check after the first (mean and median; the first check
of both is cold), the products saved, milliseconds per check (all its quantities), and the
largest difference between the two monitors' values relative to the value (both are
accurate to their residuals).

Setups (float32, CPU):

* ``mlp-gd-sharpening``: the tanh MLP 16-32-32-32-5 of ``examples/example_training_curvature.py``
  (2,821 parameters) on its 300 points, square loss, full-batch gradient descent at
  eta = 0.1 (progressive sharpening, below 2/eta), a check every 10 steps.
* ``mlp-gd-eos``: the same at eta = 0.4 (the edge of stability), a check every 20 steps.
* ``mlp-adam-eos``: the same with Adam at eta = 0.01: the eigenvalues of H and of the
  preconditioned P^{-1}H (its edge of stability), a check every 20 steps.
* ``cnn-sgd``: a CNN (conv 3-16-32 with BatchNorm in train mode and ReLU, 10 classes, 15,466
  parameters) trained with minibatch SGD with momentum on 1,024 generated 16x16 images,
  cross-entropy; the monitor's data is a fixed batch of 256 of them, a check every 25 steps.
* ``mlp-gd-k3``: as ``mlp-gd-sharpening`` with the top 3 eigenvalues.

Run with ``python benchmarks/bench_monitor.py`` (``--quick`` for a smoke run).
"""

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import torch_secorder as ts


def mlp_problem():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(300, 16, generator=generator)
    directions = torch.randn(5, 16, generator=generator)
    targets = nn.functional.one_hot((inputs @ directions.T).argmax(dim=1), 5).float()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
        nn.Linear(32, 5),
    )  # fmt: skip

    def loss_fn(outputs, targets):
        return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()

    return model, loss_fn, (inputs, targets)


def cnn_problem():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1024, 3, 16, 16, generator=generator)
    teacher = torch.randn(10, 3 * 16 * 16, generator=generator)
    labels = (images.flatten(1) @ teacher.T).argmax(dim=1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip
    return model, nn.CrossEntropyLoss(), (images, labels)


def run(setup, quick):
    """Train one setup with a warm and a cold monitor; return the two histories and seconds."""
    name, make, optimizer_of, every, steps, batch, k = setup
    if quick:
        steps = max(2 * every, steps // 10)
    model, loss_fn, (inputs, targets) = make()
    optimizer = optimizer_of(model.parameters())
    fixed = (inputs[:batch], targets[:batch])
    monitors = [
        ts.CurvatureMonitor(
            model, loss_fn, fixed, every=every, k=k, optimizer=optimizer, warm_start=w
        )
        for w in (True, False)
    ]
    generator = torch.Generator().manual_seed(1)
    for monitor in monitors:
        monitor.check()
    for _ in range(steps):
        if batch < len(inputs):  # minibatches
            index = torch.randint(len(inputs), (128,), generator=generator)
            x, y = inputs[index], targets[index]
        else:
            x, y = inputs, targets
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        for monitor in monitors:
            monitor.step()
    return [m.history for m in monitors], [m.seconds for m in monitors]


def summarise(name, histories, seconds):
    rows = []
    quantities = ["eigenvalue"]
    if histories[0].select("preconditioned_eigenvalue"):
        quantities.append("preconditioned_eigenvalue")
    for quantity in quantities:
        counts = []
        for history in histories:
            records = history.select(quantity, index=0)
            counts.append([r.num_matvecs for r in records][1:])  # after the first, cold check
        differences = [
            abs(a.value - b.value) / abs(b.value)
            for a, b in zip(histories[0].select(quantity), histories[1].select(quantity))
        ]
        warm, cold = counts
        checks = len(warm) + 1
        label = name if quantity == "eigenvalue" else f"{name} (P^-1 H)"
        rows.append(
            (
                label,
                checks,
                f"{statistics.mean(warm):.1f} / {statistics.median(warm):.0f}",
                f"{statistics.mean(cold):.1f} / {statistics.median(cold):.0f}",
                f"{100 * (1 - sum(warm) / sum(cold)):.0f}%",
                f"{1000 * seconds[0] / checks:.0f} / {1000 * seconds[1] / checks:.0f}"
                if quantity == "eigenvalue"
                else "(in the row above)",
                f"{max(differences):.1e}",
            )
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: a tenth of the steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    def sgd(lr, **options):
        return lambda params: torch.optim.SGD(params, lr=lr, **options)

    def adam(lr):
        return lambda params: torch.optim.Adam(params, lr=lr)

    setups = [
        ("mlp-gd-sharpening", mlp_problem, sgd(0.1), 10, 700, 300, 1),
        ("mlp-gd-eos", mlp_problem, sgd(0.4), 20, 700, 300, 1),
        ("mlp-adam-eos", mlp_problem, adam(0.01), 20, 700, 300, 1),
        ("cnn-sgd", cnn_problem, sgd(0.05, momentum=0.9), 25, 500, 256, 1),
        ("mlp-gd-k3", mlp_problem, sgd(0.1), 10, 700, 300, 3),
    ]
    machine = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, torch_secorder {ts.__version__}, {machine}, "
        f"{args.threads} thread(s), CPU"
    )
    header = (
        "setup",
        "checks",
        "warm: mean / median",
        "cold: mean / median",
        "saved",
        "ms per check warm / cold",
        "max rel. diff",
    )
    rows = []
    for setup in setups:
        began = time.perf_counter()
        histories, seconds = run(setup, args.quick)
        rows += summarise(setup[0], histories, seconds)
        print(f"  {setup[0]}: {time.perf_counter() - began:.0f} s", flush=True)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
