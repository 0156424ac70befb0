"""One model, one batch, one Hessian, on all parameters of the real architectures in train mode.

With dropout active (ViT, LSTM, MobileNet; the ResNet draws no random numbers), the exact
trace of ``model_hessian_trace`` equals the sum of ``model_hessian_diagonal`` equals the trace
of ``model_hessian_matrix``, the per-module exact traces (``groups="module"``, tied weights
counted once, the model's own parameters as ``""``) sum to it, and the matrix is the
oracle's (its products with a random vector are the hand-written ones, batch 0 under seed 0).
"""

import pytest
from torch.testing import assert_close

import torch_secorder as ts
from tests.real import oracle
from tests.real.helpers import checked, own_modules
from tests.real.models import ARCHS, build


@pytest.mark.parametrize("name", [n for n in ARCHS if build(n, "train").stochastic])
def test_exact_trace_diagonal_and_matrix_agree(name):
    arch = build(name, "train")
    model, loss_fn, batch = arch.model, arch.loss_fn, arch.batch
    x, y = batch
    H = checked(model, ts.model_hessian_matrix, model, loss_fn, x, y)
    diagonal = checked(model, ts.model_hessian_diagonal, model, loss_fn, x, y)
    trace = checked(model, ts.model_hessian_trace, model, loss_fn, batch, method="exact")
    per_module = checked(
        model, ts.model_hessian_trace, model, loss_fn, batch, method="exact", groups="module"
    )
    assert_close(H, H.T)
    assert_close(oracle.flat(diagonal), H.diagonal())
    assert_close(trace.value, H.trace())
    names = [n for n, _ in model.named_parameters()]
    assert list(per_module) == list(own_modules(model, names))
    assert_close(sum(t.value for t in per_module.values()), trace.value)
    v = oracle.random_like(model, None, seed=6)
    assert_close(H @ oracle.flat(v), oracle.flat(oracle.hvp(model, loss_fn, [batch], v)))
