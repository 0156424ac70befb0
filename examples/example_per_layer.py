"""Per-layer curvature in one call: eigenvalues, traces and densities of every layer's block.

The model forms of the analyses take ``groups=``: ``"module"`` gives one group per module
that owns parameters, ``"parameter"`` one per parameter, and a dict any grouping by
parameter names or glob patterns. Each group is analysed on its own diagonal block
:math:`H_{gg}` of the Hessian, and all groups advance together: one batched product per
step serves every group, instead of one analysis after another.

The script trains nothing: it takes a small regression MLP at initialisation, computes per
layer the top eigenvalues, the trace and the spectral density (plotted to one PNG), and a
custom grouping, and checks every number against the dense Hessian's blocks.

Run it with ``python examples/example_per_layer.py --out DIR``; it writes
``per_layer.json`` and ``per_layer_density.png`` to ``DIR``.
"""

# %%
# Imports and command line
# ------------------------
import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.testing import assert_close

import torch_secorder as ts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temp dir)")
args = parser.parse_args()
out = args.out or Path(tempfile.mkdtemp(prefix="torch_secorder_per_layer_"))
out.mkdir(parents=True, exist_ok=True)

# %%
# Model and data
# --------------
torch.manual_seed(0)
model = nn.Sequential(
    nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 1)
).double()
loss_fn = nn.MSELoss()
generator = torch.Generator().manual_seed(1)
inputs = torch.randn(200, 3, generator=generator, dtype=torch.float64)
noise = 0.1 * torch.randn(200, 1, generator=generator, dtype=torch.float64)
targets = torch.sin(inputs[:, :1]) * torch.cos(inputs[:, 1:2]) + noise
data = (inputs, targets)  # one batch; a DataLoader works the same way

# %%
# Per-layer analyses
# ------------------
# Group names are the modules' qualified names: "0", "2" and "4" (the Tanh layers own no
# parameters). Each result is that of the layer's own block.
eigen = ts.model_top_eigenvalues(model, loss_fn, data, groups="module", k=3)
traces = ts.model_hessian_trace(model, loss_fn, data, groups="module", method="exact")
densities = ts.model_spectral_density(model, loss_fn, data, groups="module", num_matvecs=120)
# A custom grouping: the hidden layers' weights, and every bias.
custom = ts.model_top_eigenvalues(
    model, loss_fn, data, groups={"hidden weights": ["0.weight", "2.weight"], "biases": "*.bias"}
)
for name, result in eigen.items():
    print(
        f"layer {name}: top eigenvalues {[round(v, 5) for v in result.eigenvalues.tolist()]}, "
        f"trace {traces[name].value.item():.5f}"
    )
for name, result in custom.items():
    print(f"group {name!r}: top eigenvalue {result.eigenvalues[0].item():.5f}")

# %%
# Check against the dense Hessian's blocks
# ----------------------------------------
H = ts.model_hessian_matrix(model, loss_fn, inputs, targets)
names = [name for name, _ in model.named_parameters()]
sizes = [p.numel() for p in model.parameters()]
offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))


def rows(parameter_names):
    return torch.cat(
        [torch.arange(offsets[n], offsets[n] + sizes[names.index(n)]) for n in parameter_names]
    )


def block(parameter_names):
    index = rows(parameter_names)
    return H[index][:, index]


def check_eigen(result, parameter_names, k):
    exact = torch.linalg.eigvalsh(block(parameter_names)).flip(0)[:k]
    if not result.converged:
        raise AssertionError(f"{parameter_names}: Lanczos did not converge")
    # Converged to a relative residual of 1e-4, so the eigenvalues are that accurate.
    assert_close(result.eigenvalues, exact, rtol=1e-4, atol=1e-10)


modules = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"], "4": ["4.weight", "4.bias"]}
if list(eigen) != list(modules):
    raise AssertionError(f"unexpected groups {list(eigen)}")
for name, members in modules.items():
    check_eigen(eigen[name], members, 3)
    assert_close(traces[name].value, block(members).trace())
    spectrum = torch.linalg.eigvalsh(block(members))
    nodes = densities[name].nodes
    spread = (spectrum[-1] - spectrum[0]).item()
    if max(abs(nodes.min() - spectrum[0]), abs(nodes.max() - spectrum[-1])) > 1e-3 * spread:
        raise AssertionError(f"layer {name}: the density's edges miss the block's spectrum")
check_eigen(custom["hidden weights"], ["0.weight", "2.weight"], 1)
check_eigen(custom["biases"], ["0.bias", "2.bias", "4.bias"], 1)

# %%
# Outputs
# -------
from matplotlib.figure import Figure  # noqa: E402  (the plot extra)

figure = Figure(figsize=(4 * len(densities), 3.2), layout="constrained")
for ax, (name, density) in zip(figure.subplots(1, len(densities)), densities.items()):
    density.plot(ax, log=True)
    ax.set_title(f"layer {name}")
figure.savefig(out / "per_layer_density.png", dpi=120)

summary = {
    name: {
        "top_eigenvalues": eigen[name].eigenvalues.tolist(),
        "trace": traces[name].value.item(),
        "num_matvecs": eigen[name].num_matvecs,
    }
    for name in eigen
}
summary["custom"] = {name: r.eigenvalues.tolist() for name, r in custom.items()}
(out / "per_layer.json").write_text(json.dumps(summary, indent=2))
print(f"every layer's results match the dense Hessian's blocks; written to {out}")
