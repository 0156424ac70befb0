"""How honest the estimators' standard errors are: errors over reported standard errors.

Each estimator runs over ``--seeds`` independent generators on a few symmetric matrices whose
trace and diagonal are known: the dense float64 Hessians of two small networks (a tanh MLP
8-16-16-4 on 64 samples, 484 parameters; a CNN of two 3x3 convolutions, ReLU and tanh, on 32
images of 8x8, 383 parameters; cross-entropy, by plain double backward) and three spectra of
200 eigenvalues in a random basis (1/i; flat in [1, 2]; five dominant over a bulk in
[-1, 1]). Printed per matrix and budget (``--matvecs``): for the trace, the standard deviation
of (estimate - trace) / stderr over the seeds (1 where the standard errors are honest, below 1
where they are conservative), and the share of errors within two and beyond four standard
errors; for the diagonal the same per entry, with the median over entries of the RMS error
over the RMS standard error.

Usage::

    python benchmarks/bench_stderr.py --quick                 # 20 seeds: seconds
    python benchmarks/bench_stderr.py                         # XTrace and XDiag, 200 seeds
    python benchmarks/bench_stderr.py --trace hutch++ hutchinson --diagonal hutchinson

Not collected by pytest.
"""

import argparse
import platform

import torch
from torch import Tensor, nn

import torch_secorder as ts


class Dense:
    """A dense symmetric matrix as an operator."""

    def __init__(self, A: Tensor) -> None:
        self.A, self.shape, self.dtype, self.device = A, tuple(A.shape), A.dtype, A.device

    def matmat(self, V: Tensor) -> Tensor:
        return self.A @ V


def dense_hessian(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """The Hessian of the mean cross-entropy, one double backward per row."""
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in grads])
    rows = []
    for i in range(len(g)):
        row = torch.autograd.grad(g[i], params, retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in row]))
    H = torch.stack(rows)
    return (H + H.T) / 2


def matrices() -> dict[str, Tensor]:
    torch.manual_seed(0)
    dtype = torch.float64
    mlp = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Flatten(),
        nn.Linear(64, 3),
    )  # fmt: skip
    found = {
        "tanh MLP (484)": dense_hessian(
            mlp.to(dtype), torch.randn(64, 8, dtype=dtype), torch.randint(0, 4, (64,))
        ),
        "CNN (383)": dense_hessian(
            cnn.to(dtype), torch.randn(32, 1, 8, 8, dtype=dtype), torch.randint(0, 3, (32,))
        ),
    }
    n = 200
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    spectra = {
        "1/i (200)": 1 / torch.arange(1.0, n + 1, dtype=dtype),
        "flat [1, 2] (200)": torch.linspace(1.0, 2.0, n, dtype=dtype),
        "dominant + bulk (200)": torch.cat(
            [torch.tensor([100.0, 60, 40, 25, 15], dtype=dtype), torch.linspace(-1, 1, n - 5)]
        ),
    }
    for name, lam in spectra.items():
        A = (Q * lam) @ Q.T
        found[name] = (A + A.T) / 2
    return found


def trace_row(A: Tensor, method: str, matvecs: int, seeds: int) -> str:
    z = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        r = ts.hessian_trace(Dense(A), method=method, num_matvecs=matvecs, generator=gen)
        z.append(float((r.value - A.trace()) / r.stderr))
    z_ = torch.tensor(z)
    within, beyond = (z_.abs() <= 2).double().mean(), (z_.abs() > 4).double().mean()
    return f"sd {z_.std():.2f}, within 2: {within:.0%}, beyond 4: {beyond:.1%}"


def diagonal_row(A: Tensor, method: str, matvecs: int, seeds: int) -> str:
    errors, stderrs = [], []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        r = ts.hessian_diagonal_estimate(
            Dense(A), method=method, num_matvecs=matvecs, generator=gen
        )
        errors.append(r.diagonal - A.diagonal())
        stderrs.append(r.stderr)
    E, S = torch.stack(errors), torch.stack(stderrs)
    ratio = (E.pow(2).mean(0).sqrt() / S.pow(2).mean(0).sqrt()).median()
    z = E / S
    within, beyond = (z.abs() <= 2).double().mean(), (z.abs() > 4).double().mean()
    return f"rms {ratio:.2f}, within 2: {within:.0%}, beyond 4: {beyond:.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="generators per estimate")
    parser.add_argument("--matvecs", type=int, nargs="+", default=[30, 100], help="budgets")
    parser.add_argument("--trace", nargs="*", default=["xtrace"], help="trace methods")
    parser.add_argument("--diagonal", nargs="*", default=["xdiag"], help="diagonal methods")
    parser.add_argument("--quick", action="store_true", help="20 seeds, a budget of 30")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.matvecs = 20, [30]
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread")
    print(f"{args.seeds} seeds; errors over reported standard errors (1: honest)")
    for name, A in matrices().items():
        for m in args.matvecs:
            for method in args.trace:
                print(
                    f"{name:22s} m={m:3d} trace {method:10s} {trace_row(A, method, m, args.seeds)}"
                )
            for method in args.diagonal:
                row = diagonal_row(A, method, m, max(2, args.seeds // 2))
                print(f"{name:22s} m={m:3d} diag  {method:10s} {row}")


if __name__ == "__main__":
    main()
