"""Curvature with respect to activations and inputs: layer sensitivity and per-sample sharpness.

The Hessian of the loss with respect to a layer's *output* says how sensitive the loss is to
perturbing that layer's activations, as quantizing them does: HAWQ ranks layers for
mixed-precision quantization by its trace, averaged over the layer's entries. The Hessian with
respect to the *inputs*, one sample at a time, measures how sharply the loss bends around each
input, the curvature that robustness studies and input-curvature regularisers look at.

The script trains a small tanh CNN on generated bar images, ranks its layers by the exact
trace of their activation Hessians over the data set
(``model_hessian_trace(..., wrt="activations", modules=..., groups="module")``), computes the
top eigenvalue and the trace of every sample's input Hessian
(``wrt="inputs", groups="sample"``), plots both, and checks them against ``torch.func``
Hessians of the model split at each layer and of each sample's loss in its input.

Run it with ``python examples/example_activation_curvature.py --out DIR``; it writes
``activation_curvature.json`` and ``activation_curvature.png`` to ``DIR``.
"""

# %%
# Imports and command line
# ------------------------
import argparse
import json
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import torch_secorder as ts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temp dir)")
args = parser.parse_args()
out = args.out or Path(tempfile.mkdtemp(prefix="torch_secorder_activations_"))
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)

# %%
# Data: 8x8 images of a horizontal, a vertical or a diagonal bar, with noise
# ---------------------------------------------------------------------------
generator = torch.Generator().manual_seed(0)


def bars(n):
    labels = torch.randint(0, 3, (n,), generator=generator)
    where = torch.randint(1, 7, (n,), generator=generator)
    images = 0.3 * torch.randn(n, 1, 8, 8, generator=generator, dtype=torch.float64)
    for i, (label, k) in enumerate(zip(labels.tolist(), where.tolist())):
        if label == 0:
            images[i, 0, k, :] += 1.0
        elif label == 1:
            images[i, 0, :, k] += 1.0
        else:
            images[i, 0].diagonal().add_(1.0)
    return images, labels


images, labels = bars(192)
data = [(images[i : i + 64], labels[i : i + 64]) for i in range(0, 192, 64)]  # three batches

# %%
# A small CNN, trained for a few seconds
# --------------------------------------
torch.manual_seed(0)
model = nn.Sequential(
    OrderedDict(
        conv1=nn.Conv2d(1, 4, 3, padding=1),
        act1=nn.Tanh(),
        conv2=nn.Conv2d(4, 8, 3, padding=1, stride=2),
        act2=nn.Tanh(),
        flatten=nn.Flatten(),
        fc1=nn.Linear(128, 32),
        act3=nn.Tanh(),
        fc2=nn.Linear(32, 3),
    )
).double()
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(150):
    optimizer.zero_grad()
    loss_fn(model(images), labels).backward()
    optimizer.step()
model.eval()
with torch.no_grad():
    accuracy = (model(images).argmax(1) == labels).double().mean().item()
print(f"training accuracy {accuracy:.3f}")

# %%
# Layer sensitivity: the exact trace of each layer's activation Hessian
# ----------------------------------------------------------------------
# Over the data set the variables are every batch's activations: the operator is block
# diagonal over the batches, each block weighted n_b / N, so a layer's trace is the mean over
# the samples of the trace of their own loss's Hessian in that layer's output. The samples
# are independent (no batch statistics), which the library checks, so the exact diagonal of
# a layer costs its size per sample in products, whatever the number of samples.
layers = ["conv1", "conv2", "fc1", "fc2"]
traces = ts.model_hessian_trace(
    model, loss_fn, data, wrt="activations", modules=layers, groups="module", method="exact"
)
with torch.no_grad():
    found = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda m, a, o, name=name: found.update({name: o})
        )
        for name in layers
    ]
    model(images[:1])
    for hook in hooks:
        hook.remove()
per_entry = {name: traces[name].value.item() / found[name].numel() for name in layers}
ranking = sorted(layers, key=per_entry.get, reverse=True)
for name in ranking:
    print(
        f"{name:6s} {found[name].numel():4d} activations per sample: trace "
        f"{traces[name].value.item():.4e}, per activation {per_entry[name]:.3e} "
        f"({traces[name].num_matvecs} products)"
    )

# %%
# Per-sample sharpness: the top eigenvalue and trace of each sample's input Hessian
# ----------------------------------------------------------------------------------
# groups="sample" analyses each sample's block of N H, the Hessian of the sample's own loss in
# its input; the samples' Lanczos runs share every product.
first = data[0]
tops = ts.model_top_eigenvalues(model, loss_fn, first, wrt="inputs", groups="sample")
input_traces = ts.model_hessian_trace(model, loss_fn, first, wrt="inputs", groups="sample")
top = torch.stack([tops[i].eigenvalues[0] for i in range(64)])
trace = torch.stack([input_traces[i].value for i in range(64)])
with torch.no_grad():
    sample_loss = F.cross_entropy(model(first[0]), first[1], reduction="none")
print(
    f"input Hessian of {len(tops)} samples: top eigenvalues from {top.min().item():.2e} to "
    f"{top.max().item():.2e}, {max(r.num_matvecs for r in tops.values())} products at most"
)

# %%
# Check against torch.func
# ------------------------
# Each layer's trace is the mean over samples of the trace of the model split at the layer,
# the part after it as a function of the layer's output, for the sample's own loss.
names = list(model._modules)


def split_trace(name, x, y):
    """Sum over the samples of the trace of their loss's Hessian in ``name``'s output."""
    position = names.index(name)
    head, tail = model[: position + 1], model[position + 1 :]
    with torch.no_grad():
        z = head(x)

    def sample_loss(z_i, y_i):
        return F.cross_entropy(tail(z_i[None]), y_i[None])

    hessians = torch.func.vmap(torch.func.jacrev(torch.func.jacrev(sample_loss)))(z, y)
    return hessians.reshape(len(x), z[0].numel(), -1).diagonal(dim1=1, dim2=2).sum()


for name in layers:
    expected = sum(split_trace(name, x, y) for x, y in data) / len(images)
    assert_close(traces[name].value, expected)


def input_hessians(x, y):
    def sample_loss(x_i, y_i):
        return F.cross_entropy(model(x_i[None]), y_i[None])

    return torch.func.vmap(torch.func.jacrev(torch.func.jacrev(sample_loss)))(x, y).reshape(
        len(x), 64, 64
    )


expected = input_hessians(*first)
assert_close(trace, expected.diagonal(dim1=1, dim2=2).sum(1))
assert_close(top, torch.linalg.eigvalsh(expected)[:, -1], rtol=1e-4, atol=1e-10)

# %%
# Outputs
# -------
from matplotlib.figure import Figure  # noqa: E402  (the plot extra)

figure = Figure(figsize=(9, 3.4), layout="constrained")
left, right = figure.subplots(1, 2)
left.barh(ranking[::-1], [per_entry[name] for name in ranking[::-1]], color="tab:blue")
left.set_xscale("log")
left.set_xlabel("activation-Hessian trace per activation")
left.set_title("layer sensitivity (HAWQ)")
scatter = right.scatter(sample_loss.numpy(), top.numpy(), c=first[1].numpy(), cmap="viridis", s=14)
right.set_xscale("log")
right.set_yscale("log")
right.set_xlabel("sample loss")
right.set_ylabel("top eigenvalue of the input Hessian")
right.set_title("per-sample input curvature")
figure.colorbar(scatter, ax=right, label="class", ticks=[0, 1, 2])
figure.savefig(out / "activation_curvature.png", dpi=120)

summary = {
    "accuracy": accuracy,
    "layers": {
        name: {
            "trace": traces[name].value.item(),
            "per_activation": per_entry[name],
            "num_matvecs": traces[name].num_matvecs,
        }
        for name in layers
    },
    "ranking": ranking,
    "input_top_eigenvalues": top.tolist(),
    "input_traces": trace.tolist(),
}
(out / "activation_curvature.json").write_text(json.dumps(summary, indent=2))
print(f"layer traces and per-sample input curvature match torch.func; written to {out}")
