"""hessian_diagonal and model_hessian_diagonal against the dense reference."""

import pytest
import torch
from torch.testing import assert_close

from tests import reference as ref
from tests.cases import build, case_by_id
from tests.core.helpers import assert_like, like
from torch_secorder import hessian_diagonal, model_hessian_diagonal


def test_diagonal_matches_reference(case):
    expected = ref.diagonal(ref.case_hessian(case), case.params)
    assert_like(hessian_diagonal(case.func, case.params), expected, case.params)


def test_model_diagonal_matches_reference_and_closure(case):
    result = model_hessian_diagonal(case.model, case.loss_fn, case.inputs, case.targets)
    assert_like(result, ref.diagonal(ref.case_hessian(case), case.params), case.params)
    for r, c in zip(result, hessian_diagonal(case.func, case.params)):
        assert_close(r, c)


def test_diagonal_times_v_list(case):
    v = like(case.params, seed=1)
    diag = ref.diagonal(ref.case_hessian(case), case.params)
    expected = [d * u for d, u in zip(diag, v)]
    assert_like(hessian_diagonal(case.func, case.params, v), expected, case.params)


def test_diagonal_times_v_flat():
    built = build(case_by_id("cnn-bn-eval"))
    v = ref.flat(like(built.params, seed=2))
    result = hessian_diagonal(built.func, built.params, v)
    assert isinstance(result, torch.Tensor)
    assert result.shape == v.shape
    assert_close(result, torch.diagonal(ref.case_hessian(built)) * v)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 1000, None])
@pytest.mark.parametrize(
    "case_id", ["mlp-tanh-ce", "cnn-bn-train", "gru", "scalar-param", "unused"]
)
def test_diagonal_chunk_sizes(case_id, chunk_size):
    built = build(case_by_id(case_id))
    result = hessian_diagonal(built.func, built.params, chunk_size=chunk_size)
    assert_like(result, ref.diagonal(ref.case_hessian(built), built.params), built.params)


def test_diagonal_keeps_v_compatible_positional_arguments():
    # torch-secorder 0.0.1 signature: hessian_diagonal(func, params, v, create_graph, strict)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    v = [torch.tensor([2.0, -1.0], dtype=torch.float64)]
    (result,) = hessian_diagonal(lambda: (x**3).sum(), [x], v, False, True)
    assert_close(result, torch.tensor([12.0, -12.0], dtype=torch.float64))


def test_diagonal_one_parameter_stays_a_list():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    result = hessian_diagonal(lambda: (x**4).sum() + x[0, 0] * x[0, 1], [x])
    assert type(result) is list
    assert len(result) == 1
    assert_close(result[0], 12 * x.detach() ** 2)


def test_model_diagonal_selection():
    built = build(case_by_id("transformer"))
    names = ["encoder.self_attn.in_proj_bias", "encoder.norm1.weight", "head.bias"]  # model order
    params = built.select(names)
    result = model_hessian_diagonal(
        built.model,
        built.loss_fn,
        built.inputs,
        built.targets,
        params=["head.bias", "*norm1.weight", "encoder.*_proj_bias"],
    )
    assert_like(result, ref.diagonal(ref.case_hessian(built, names), params), params)


# ----------------------------------------------------------------------------- create_graph


def test_create_graph_false_detaches():
    built = build(case_by_id("mse-mean"))
    assert not any(d.requires_grad for d in hessian_diagonal(built.func, built.params))


def test_create_graph_third_derivative_closed_form():
    # f = sum(c x^4): diag H = 12 c x^2, d/dx (w . diag H) = 24 c x w.
    g = torch.Generator().manual_seed(3)
    c, w = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g)
    x = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    (diag,) = hessian_diagonal(lambda: (c * x**4).sum(), [x], None, True)
    assert diag.requires_grad
    (grad,) = torch.autograd.grad((diag * w.double()).sum(), [x])
    assert_close(grad, 24 * c * x.detach() * w.double())


@pytest.mark.parametrize("v", [None, torch.ones(4, dtype=torch.float64)])
def test_create_graph_keeps_the_graph_under_no_grad(v):
    x = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        diag = hessian_diagonal(lambda: (x**4).sum(), [x], v, True)
    total = diag.sum() if v is not None else diag[0].sum()  # flat with v, a list without
    (third,) = torch.autograd.grad(total, [x])  # d/dx sum(12 x^2)
    assert_close(third, 24 * x.detach())


# Not through normalization layers: see test_hvp.py (torch's autograd third derivatives).
@pytest.mark.parametrize("case_id", ["mlp-tanh-ce", "gru", "scalar-param"])
@pytest.mark.parametrize("chunk_size", [1, None])
def test_create_graph_third_derivative_matches_torch_func(case_id, chunk_size):
    built = build(case_by_id(case_id))
    w = ref.flat(like(built.params, seed=4))
    diag = hessian_diagonal(built.func, built.params, None, True, chunk_size=chunk_size)
    got = torch.autograd.grad(ref.flat(diag) @ w, built.params)
    expected = ref.hessian_gradient(
        ref.case_loss(built), built.params, lambda H: torch.diagonal(H) @ w
    )
    assert_close(ref.flat(got), expected)


def test_model_diagonal_create_graph_positional():
    built = build(case_by_id("mse-sum"))
    diag = model_hessian_diagonal(built.model, built.loss_fn, built.inputs, built.targets, True)
    assert all(d.requires_grad for d in diag[:2])  # first layer: curvature depends on params
    expected = hessian_diagonal(built.func, built.params, None, True)
    got = torch.autograd.grad(ref.flat(diag).sum(), built.params, allow_unused=True)
    want = torch.autograd.grad(ref.flat(expected).sum(), built.params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


# ----------------------------------------------------------------------------- strict


def test_strict_unused_parameter_raises_naming_it():
    built = build(case_by_id("unused"))
    with pytest.raises(
        ValueError, match=r"^hessian_diagonal: the loss does not depend on params\[2\]; "
    ):
        hessian_diagonal(built.func, built.params, strict=True)
    with pytest.raises(
        ValueError,
        match=r"^model_hessian_diagonal: the loss does not depend on params\[2\] "
        r"\('unused\.weight'\); pass strict=False",
    ):
        model_hessian_diagonal(built.model, built.loss_fn, built.inputs, built.targets, strict=True)


def test_non_strict_unused_parameter_has_zero_diagonal():
    built = build(case_by_id("unused"))
    result = hessian_diagonal(built.func, built.params)
    for name, d in zip(built.names, result):
        assert (torch.count_nonzero(d) == 0) == name.startswith("unused.")


def test_strict_accepts_a_linear_parameter():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    dx, db = hessian_diagonal(lambda: (x**3).sum() + b, [x, b], strict=True)
    assert_close(dx, 6 * x.detach())
    assert db.shape == ()
    assert db.item() == 0.0


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_a_torchscript_model_takes_the_generic_path(compile_with):
    # TorchScript modules have no layer rule (nor nn.Module's parameter dicts): generic path
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    loss_fn = torch.nn.CrossEntropyLoss()
    scripted = torch.jit.script(model) if compile_with == "script" else torch.jit.trace(model, x)
    expected = hessian_diagonal(lambda: loss_fn(model(x), y), list(model.parameters()))
    for got, want in zip(model_hessian_diagonal(scripted, loss_fn, x, y), expected):
        assert_close(got, want)
