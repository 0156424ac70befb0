"""Quickstart: every quantity in the closure form and the model form.

A small classifier (a tanh MLP with a cross-entropy loss) on generated data. The script
computes Hessian-vector products, a batch of them, the exact Hessian diagonal, the
per-parameter blocks, the full Hessian, products with ``HessianOperator``, the top
eigenvalues and the trace — from a loss closure with its parameters and, where a model form
exists, from the model — and checks every result against the dense Hessian from
``torch.func`` (``jacrev`` of ``jacrev``), an independent implementation.

Run it with ``python examples/example_quickstart.py --out DIR``; it writes the Hessian and a
summary to ``DIR``.
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
out = args.out or Path(tempfile.mkdtemp(prefix="torch_secorder_quickstart_"))
out.mkdir(parents=True, exist_ok=True)

# %%
# Model and data
# --------------
# float64 so that both implementations agree to rounding error.
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
loss_fn = nn.CrossEntropyLoss()
generator = torch.Generator().manual_seed(1)
inputs = torch.randn(32, 4, generator=generator, dtype=torch.float64)
targets = torch.randint(0, 3, (32,), generator=generator)

# The closure form: a zero-argument function returning the loss, and the parameters.
params = list(model.parameters())


def func():
    return loss_fn(model(inputs), targets)


P = sum(p.numel() for p in params)
print(f"P = {P} parameters in {len(params)} tensors")

# %%
# Hessian-vector products
# -----------------------
# A vector like params (one tensor per parameter) gives a list; a flat vector a flat one.
v = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
hv = ts.hvp(func, params, v)
hv_model = ts.model_hvp(model, loss_fn, inputs, targets, v)
hv_flat = ts.hvp(func, params, ts.flatten(v))

# Eight vectors at once, stacked as a (k, P) tensor: one gradient graph, batched products.
V = torch.randn(8, P, generator=generator, dtype=torch.float64)
HV = ts.batched_hvp(func, params, V)

# %%
# Diagonal, blocks, matrix
# ------------------------
diagonal = ts.hessian_diagonal(func, params)
diagonal_model = ts.model_hessian_diagonal(model, loss_fn, inputs, targets)
blocks = ts.hessian_blocks(func, params)
H = ts.hessian_matrix(func, params)
H_model = ts.model_hessian_matrix(model, loss_fn, inputs, targets)
# The block of the output layer only, selected by a glob pattern on the parameter names.
H_head = ts.model_hessian_matrix(model, loss_fn, inputs, targets, params="2.*")

# %%
# The Hessian as a linear operator
# --------------------------------
# The gradient graph is built at the first product and reused until the ``with`` ends.
with ts.HessianOperator(func, params) as op:
    HV_op = op @ V.T  # (P, k) columns, as SciPy
    num_matvecs = op.num_matvecs

# %%
# Analyses
# --------
# Extreme eigenvalues by Lanczos and the trace, from the closure and from the model (whose
# data argument is one (inputs, targets) batch or an iterable of batches).
top = ts.top_eigenvalues(func, params, k=3)
top_model = ts.model_top_eigenvalues(model, loss_fn, (inputs, targets), k=3)
trace = ts.hessian_trace(func, params, method="exact")
trace_model = ts.model_hessian_trace(model, loss_fn, (inputs, targets), method="hutch++")

# %%
# Check everything against torch.func
# -----------------------------------
named = dict(model.named_parameters())


def loss_of_flat(flat):
    tensors = dict(zip(named, ts.unflatten(flat, params)))
    return loss_fn(functional_call(model, tensors, (inputs,)), targets)


reference = jacrev(jacrev(loss_of_flat))(ts.flatten([p.detach() for p in params]))

assert_close(H, reference)
assert_close(H_model, reference)
assert_close(H_head, reference[-21:, -21:])  # "2.weight" (3 x 6) and "2.bias" (3): 21 entries
assert_close(ts.flatten(hv), reference @ ts.flatten(v))
assert_close(ts.flatten(hv_model), ts.flatten(hv))
assert_close(hv_flat, ts.flatten(hv))
assert_close(HV, V @ reference)
assert_close(HV_op, reference @ V.T)
assert_close(ts.flatten(diagonal), reference.diagonal())
assert_close(ts.flatten(diagonal_model), reference.diagonal())
offset = 0
for block, p in zip(blocks, params):
    n = p.numel()
    assert_close(block, reference[offset : offset + n, offset : offset + n])
    offset += n
if num_matvecs != 8:
    raise AssertionError(f"the operator counted {num_matvecs} products; expected 8")
exact_top = torch.linalg.eigvalsh(reference).flip(0)[:3]
# Lanczos stops at a relative residual of 1e-4, which bounds the eigenvalues' relative error.
assert_close(top.eigenvalues, exact_top, rtol=1e-4, atol=1e-12)
assert_close(top_model.eigenvalues, exact_top, rtol=1e-4, atol=1e-12)
assert_close(trace.value, reference.trace())
if abs(trace_model.value - reference.trace()) > 4 * trace_model.stderr + 1e-12:
    raise AssertionError("the Hutch++ trace is not within four standard errors of the trace")

# %%
# Outputs
# -------
eigenvalues = torch.linalg.eigvalsh(H)
torch.save({"hessian": H, "diagonal": diagonal}, out / "quickstart.pt")
summary = {
    "num_params": P,
    "trace": H.trace().item(),
    "trace_hutch++": [trace_model.value.item(), trace_model.stderr.item()],
    "largest_eigenvalue": eigenvalues[-1].item(),
    "smallest_eigenvalue": eigenvalues[0].item(),
    "max_abs_error_vs_torch_func": (H - reference).abs().max().item(),
}
(out / "quickstart.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
print(f"all results match torch.func; written to {out}")
