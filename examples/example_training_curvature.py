"""Curvature during training: progressive sharpening and the edge of stability.

Full-batch gradient descent with learning rate :math:`\\eta` on a neural network makes the top
eigenvalue of the training loss Hessian rise (progressive sharpening) until it reaches
:math:`2/\\eta`, the largest curvature a gradient step can follow, and then hover there while
the loss keeps falling (the edge of stability; Cohen et al. 2021, arXiv:2103.00065). Adam does
the same with the preconditioned Hessian :math:`P^{-1}H` and its threshold
:math:`(2 + 2\\beta_1)/(\\eta(1 - \\beta_1)) = 38/\\eta` (Cohen et al. 2022, arXiv:2207.14484).

The script trains a small tanh network on generated data with full-batch gradient descent at
two learning rates and with Adam at two learning rates, each with a
:class:`~torch_secorder.CurvatureMonitor` checking every 20 steps (each check warm-started
from the last one's eigenvector), and per layer for one run. It checks that each run's
sharpness reaches its threshold and stays near it, the last recorded values against a Lanczos
iteration written here with plain double backward, and that a run with the monitor ends at
bitwise the same weights as one without.

Run it with ``python examples/example_training_curvature.py --out DIR``; it writes
``training_curvature.png`` and each run's history as ``history_<run>.csv`` to ``DIR``.
"""

# %%
# Imports and command line
# ------------------------
import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import torch_secorder as ts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temp dir)")
args = parser.parse_args()
out = args.out or Path(tempfile.mkdtemp(prefix="torch_secorder_training_curvature_"))
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # a tiny model: one thread is fastest

# %%
# Data, model and loss
# --------------------
# 300 points in 16 dimensions, labelled by the nearest of 5 random directions, fitted with the
# square loss on one-hot targets, as in Cohen et al. (0.5 * squared error summed over the
# classes, averaged over the samples).
generator = torch.Generator().manual_seed(0)
inputs = torch.randn(300, 16, generator=generator)
directions = torch.randn(5, 16, generator=generator)
labels = (inputs @ directions.T).argmax(dim=1)
targets = nn.functional.one_hot(labels, 5).float()
data = (inputs, targets)  # the full batch: the monitored Hessian is the training loss's


def loss_fn(outputs, targets):
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
        nn.Linear(32, 5),
    )  # fmt: skip


def train(make_optimizer, steps, monitored=True, **options):
    """Full-batch training; a monitor checks every 20 steps (and before the first)."""
    model = make_model()
    optimizer = make_optimizer(model.parameters())
    monitor = None
    if monitored:
        monitor = ts.CurvatureMonitor(
            model, loss_fn, data, every=20, optimizer=optimizer, **options
        )
        monitor.check()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step()
    return model, optimizer, monitor, loss.item()


# %%
# Gradient descent at two learning rates, and Adam at two
# -------------------------------------------------------
# The run at eta = 0.4 also monitors each Linear layer's own block of the Hessian.
runs = {}
began = time.perf_counter()
for lr in (0.4, 0.6):
    groups = "module" if lr == 0.4 else None
    runs[f"gd_{lr}"] = train(lambda p, lr=lr: torch.optim.SGD(p, lr=lr), 700, groups=groups)
for lr in (0.01, 0.02):
    runs[f"adam_{lr}"] = train(lambda p, lr=lr: torch.optim.Adam(p, lr=lr), 700)
for name, (_, _, monitor, loss) in runs.items():
    checks = len(monitor.history.select("eigenvalue"))
    print(
        f"{name}: final loss {loss:.2e}, {checks} checks, {monitor.num_matvecs} products "
        f"({monitor.num_matvecs / checks:.1f} per check), {monitor.seconds:.1f} s"
    )
    monitor.history.to_csv(out / f"history_{name}.csv")
print(f"training and monitoring took {time.perf_counter() - began:.1f} s")

# %%
# Checks
# ------
# Progressive sharpening up to the threshold, then the edge of stability: the sharpness starts
# well below the threshold, reaches it, and the last 200 steps stay within 10% of it.
for name, (_, _, monitor, _) in runs.items():
    history = monitor.history
    quantity = "preconditioned_eigenvalue" if name.startswith("adam") else "eigenvalue"
    steps, values = history.series(quantity)
    threshold = history.series("threshold")[1][-1]
    late = [v for s, v in zip(steps, values) if s >= steps[-1] - 200]
    print(
        f"{name}: sharpness from {values[0]:.4g} up to {max(values):.4g}, "
        f"last 200 steps {min(late):.4g} to {max(late):.4g}, threshold {threshold:.4g}"
    )
    if not values[0] < 0.8 * threshold or max(values) < 0.98 * threshold:
        raise AssertionError(f"{name}: no progressive sharpening up to the threshold")
    if not all(abs(v / threshold - 1) < 0.1 for v in late):
        raise AssertionError(f"{name}: the sharpness left the edge of stability")

# The monitor leaves no trace: the same run without it ends at bitwise the same weights.
plain, _, _, _ = train(lambda p: torch.optim.SGD(p, lr=0.4), 700, monitored=False)
watched = runs["gd_0.4"][0]
if not all(torch.equal(a, b) for a, b in zip(plain.parameters(), watched.parameters())):
    raise AssertionError("training with the monitor differs from training without it")


def lanczos_top(model, scale=None, steps=80):
    """Top eigenvalue of S H S (S = scale, default I) in float64 by Lanczos with full
    reorthogonalisation, Hessian-vector products by plain double backward."""
    model = model.double()
    params = list(model.parameters())
    loss = loss_fn(model(inputs.double()), targets.double())
    gradient = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)]
    )
    s = torch.ones_like(gradient) if scale is None else scale.double()

    def product(v):
        Hv = torch.autograd.grad(gradient, params, s * v, retain_graph=True)
        return s * torch.cat([h.reshape(-1) for h in Hv])

    basis = [
        torch.randn(
            gradient.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64
        )
    ]
    basis[0] /= basis[0].norm()
    T = torch.zeros(steps, steps, dtype=torch.float64)
    for j in range(steps):
        w = product(basis[j])
        for _ in range(2):  # full reorthogonalisation, twice
            Q = torch.stack(basis, dim=1)
            w = w - Q @ (Q.T @ w)
        T[j, j] = basis[j] @ product(basis[j])
        if j + 1 < steps:
            T[j, j + 1] = T[j + 1, j] = w.norm()
            basis.append(w / w.norm())
    return float(torch.linalg.eigvalsh(T)[-1])


for name, (model, optimizer, monitor, _) in runs.items():
    if name.startswith("adam"):  # P = (1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps), read here
        beta1, beta2 = optimizer.param_groups[0]["betas"]
        eps = optimizer.param_groups[0]["eps"]
        P = []
        for p in model.parameters():
            state = optimizer.state[p]
            t = float(state["step"])
            P.append((1 - beta1**t) * ((state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps))
        scale = torch.cat([d.reshape(-1) for d in P]).rsqrt()
        recorded = monitor.history.series("preconditioned_eigenvalue")[1][-1]
        reference = lanczos_top(model, scale)
    else:
        recorded = monitor.history.series("eigenvalue")[1][-1]
        reference = lanczos_top(model)
    print(f"{name}: last recorded {recorded:.6g}, independent Lanczos {reference:.6g}")
    if abs(recorded - reference) > 1e-3 * reference:  # float32 products against float64
        raise AssertionError(f"{name}: the recorded sharpness disagrees with the reference")

# %%
# Figure
# ------
from matplotlib.figure import Figure  # noqa: E402  (the plot extra)

figure = Figure(figsize=(13, 3.6), layout="constrained")
gd, layers, adam = figure.subplots(1, 3)
for color, lr in (("C0", 0.4), ("C3", 0.6)):
    runs[f"gd_{lr}"][2].history.plot(gd, color=color, label=f"η={lr}", groups=False)
gd.set_title("Gradient descent: up to 2/η, then the edge")
runs["gd_0.4"][2].history.plot(layers)
layers.set_title("Per layer (each Linear's own block), η=0.4")
for color, lr in (("C1", 0.01), ("C4", 0.02)):
    runs[f"adam_{lr}"][2].history.plot(adam, color=color, label=f"η={lr}")
adam.set_title("Adam: preconditioned, up to 38/η")
figure.savefig(out / "training_curvature.png", dpi=90)
print(f"the sharpness of every run reached its stability threshold and stayed; written to {out}")
