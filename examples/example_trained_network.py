"""Hessian analysis of a trained network: top eigenvalues, trace and spectral density.

Trains a small MLP classifier on generated data (three Gaussian clusters), then analyses the
Hessian of its mean training loss over the whole training set: the top eigenvalues by
Lanczos (and by power iteration, PyHessian's method, for comparison), the trace by Hutch++
with its standard error, and the eigenvalue density by stochastic Lanczos quadrature,
plotted to a PNG. Every number is checked against the dense Hessian and its eigenvalues
from ``torch.linalg.eigvalsh``.

Run it with ``python examples/example_trained_network.py --out DIR``; it writes
``density.png`` and ``analysis.json`` to ``DIR``.
"""

# %%
# Imports and command line
# ------------------------
import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_secorder as ts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temp dir)")
parser.add_argument("--epochs", type=int, default=60, help="training epochs")
args = parser.parse_args()
out = args.out or Path(tempfile.mkdtemp(prefix="torch_secorder_trained_"))
out.mkdir(parents=True, exist_ok=True)

# %%
# Data and training
# -----------------
# 450 points in three overlapping Gaussian clusters; a 2-12-12-3 tanh MLP trained with Adam.
generator = torch.Generator().manual_seed(0)
centers = torch.tensor([[0.0, 2.0], [-1.7, -1.0], [1.7, -1.0]], dtype=torch.float64)
labels = torch.arange(3).repeat_interleave(150)
points = centers[labels] + torch.randn(450, 2, generator=generator, dtype=torch.float64)
dataset = TensorDataset(points, labels)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
model = model.double()
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
train_loader = DataLoader(
    dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1)
)
for _ in range(args.epochs):
    for x, y in train_loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
with torch.no_grad():
    loss = loss_fn(model(points), labels).item()
    accuracy = (model(points).argmax(dim=1) == labels).double().mean().item()
print(f"trained: loss {loss:.4f}, accuracy {accuracy:.3f}")

# %%
# The Hessian of the training loss
# --------------------------------
# The 450 samples fit in one batch, so the operator builds the gradient graph once and every
# product reuses it. (For a data set that does not fit, pass a DataLoader instead of the
# batch: each product then streams over it; see example_dataset_scale.py.) The model is put
# in eval mode; it has no dropout or BatchNorm, so the mode does not change the Hessian here.
model.eval()
H = ts.HessianOperator.from_model(model, loss_fn, (points, labels))
P = H.shape[0]
print(f"P = {P} parameters")

top = ts.top_eigenvalues(H, k=5)
power = ts.top_eigenvalues(H, k=1, method="power")
trace = ts.hessian_trace(H, method="hutch++")  # 100 products (the default: exact here)
density = ts.spectral_density(H)
density.plot(path=out / "density.png", log=True)  # log scale, as in PyHessian's plots
print(f"top eigenvalues (Lanczos, {top.num_matvecs} products): {top.eigenvalues.tolist()}")
print(f"top eigenvalue (power iteration, {power.num_matvecs} products): {power.eigenvalues[0]:.6f}")
print(f"trace (Hutch++, {trace.num_matvecs} products): {trace.value:.4f} +- {trace.stderr:.4f}")

# %%
# Check against the dense Hessian
# -------------------------------
# The dense Hessian of the same loss from P = 231 unit-vector products.
dense = ts.model_hessian_matrix(model, loss_fn, points, labels)
eigenvalues = torch.linalg.eigvalsh(dense)
exact_top = eigenvalues.flip(0)[:5]
exact_trace = dense.trace()

relative = ((top.eigenvalues - exact_top).abs() / exact_top.abs()).max().item()
if not top.converged or relative > 1e-3:
    raise AssertionError(f"Lanczos eigenvalues off by {relative:.2e} relative")
if abs(power.eigenvalues[0] - exact_top[0]) > 1e-2 * exact_top[0]:
    raise AssertionError("power iteration missed the top eigenvalue by more than 1%")
if abs(trace.value - exact_trace) > 4 * trace.stderr + 1e-12:
    raise AssertionError(
        f"trace {trace.value:.4f} is not within 4 standard errors of {exact_trace:.4f}"
    )
integral = torch.trapezoid(density.density, density.grid).item()
if not math.isclose(integral, 1.0, rel_tol=1e-6):
    raise AssertionError(f"the density integrates to {integral}")
spread = (eigenvalues[-1] - eigenvalues[0]).item()
edges = (density.nodes.min() - eigenvalues[0], density.nodes.max() - eigenvalues[-1])
if max(abs(e.item()) for e in edges) > 1e-3 * spread:
    raise AssertionError(f"the extreme Ritz nodes miss the spectrum's edges by {edges}")

# %%
# Outputs
# -------
summary = {
    "loss": loss,
    "accuracy": accuracy,
    "num_params": P,
    "top_eigenvalues": top.eigenvalues.tolist(),
    "top_eigenvalues_exact": exact_top.tolist(),
    "lanczos_matvecs": top.num_matvecs,
    "power_top_eigenvalue": power.eigenvalues[0].item(),
    "power_matvecs": power.num_matvecs,
    "trace": trace.value.item(),
    "trace_stderr": trace.stderr.item(),
    "trace_exact": exact_trace.item(),
    "density_matvecs": density.num_matvecs,
    "smallest_eigenvalue_exact": eigenvalues[0].item(),
}
(out / "analysis.json").write_text(json.dumps(summary, indent=2))
print(f"all analyses match the dense Hessian; density.png and analysis.json in {out}")
