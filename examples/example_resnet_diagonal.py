"""The exact Hessian diagonal of a ResNet in eval mode, from a few dozen products.

A ResNet in eval mode is piecewise linear between each layer and its logits (convolutions,
BatchNorm with running statistics, ReLU, pooling), so each layer's curvature is exactly the
Gauss-Newton term, and ``model_hessian_diagonal`` reads every parameter's diagonal entry off
two products per class, whatever the number of parameters; it checks those conditions on
the model and batch first (see the algorithms page). The script builds a CIFAR-style
ResNet-8 (BatchNorm, in-place ReLU, residual blocks), computes the diagonal of its
cross-entropy loss on a batch of random images, and checks 200 random entries against
Hessian-vector products from ``torch.func`` (its ``grad`` twice, with unit vectors). Sums
of the diagonal are exact traces: per module, they are what ``groups="module"`` with
``method="exact"`` returns, plotted as a bar chart.

Run it with ``python examples/example_resnet_diagonal.py --out DIR``; it writes
``resnet_diagonal.json`` and ``resnet_module_traces.png`` to ``DIR``.
"""

# %%
# Imports and command line
# ------------------------
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import torch_secorder as ts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temp dir)")
args = parser.parse_args()
out = args.out or Path(tempfile.mkdtemp(prefix="torch_secorder_resnet_"))
out.mkdir(parents=True, exist_ok=True)


# %%
# A CIFAR-style ResNet-8 in eval mode
# -----------------------------------
class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1, bias=False),
    nn.BatchNorm2d(8),
    nn.ReLU(inplace=True),
    Block(8, 8, 1),
    Block(8, 16, 2),
    Block(16, 32, 2),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(32, 10),
).double()
with torch.no_grad():  # running statistics as after training, not the initial 0 and 1
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
model.eval()
generator = torch.Generator().manual_seed(1)
x = torch.randn(16, 3, 16, 16, generator=generator, dtype=torch.float64)
y = torch.randint(0, 10, (16,), generator=generator)
loss_fn = nn.CrossEntropyLoss()

# %%
# The exact diagonal, and what it cost
# ------------------------------------
# ``HessianOperator.diagonal()`` is the same computation as ``model_hessian_diagonal`` and
# counts its products.
start = time.perf_counter()
diagonal = ts.model_hessian_diagonal(model, loss_fn, x, y)
seconds = time.perf_counter() - start
with ts.HessianOperator.from_model(model, loss_fn, (x, y)) as operator:
    flat = operator.diagonal()
    products = operator.num_matvecs
size = operator.shape[0]
assert_close(flat, torch.cat([d.reshape(-1) for d in diagonal]), rtol=0, atol=0)
print(f"{size} parameters: exact diagonal in {seconds:.2f} s from {products} products")

# %%
# Check: 200 random entries against torch.func
# --------------------------------------------
names = [name for name, _ in model.named_parameters()]
params = {name: p.detach() for name, p in model.named_parameters()}
buffers = {name: b.detach() for name, b in model.named_buffers()}
shapes = [p.shape for p in params.values()]
sizes = [p.numel() for p in params.values()]


def loss_of(theta: torch.Tensor) -> torch.Tensor:
    tensors = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
    return loss_fn(torch.func.functional_call(model, {**tensors, **buffers}, (x,)), y)


theta = torch.cat([p.reshape(-1) for p in params.values()])
entries = torch.randperm(size, generator=generator)[:200]
units = torch.zeros(len(entries), size, dtype=torch.float64)
units[torch.arange(len(entries)), entries] = 1


def hvp(v: torch.Tensor) -> torch.Tensor:
    return torch.func.grad(lambda t: torch.func.grad(loss_of)(t) @ v)(theta)


reference = torch.func.vmap(hvp, chunk_size=20)(units)[torch.arange(len(entries)), entries]
assert_close(flat[entries], reference, rtol=1e-9, atol=1e-12)
largest = float((flat[entries] - reference).abs().max())
print(f"200 random entries agree with torch.func to {largest:.1e}")

# %%
# Exact per-module traces
# -----------------------
# The trace of each module's own block is the sum of its entries of the diagonal.
traces = ts.model_hessian_trace(model, loss_fn, (x, y), groups="module", method="exact")
for module, result in traces.items():
    own = [d for name, d in zip(names, diagonal) if name.rpartition(".")[0] == module]
    assert_close(result.value, sum(d.sum() for d in own), rtol=1e-12, atol=0)
print(f"exact traces of {len(traces)} modules agree with sums of the diagonal")

# %%
# Outputs: per-parameter summary, per-module traces
# -------------------------------------------------
from matplotlib.figure import Figure  # noqa: E402  (the plot extra)

modules = dict(model.named_modules())
counts = {m: sum(p.numel() for p in modules[m].parameters(recurse=False)) for m in traces}
figure = Figure(figsize=(6.4, 5.2), layout="constrained")
ax = figure.subplots()
ax.barh(range(len(traces)), [r.value.item() for r in traces.values()], color="tab:blue")
labels = [f"{m} {type(modules[m]).__name__} ({counts[m]})" for m in traces]
ax.set_yticks(range(len(traces)), labels, fontsize=8)
ax.invert_yaxis()
ax.set_xscale("log")
ax.set_xlabel("exact trace of the module's Hessian block")
ax.set_ylabel("module (parameters)")
figure.suptitle(f"ResNet-8 in eval mode: exact traces of its {len(traces)} modules")
figure.savefig(out / "resnet_module_traces.png", dpi=100)

summary = {
    name: {"numel": d.numel(), "mean": float(d.mean()), "max": float(d.max())}
    for name, d in zip(names, diagonal)
}
module_traces = {m: r.value.item() for m, r in traces.items()}
(out / "resnet_diagonal.json").write_text(
    json.dumps(
        {
            "parameters": size,
            "products": products,
            "seconds": seconds,
            "diagonal": summary,
            "module_traces": module_traces,
        },
        indent=2,
    )
)
print(f"wrote resnet_diagonal.json and resnet_module_traces.png to {out}")
