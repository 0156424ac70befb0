"""Shared checks of the structured diagonal: an oracle, and the plan of a checked call."""

import torch
from torch import nn
from torch.testing import assert_close

from tests import reference as ref
from tests.core.helpers import assert_unchanged, snapshot
from torch_secorder import HessianOperator, diagonal_plan, hessian_diagonal, model_hessian_diagonal
from torch_secorder.core._model import batch_loss

F64 = torch.float64
CE = nn.CrossEntropyLoss()


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def labels(n, classes, seed=1):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def selected(model, params=None):
    if params is None:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [params] if isinstance(params, str) else params
    return [(n, p) for n, p in model.named_parameters() if n in names]


class _Loss(nn.Module):
    """The loss of a model as a module, so that ``functional_call`` sees every use of a weight."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, inputs, targets):
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return self.loss_fn(self.model(*args), targets)


def oracle(model, loss_fn, inputs, targets, params=None):
    """The diagonal from a dense ``torch.func`` Hessian (parameters and buffers passed in).

    The loss runs inside the functional call, so a loss reading the parameters (weight decay)
    differentiates them too.
    """
    names, tensors = zip(*selected(model, params))
    whole = _Loss(model, loss_fn)

    def loss(*values):
        buffers = {f"model.{n}": b.detach().clone() for n, b in model.named_buffers()}
        swapped = {f"model.{n}": v for n, v in zip(names, values)}
        return torch.func.functional_call(whole, (swapped, buffers), (inputs, targets))

    with torch.random.fork_rng():
        torch.manual_seed(0)  # the masks of batch 0, as the model forms draw them
        return ref.diagonal(ref.hessian(loss, list(tensors)), list(tensors))


def generic(model, loss_fn, inputs, targets, params=None):
    """The diagonal by the closure form (one product per element), under the model forms' seed."""
    tensors = [p for _, p in selected(model, params)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return hessian_diagonal(batch_loss(model, loss_fn, inputs, targets), tensors)


def check(model, loss_fn, inputs, targets, params=None, expected=None):
    """Compare the model form with ``expected`` (default: the oracle); return its plan by module.

    Also: nothing changed on the model, the plan's count is what the operator counts, and
    every selected parameter appears in the plan once.
    """
    if expected is None:
        expected = oracle(model, loss_fn, inputs, targets, params)
    before = snapshot(model)
    result = model_hessian_diagonal(model, loss_fn, inputs, targets, params=params)
    assert_unchanged(before, model)
    assert len(result) == len(expected)
    for r, e in zip(result, expected):
        assert_close(r, e)
    plan = diagonal_plan(model, loss_fn, inputs, targets, params=params)
    assert_unchanged(before, model)
    names = [n for layer in plan.layers for n in layer.parameters]
    assert sorted(names) == sorted(n for n, _ in selected(model, params))
    operator = HessianOperator.from_model(model, loss_fn, (inputs, targets), params=params)
    with operator:
        operator.diagonal()
    assert operator.num_matvecs == plan.num_matvecs
    return {layer.module: layer for layer in plan.layers}
