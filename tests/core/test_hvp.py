"""hvp, batched_hvp and model_hvp against the dense reference, and their properties."""

import pytest
import torch
from torch.testing import assert_close

from tests import reference as ref
from tests.cases import build, case_by_id
from tests.core.helpers import assert_like, like
from torch_secorder import batched_hvp, hvp, model_hvp


def _reference_products(case, vectors):
    """H v for each row of a (k, P) stack, from the dense reference."""
    return vectors @ ref.case_hessian(case).T


# ----------------------------------------------------------------------------- hvp


def test_hvp_list_matches_reference(case):
    v = like(case.params, seed=1)
    expected = ref.unflat(ref.case_hessian(case) @ ref.flat(v), case.params)
    assert_like(hvp(case.func, case.params, v), expected, case.params)


def test_hvp_flat_matches_reference(case):
    v = ref.flat(like(case.params, seed=2))
    result = hvp(case.func, case.params, v)
    assert isinstance(result, torch.Tensor)
    assert result.shape == v.shape
    assert_close(result, ref.case_hessian(case) @ v)


def test_hvp_is_linear_in_v(case):
    u, w = like(case.params, seed=3), like(case.params, seed=4)
    a, b = 0.5, -2.0
    combined = hvp(case.func, case.params, [a * s + b * t for s, t in zip(u, w)])
    hu, hw = hvp(case.func, case.params, u), hvp(case.func, case.params, w)
    for c, s, t in zip(combined, hu, hw):
        assert_close(c, a * s + b * t)


def test_hvp_of_tuple_is_a_list():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    result = hvp(lambda: (x**3).sum(), [x], (torch.ones(2, dtype=torch.float64),))
    assert type(result) is list
    assert_close(result[0], 6 * x.detach())


def test_hvp_one_parameter_stays_a_list():
    x = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    result = hvp(lambda: (x**3).sum(), [x], [v])
    assert type(result) is list
    assert len(result) == 1
    assert_close(result[0], 6 * x.detach() * v)  # H = diag(6 x)


@pytest.mark.parametrize("kind", ["generator", "tuple", "parameters"])
def test_params_as_any_iterable(kind):
    built = build(case_by_id("mlp-tanh-ce"))
    v = like(built.params, seed=5)
    params = {
        "generator": (p for p in built.params),
        "tuple": tuple(built.params),
        "parameters": built.model.parameters(),
    }[kind]
    expected = hvp(built.func, built.params, v)
    for r, e in zip(hvp(built.func, params, v), expected):
        assert_close(r, e)


def test_hvp_of_a_quadratic_is_exact():
    g = torch.Generator().manual_seed(6)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    x = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, generator=g, dtype=torch.float64)
    assert_close(hvp(lambda: x @ A @ x, [x], v), (A + A.T) @ v)


# ----------------------------------------------------------------------------- create_graph


def test_create_graph_false_detaches():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    v = torch.ones(2, dtype=torch.float64, requires_grad=True)
    assert not hvp(lambda: (x**3).sum(), [x], v).requires_grad


def test_create_graph_third_derivative_closed_form():
    # f = sum(c x^3) + sum(x) y^2: w^T H v = sum(6 c x v w) + 2 y (v_x.sum() w_y + w_x.sum() v_y)
    # + 2 sum(x) v_y w_y, so its gradient is (6 c v w + 2 v_y w_y, 2 (v_x.sum() w_y + ...)).
    g = torch.Generator().manual_seed(7)
    c = torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, generator=g, dtype=torch.float64, requires_grad=True)
    vx, vy, wx, wy = (torch.randn(n, generator=g, dtype=torch.float64) for n in (3, 1, 3, 1))

    def f():
        return (c * x**3).sum() + x.sum() * (y**2).sum()

    hx, hy = hvp(f, [x, y], [vx, vy], create_graph=True)
    assert hx.requires_grad
    assert hy.requires_grad
    gx, gy = torch.autograd.grad((hx * wx).sum() + (hy * wy).sum(), [x, y])
    assert_close(gx, 6 * c * vx * wx + 2 * vy * wy)
    assert_close(gy, 2 * (vx.sum() * wy + wx.sum() * vy))


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.no_grad])
def test_create_graph_keeps_the_graph_of_a_flat_result(grad_mode):
    # under torch.no_grad the flat result was assembled without its graph
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    with grad_mode():
        v = torch.ones(2, dtype=torch.float64)
        result = hvp(lambda: (x**3).sum(), [x], v, create_graph=True)
    (third,) = torch.autograd.grad(result.sum(), [x])  # d/dx sum(6 x)
    assert_close(third, torch.full((2,), 6.0, dtype=torch.float64))


def test_create_graph_differentiates_through_v():
    # d/dv (w^T H v) = H w (H symmetric)
    built = build(case_by_id("mlp-tanh-ce"))
    v = [t.requires_grad_() for t in like(built.params, seed=24)]
    w = like(built.params, seed=25)
    result = hvp(built.func, built.params, v, create_graph=True)
    got = torch.autograd.grad(ref.flat(result) @ ref.flat(w), v)
    assert_close(ref.flat(got), ref.case_hessian(built) @ ref.flat(w))


# Not through normalization layers: torch's autograd gets third derivatives of F.layer_norm and
# training-mode F.batch_norm wrong (pytorch/pytorch#175754, #186256); second order is right.
@pytest.mark.parametrize("case_id", ["mlp-tanh-ce", "gru", "attention", "tied-embedding"])
def test_create_graph_third_derivative_matches_torch_func(case_id):
    built = build(case_by_id(case_id))
    v, w = like(built.params, seed=8), like(built.params, seed=9)
    result = hvp(built.func, built.params, v, create_graph=True)
    got = torch.autograd.grad(ref.flat(result) @ ref.flat(w), built.params)
    expected = ref.hessian_gradient(
        ref.case_loss(built), built.params, lambda H: ref.flat(w) @ H @ ref.flat(v)
    )
    assert_close(ref.flat(got), expected)


def test_model_hvp_create_graph():
    built = build(case_by_id("mse-mean"))
    v = like(built.params, seed=10)
    result = model_hvp(
        built.model, built.loss_fn, built.inputs, built.targets, v, create_graph=True
    )
    expected = hvp(built.func, built.params, v, create_graph=True)
    got = torch.autograd.grad(ref.flat(result).sum(), built.params)
    want = torch.autograd.grad(ref.flat(expected).sum(), built.params)
    for a, b in zip(got, want):
        assert_close(a, b)


# ----------------------------------------------------------------------------- batched_hvp


def test_batched_hvp_list_matches_reference(case):
    vs = like(case.params, seed=11, k=3)
    expected = ref.unflat(
        _reference_products(case, torch.stack([ref.flat(t) for t in zip(*vs)])), case.params
    )
    assert_like(batched_hvp(case.func, case.params, vs), expected, case.params)


def test_batched_hvp_flat_matches_reference(case):
    g = torch.Generator().manual_seed(12)
    P = sum(p.numel() for p in case.params)
    vs = torch.randn(4, P, generator=g, dtype=torch.float64)
    result = batched_hvp(case.func, case.params, vs)
    assert isinstance(result, torch.Tensor)
    assert result.shape == (4, P)
    assert_close(result, _reference_products(case, vs))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, None])
@pytest.mark.parametrize("case_id", ["mlp-tanh-ce", "cnn-bn-train", "gru", "transformer", "unused"])
def test_batched_hvp_equals_a_loop_of_hvp(case_id, chunk_size):
    built = build(case_by_id(case_id))
    vs = like(built.params, seed=13, k=5)
    result = batched_hvp(built.func, built.params, vs, chunk_size=chunk_size)
    for j in range(5):
        single = hvp(built.func, built.params, [t[j] for t in vs])
        for r, s in zip(result, single):
            assert_close(r[j], s)


def test_batched_hvp_chunk_larger_than_k():
    built = build(case_by_id("mse-sum"))
    vs = like(built.params, seed=14, k=3)
    expected = batched_hvp(built.func, built.params, vs, chunk_size=1)
    for r, e in zip(batched_hvp(built.func, built.params, vs, chunk_size=100), expected):
        assert_close(r, e)


@pytest.mark.parametrize("flat", [True, False])
def test_batched_hvp_of_no_vectors(flat):
    built = build(case_by_id("mse-mean"))
    P = sum(p.numel() for p in built.params)
    vs = torch.zeros(0, P, dtype=torch.float64) if flat else like(built.params, seed=0, k=0)
    result = batched_hvp(built.func, built.params, vs)
    if flat:
        assert result.shape == (0, P)
    else:
        assert [r.shape for r in result] == [(0, *p.shape) for p in built.params]


def test_batched_hvp_one_parameter_stays_a_list():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    vs = [torch.eye(3, dtype=torch.float64)]
    result = batched_hvp(lambda: (x**3).sum(), [x], vs)
    assert type(result) is list
    assert len(result) == 1
    assert_close(result[0], torch.diag(6 * x.detach()))


# ----------------------------------------------------------------------------- model_hvp


def test_model_hvp_matches_reference_and_closure(case):
    v = like(case.params, seed=15)
    result = model_hvp(case.model, case.loss_fn, case.inputs, case.targets, v)
    expected = ref.unflat(ref.case_hessian(case) @ ref.flat(v), case.params)
    assert_like(result, expected, case.params)
    for r, c in zip(result, hvp(case.func, case.params, v)):
        assert_close(r, c)


def test_model_hvp_flat(case):
    v = ref.flat(like(case.params, seed=16))
    result = model_hvp(case.model, case.loss_fn, case.inputs, case.targets, v)
    assert_close(result, ref.case_hessian(case) @ v)


@pytest.mark.parametrize(
    ("selection", "names"),
    [
        ("*.weight", ["0.weight", "2.weight"]),
        ("2.bias", ["2.bias"]),
        (["2.*", "0.bias"], ["0.bias", "2.weight", "2.bias"]),
    ],
)
def test_model_hvp_selection(selection, names):
    built = build(case_by_id("mlp-tanh-ce"))
    params = built.select(names)
    v = like(params, seed=17)
    result = model_hvp(built.model, built.loss_fn, built.inputs, built.targets, v, params=selection)
    expected = ref.unflat(ref.case_hessian(built, names) @ ref.flat(v), params)
    assert_like(result, expected, params)


def test_model_hvp_dict_inputs():
    built = build(case_by_id("mse-mean"))
    v = like(built.params, seed=18)
    result = model_hvp(built.model, built.loss_fn, {"input": built.inputs}, built.targets, v)
    for r, e in zip(result, hvp(built.func, built.params, v)):
        assert_close(r, e)


# ----------------------------------------------------------------------------- strict


def test_strict_unused_parameter_raises_naming_it():
    built = build(case_by_id("unused"))
    v = like(built.params, seed=19)
    with pytest.raises(ValueError, match=r"^hvp: the loss does not depend on params\[2\]; pass "):
        hvp(built.func, built.params, v, strict=True)
    with pytest.raises(
        ValueError,
        match=r"^model_hvp: the loss does not depend on params\[2\] \('unused.weight'\); "
        r"pass strict=False to treat it as having zero curvature\.$",
    ):
        model_hvp(built.model, built.loss_fn, built.inputs, built.targets, v, strict=True)
    with pytest.raises(ValueError, match=r"^batched_hvp: the loss does not depend on params\[2\]"):
        batched_hvp(built.func, built.params, like(built.params, seed=0, k=2), strict=True)


def test_a_sparse_gradient_is_reported_before_strict_names_an_unused_parameter():
    # strict=False would not get past the sparse gradient: that is the error to see first
    model = torch.nn.ModuleDict(
        {"unused": torch.nn.Linear(2, 2), "e": torch.nn.Embedding(5, 3, sparse=True)}
    ).double()
    x = torch.tensor([1, 2])
    params = list(model.parameters())
    v = [torch.ones_like(p) for p in params]
    with pytest.raises(ValueError, match=r"^hvp: the gradient of params\[2\] is sparse"):
        hvp(lambda: model["e"](x).square().sum(), params, v, strict=True)


def test_non_strict_unused_parameter_has_zero_curvature():
    built = build(case_by_id("unused"))
    result = hvp(built.func, built.params, like(built.params, seed=20))
    names = built.names
    for name, r in zip(names, result):
        if name.startswith("unused."):
            assert torch.count_nonzero(r) == 0
        else:
            assert torch.count_nonzero(r) > 0


def test_strict_accepts_a_linear_parameter():
    # b enters linearly: its gradient is constant, its curvature a valid zero.
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    vx, vb = torch.ones(2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    hx, hb = hvp(lambda: (x**3).sum() + 5 * b.sum(), [x, b], [vx, vb], strict=True)
    assert_close(hx, 6 * x.detach())
    assert_close(hb, torch.zeros(1, dtype=torch.float64))


def test_strict_accepts_a_parameter_coupled_only_linearly_to_itself():
    # f = x . b: b's gradient x depends on x only; H = [[0, I], [I, 0]].
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    vx = torch.tensor([1.0, 0.0], dtype=torch.float64)
    vb = torch.tensor([0.0, 2.0], dtype=torch.float64)
    hx, hb = hvp(lambda: x @ b, [x, b], [vx, vb], strict=True)
    assert_close(hx, vb)
    assert_close(hb, vx)


# ----------------------------------------------------------------------------- frozen parameters


def test_frozen_parameter_selected_by_name():
    built = build(case_by_id("frozen"))
    model = built.model
    frozen = model.get_parameter("0.bias")
    names = ["0.weight", "0.bias"]
    params = built.select(names)
    v = like(params, seed=21)
    result = model_hvp(model, built.loss_fn, built.inputs, built.targets, v, params=names)
    expected = ref.unflat(ref.case_hessian(built, names) @ ref.flat(v), params)
    assert_like(result, expected, params)
    assert not frozen.requires_grad
    assert frozen.grad is None


def test_frozen_parameter_in_closure_form():
    built = build(case_by_id("frozen"))
    frozen = built.model.get_parameter("0.bias")
    v = like([frozen], seed=22)
    (result,) = hvp(built.func, [frozen], v)
    expected = ref.case_hessian(built, ["0.bias"]) @ v[0]
    assert_close(result, expected)
    assert not frozen.requires_grad


def test_default_selection_skips_frozen_parameter():
    built = build(case_by_id("frozen"))
    assert "0.bias" not in built.names
    v = ref.flat(like(built.params, seed=23))
    result = model_hvp(built.model, built.loss_fn, built.inputs, built.targets, v)
    assert result.shape == v.shape
    assert_close(result, ref.case_hessian(built) @ v)
