"""The forward context: operators without a double backward, routed or named."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from tests.core.helpers import assert_unchanged, cdist_model, snapshot
from torch_secorder import hessian_diagonal, hessian_matrix, model_hessian_matrix, model_hvp
from torch_secorder.core._forward import forward_context

F64 = torch.float64


class _Gate(nn.Module):
    """Squeeze-excite gated by a hardsigmoid, as torchvision's MobileNetV3."""

    def __init__(self, inplace=False):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.gate = nn.Hardsigmoid(inplace=inplace)

    def forward(self, x):
        return x * self.gate(self.fc(x) * 4)  # * 4: inputs on both flat parts and the slope


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64)


def _plain_hessian(model, x, y):
    """Double backward of the same loss with the gate written as relu6(x + 3) / 6."""
    params = list(model.parameters())

    def loss():
        z = model.fc(x) * 4
        return F.mse_loss(x * (F.relu6(z + 3) / 6), y)

    (g,) = [
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss(), params, create_graph=True)])
    ]
    rows = [torch.autograd.grad(g[i], params, retain_graph=True) for i in range(g.numel())]
    return torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in rows])


def test_pytorch_cannot_differentiate_hardsigmoid_twice():
    # what the routing is for; if PyTorch gains the derivative, the routing can go
    z = torch.randn(4, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(F.hardsigmoid(z * 4).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):
        torch.autograd.grad(g.sum(), z)


@pytest.mark.parametrize("inplace", [False, True])
def test_hardsigmoid_is_differentiated_twice_in_model_and_closure_forms(inplace):
    torch.manual_seed(0)
    model = _Gate(inplace).to(F64)
    x, y = _data()
    expected = _plain_hessian(model, x, y)
    before = snapshot(model)
    assert_close(model_hessian_matrix(model, nn.MSELoss(), x, y), expected)
    assert_unchanged(before, model)
    params = list(model.parameters())
    assert_close(hessian_matrix(lambda: F.mse_loss(model(x), y), params), expected)


def test_routing_ends_with_the_forward_pass():
    z = torch.randn(4, dtype=F64, requires_grad=True)
    with forward_context([z]):
        assert torch.equal(F.hardsigmoid(z * 4), F.relu6(z * 4 + 3) / 6)
    (g,) = torch.autograd.grad(F.hardsigmoid(z * 4).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):
        torch.autograd.grad(g.sum(), z)


def test_an_operator_without_second_derivative_is_named_with_its_module():
    model = cdist_model()
    x, _ = _data()
    y = torch.zeros(8, 2, dtype=F64)
    before = snapshot(model)
    with pytest.raises(
        RuntimeError,
        match=r"model_hvp: PyTorch cannot differentiate the operator 'cdist' twice .*, called "
        r"in module '2' \(_Distances\)",
    ):
        model_hvp(model, nn.MSELoss(), x, y, torch.ones(18, dtype=F64))
    assert_unchanged(before, model)


def test_an_operator_without_second_derivative_is_named_in_the_closure_form():
    model = cdist_model()
    x, _ = _data()
    with pytest.raises(
        RuntimeError, match=r"hessian_diagonal: PyTorch cannot differentiate the operator 'cdist'"
    ) as info:
        hessian_diagonal(lambda: model(x).square().mean(), list(model.parameters()))
    assert "called in" not in str(info.value)
