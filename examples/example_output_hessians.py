"""Output Hessians, named blocks and sharpness: what hesse computes.

The Hessian of every output element of a model with respect to its parameters — per sample
and per logit — as one ``(b, *out, P, P)`` tensor and as blocks ``H["P"]["Q"]`` named by
parameter (also only the per-parameter diagonal blocks), the loss Hessian's named blocks,
and the sharpness (largest absolute eigenvalue) of each output Hessian and of the loss
Hessian. The sharpness needs products only: for a CNN whose per-logit Hessians would take
more memory than allowed, ``output_hessian_matrix`` refuses with the size while
``output_sharpness`` runs.

Everything is checked against ``torch.func`` (``jacrev`` of ``jacrev`` over
``functional_call``, an independent implementation) and ``torch.linalg.eigvalsh``.

Run it with ``python examples/example_output_hessians.py --out DIR``; it writes
``output_hessians.json`` to ``DIR``.
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
from torch.func import functional_call, jacrev
from torch.testing import assert_close

import torch_secorder as ts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temp dir)")
args = parser.parse_args()
out = args.out or Path(tempfile.mkdtemp(prefix="torch_secorder_output_hessians_"))
out.mkdir(parents=True, exist_ok=True)

# %%
# Model and data
# --------------
# A small classifier in float64 (so both implementations agree to rounding), in eval mode.
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
model = model.double().eval()
generator = torch.Generator().manual_seed(1)
inputs = torch.randn(5, 2, generator=generator, dtype=torch.float64)
targets = torch.randint(0, 3, (5,), generator=generator)
names = [name for name, _ in model.named_parameters()]
sizes = [p.numel() for p in model.parameters()]
P = sum(sizes)
rows = {}  # each parameter's range of rows and columns in flat order
for name, start, size in zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist(), sizes):
    rows[name] = slice(start, start + size)
print(f"P = {P} parameters: {', '.join(names)}")


def output_hessians_by_torch_func(net, x, selected, element=None):
    """Hessians of every output element (or only of ``element``, flat) with torch.func."""
    tensors = [net.get_parameter(n).detach() for n in selected]
    sizes = [t.numel() for t in tensors]

    def flat_output(theta):
        pieces = [t.view(p.shape) for t, p in zip(theta.split(sizes), tensors)]
        y = functional_call(net, dict(zip(selected, pieces)), (x,)).reshape(-1)
        return y if element is None else y[element]

    return jacrev(jacrev(flat_output))(torch.cat([t.reshape(-1) for t in tensors]))


# %%
# The Hessian of every logit of every sample
# ------------------------------------------
# Entry [k, o] is the P x P Hessian of logit o of sample k. One forward pass serves all 15
# output elements; each costs one gradient and P Hessian-vector products.
H = ts.output_hessian_matrix(model, inputs)
print(f"output_hessian_matrix: shape {tuple(H.shape)}")
reference = output_hessians_by_torch_func(model, inputs, names)
assert_close(H.reshape(-1, P, P), reference)

# The same numbers as blocks named by parameter, each (b, *out, *P.shape, *Q.shape).
blocks = ts.output_hessian_dict(model, inputs)
weight_by_bias = blocks["2.weight"]["4.bias"]
print(f'output_hessian_dict: H["2.weight"]["4.bias"] has shape {tuple(weight_by_bias.shape)}')
assert_close(weight_by_bias.reshape(5, 3, 36, 3), H[:, :, rows["2.weight"], rows["4.bias"]])

# Only the per-parameter diagonal blocks (layer-wise curvature of each output).
diagonal = ts.output_hessian_dict(model, inputs, diagonal_only=True)
for name, p in model.named_parameters():
    n, r = p.numel(), rows[name]
    assert list(diagonal[name]) == [name]
    assert_close(diagonal[name][name].reshape(5, 3, n, n), H[:, :, r, r])

# %%
# The loss Hessian as named blocks
# --------------------------------
loss_fn = nn.CrossEntropyLoss()
loss_blocks = ts.model_hessian_dict(model, loss_fn, inputs, targets)
loss_matrix = ts.model_hessian_matrix(model, loss_fn, inputs, targets)
first = loss_blocks["0.weight"]["0.weight"]
print(f'model_hessian_dict: H["0.weight"]["0.weight"] has shape {tuple(first.shape)}')
for a in names:
    for b in names:
        block = loss_matrix[rows[a], rows[b]]
        assert_close(loss_blocks[a][b].reshape(block.shape), block)

# %%
# Sharpness of every output Hessian and of the loss Hessian
# ---------------------------------------------------------
# Lanczos on products: no matrix is formed. Converged to a relative residual of tol, so the
# values are accurate to tol relative.
sharp = ts.output_sharpness(model, inputs, tol=1e-8)
exact = torch.linalg.eigvalsh(reference).abs().amax(-1).reshape(5, 3)
assert bool(sharp.converged.all())
assert_close(sharp.sharpness, exact, rtol=1e-8, atol=0)
print(f"output_sharpness: {sharp.num_matvecs} products for 15 output Hessians")
loss_sharp = ts.model_sharpness(model, loss_fn, (inputs, targets), tol=1e-8)
loss_exact = torch.linalg.eigvalsh(loss_matrix).abs().max()
assert_close(loss_sharp.eigenvalues.abs()[0], loss_exact, rtol=1e-8, atol=0)
loss_value = loss_sharp.eigenvalues.abs().item()
print(f"model_sharpness: {loss_value:.6f} ({loss_sharp.num_matvecs} products)")

# %%
# Where the dense output Hessians do not fit
# ------------------------------------------
# A small CNN (1626 parameters) on 8 images with 10 logits: its 80 dense output Hessians would
# take 1.6 GiB, more than a max_bytes of 256 MiB allows. The sharpness needs one gradient graph
# and a Lanczos basis of about 20 vectors at a time.
cnn = nn.Sequential(
    nn.Conv2d(1, 4, 3, padding=1),
    nn.Tanh(),
    nn.Conv2d(4, 8, 3, padding=1),
    nn.Tanh(),
    nn.AdaptiveAvgPool2d(4),
    nn.Flatten(),
    nn.Linear(128, 10),
).double()
images = torch.randn(8, 1, 8, 8, generator=generator, dtype=torch.float64)
cnn_names = [name for name, _ in cnn.named_parameters()]
try:
    ts.output_hessian_matrix(cnn, images, max_bytes=256 * 2**20)
    raise AssertionError("the dense output Hessians were not refused")
except ValueError as refusal:
    print(f"refused: {refusal}")
cnn_sharp = ts.output_sharpness(cnn, images)
print(
    f"output_sharpness of the CNN: shape {tuple(cnn_sharp.sharpness.shape)}, "
    f"{cnn_sharp.num_matvecs} products, largest {cnn_sharp.sharpness.max().item():.4f}"
)
# Check three of the 80 against the dense Hessian of their sample alone: no layer of the CNN
# couples samples, so a sample's logits depend on that sample only.
for k, o in [(0, 0), (3, 7), (7, 9)]:
    dense = output_hessians_by_torch_func(cnn, images[k : k + 1], cnn_names, element=o)
    value = torch.linalg.eigvalsh(dense).abs().max()
    # Converged to the default relative residual 1e-4, so the value is that accurate.
    assert_close(cnn_sharp.sharpness[k, o], value, rtol=1e-4, atol=0)

# %%
# Outputs
# -------
summary = {
    "num_params": P,
    "output_hessians_shape": list(H.shape),
    "output_sharpness": sharp.sharpness.tolist(),
    "loss_sharpness": loss_sharp.eigenvalues.abs().item(),
    "cnn_output_sharpness": cnn_sharp.sharpness.tolist(),
    "cnn_num_matvecs": cnn_sharp.num_matvecs,
}
(out / "output_hessians.json").write_text(json.dumps(summary, indent=2))
print(f"every result matches torch.func and eigvalsh; written to {out}")
