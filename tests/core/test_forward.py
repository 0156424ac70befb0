"""The forward context: operators without a double backward, routed or named."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from tests import reference as ref
from tests.core.helpers import assert_unchanged, cdist_model, snapshot
from torch_secorder import (
    HessianOperator,
    hessian_diagonal,
    hessian_matrix,
    hvp,
    model_hessian_matrix,
    model_hvp,
)
from torch_secorder.core._forward import forward_context, forward_facts, next_node_number

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

    return ref.double_backward_hessian(loss, params)


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


def _weight_normed(dim):
    torch.manual_seed(0)
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4), dim=dim)
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 3)).to(F64)


def _plain_weight_norm_hessian(model, x, y, dim):
    """Double backward of the same loss with the weight written as v g / |v| by hand."""
    original = (
        model[0].parametrizations.weight.original0,
        model[0].parametrizations.weight.original1,
    )
    params = list(model.parameters())

    def loss():
        g, v = original
        norms = v.norm(dim=1 - dim, keepdim=True)
        weight = v * (g / norms)
        return F.mse_loss(model[2](torch.tanh(F.linear(x, weight, model[0].bias))), y)

    return ref.double_backward_hessian(loss, params)


def test_pytorch_differentiates_a_fused_weight_norm_twice_wrongly():
    # what the routing is for; if PyTorch's second derivative becomes right, it can go
    v = torch.randn(4, 3, dtype=F64, requires_grad=True)
    g = torch.randn(4, 1, dtype=F64, requires_grad=True)
    for weight_norm in (
        torch._weight_norm,
        lambda v, g, dim: v * (g / v.norm(dim=1, keepdim=True)),
    ):
        (gv,) = torch.autograd.grad(weight_norm(v, g, 0).tanh().sum(), v, create_graph=True)
        H = torch.stack(
            [
                torch.autograd.grad(gv.reshape(-1)[i], v, retain_graph=True)[0].reshape(-1)
                for i in range(12)
            ]
        )
        asymmetry = float((H - H.T).abs().max())
        if weight_norm is torch._weight_norm:
            assert asymmetry > 1e-3
        else:
            assert asymmetry < 1e-12


@pytest.mark.parametrize("dim", [0, 1])
def test_a_weight_normed_layer_is_differentiated_twice_correctly(dim):
    model = _weight_normed(dim)
    x, y = _data()
    expected = _plain_weight_norm_hessian(model, x, y, dim)
    before = snapshot(model)
    assert_close(model_hessian_matrix(model, nn.MSELoss(), x, y), expected)
    assert_unchanged(before, model)
    params = list(model.parameters())
    assert_close(hessian_matrix(lambda: F.mse_loss(model(x), y), params), expected)
    diagonal = torch.cat(
        [t.reshape(-1) for t in hessian_diagonal(lambda: F.mse_loss(model(x), y), params)]
    )
    assert_close(diagonal, expected.diagonal())


def _facts(build):
    first = next_node_number()
    return forward_facts(build(), first)


def test_forward_facts_find_what_needs_a_route_and_custom_functions():
    z = torch.randn(2, 4, 3, 3, dtype=F64, requires_grad=True)
    gn = nn.GroupNorm(2, 4).to(F64)
    assert _facts(lambda: (z * 2).tanh().sum()) == (False, False)
    assert _facts(lambda: F.hardsigmoid(z * 4).sum()) == (True, False)
    assert _facts(lambda: gn(z * 1).sum()) == (False, False)
    channels_last = (z * 1).contiguous(memory_format=torch.channels_last)
    assert _facts(lambda: gn(channels_last).sum()) == (True, False)
    g = torch.ones(2, 1, 1, 1, dtype=F64, requires_grad=True)
    assert _facts(lambda: torch._weight_norm(z * 1, g, 0).sum()) == (True, False)

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a * a

        @staticmethod
        def backward(ctx, grad):
            (a,) = ctx.saved_tensors
            return 2 * a * grad

    assert _facts(lambda: Square.apply(z * 2).sum()) == (False, True)

    def in_place_on_a_view():  # (the hardsigmoid hides in the view's CopySlices node)
        y = z * 4
        F.hardsigmoid(y[:, :2], inplace=True)
        return y.sum()

    assert _facts(in_place_on_a_view)[0]
    # only the pass's own nodes: a hardsigmoid computed before it is not its concern
    before = F.hardsigmoid(z * 4)
    assert _facts(lambda: (before * 2).sum()) == (False, False)


def test_a_forward_pass_runs_once_without_a_route_and_again_where_it_needs_one():
    torch.manual_seed(0)
    x, y = _data()
    calls = []
    for model in (nn.Sequential(nn.Linear(3, 3), nn.Tanh()).to(F64), _Gate().to(F64)):
        params = list(model.parameters())

        def loss(model=model):
            calls.append(1)
            return F.mse_loss(model(x), y)

        v = [torch.ones_like(p) for p in params]
        expected = hessian_matrix(loss, params) @ torch.ones(12, dtype=F64)
        calls.clear()
        got = torch.cat([t.reshape(-1) for t in hvp(loss, params, v)])
        assert len(calls) == (2 if isinstance(model, _Gate) else 1)
        assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_an_in_place_hardsigmoid_on_a_view_is_routed():
    torch.manual_seed(0)
    layer = nn.Linear(3, 4).to(F64)
    x, _ = _data()

    def loss(gate):
        y = layer(x) * 4
        gate(y[:, :2])
        return y.square().mean()

    params = list(layer.parameters())
    got = hessian_diagonal(lambda: loss(lambda t: F.hardsigmoid(t, inplace=True)), params)
    want = hessian_diagonal(lambda: loss(lambda t: t.copy_(F.relu6(t + 3) / 6)), params)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_a_data_operator_routes_every_pass_once_one_needed_it():
    torch.manual_seed(0)
    model = _Gate().to(F64)
    x, y = _data()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    operator = HessianOperator.from_model(model, nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[4:])])
    forwards.clear()
    first = operator.matvec(torch.ones(12, dtype=F64))
    assert len(forwards) == 3  # batch 0 twice (found to need the route), batch 1 routed
    forwards.clear()
    assert torch.equal(operator.matvec(torch.ones(12, dtype=F64)), first)
    assert len(forwards) == 2


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


_FLAGS = (
    (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
    (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
    (torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
    (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
)


@pytest.mark.parametrize("users", [(True, True, True, True), (False, False, True, False)])
def test_attention_runs_on_its_math_kernel_and_the_flags_are_restored(users):
    before = [enabled() for enabled, _ in _FLAGS]
    try:
        for (_, enable), on in zip(_FLAGS, users):
            enable(on)
        with forward_context([]):
            inside = tuple(enabled() for enabled, _ in _FLAGS)
        after = tuple(enabled() for enabled, _ in _FLAGS)
    finally:
        for (_, enable), on in zip(_FLAGS, before):
            enable(on)
    assert inside == (True, False, False, False)  # the one kernel with a double backward
    assert after == users
