"""The oracle itself: closed forms, finite differences, and its normalization stand-ins."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import reference as ref
from tests.cases import CASES, build, case_by_id


def _randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def test_quadratic_form_over_two_tensors():
    # f(x, y) = z^T A z with z = [vec(x); y]: H = A + A^T, in flat order x then y.
    g = torch.Generator().manual_seed(0)
    A = _randn(7, 7, generator=g)
    x, y = _randn(2, 2, generator=g), _randn(3, generator=g)

    def fn(x, y):
        z = torch.cat([x.reshape(-1), y])
        return z @ A @ z

    torch.testing.assert_close(ref.hessian(fn, [x, y]), A + A.T)


def test_cubic_depends_on_the_point():
    # f(x) = sum(c * x^3): H = diag(6 c x).
    g = torch.Generator().manual_seed(1)
    c, x = _randn(5, generator=g), _randn(5, generator=g)
    torch.testing.assert_close(ref.hessian(lambda x: (c * x**3).sum(), [x]), torch.diag(6 * c * x))


def test_linear_least_squares():
    # f(w, b) = ||X w + b - y||^2 / (2N): H = [[X^T X, X^T 1], [1^T X, N]] / N.
    g = torch.Generator().manual_seed(2)
    N = 9
    X, y = _randn(N, 4, generator=g), _randn(N, generator=g)
    w, b = _randn(4, generator=g), _randn(1, generator=g)

    def fn(w, b):
        return ((X @ w + b - y) ** 2).sum() / (2 * N)

    Xb = torch.cat([X, torch.ones(N, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(ref.hessian(fn, [w, b]), Xb.T @ Xb / N)


@pytest.mark.filterwarnings(
    # torch.func.hessian's forward mode loads decompositions via the deprecated torch.jit.script
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)
def test_agrees_with_torch_func_hessian_on_mlp():
    built = build(case_by_id("mlp-tanh-ce"))
    fn = ref.case_loss(built)
    theta = ref.flat(built.params).detach()
    expected = torch.func.hessian(lambda t: fn(*ref.unflat(t, built.params)))(theta)
    torch.testing.assert_close(ref.case_hessian(built), expected)


@pytest.mark.parametrize("case_id", ["mlp-tanh-ce", "cnn-bn-train", "transformer", "dropout"])
def test_agrees_with_finite_differences(case_id):
    built = build(case_by_id(case_id))
    H = ref.case_hessian(built)
    rows = torch.randperm(H.shape[0], generator=torch.Generator().manual_seed(3))[:8].tolist()
    fd = ref.finite_difference_hessian(ref.case_loss(built), built.params, rows)
    # Finite differences: O(h^4) truncation with h = 1e-3 plus roundoff eps/h.
    torch.testing.assert_close(H[rows], fd, rtol=1e-6, atol=1e-6)


def test_reference_hessians_are_symmetric(case):
    H = ref.case_hessian(case)
    torch.testing.assert_close(H, H.T)


def test_case_loss_is_the_closure_and_leaves_the_model_alone(case):
    with torch.random.fork_rng():
        expected = case.func()  # may update BatchNorm statistics: snapshot after
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    with torch.random.fork_rng():
        got = ref.case_loss(case)(*case.params)
    torch.testing.assert_close(got, expected.detach())
    for key, value in case.model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_hessian_leaves_the_global_rng_alone():
    built = build(case_by_id("dropout"))
    state = torch.get_rng_state()
    ref.hessian(ref.case_loss(built), built.params)
    assert torch.equal(torch.get_rng_state(), state)


def test_subset_keeps_the_other_parameters_constant():
    # The Hessian w.r.t. a subset is the sub-block of the full one.
    built = build(case_by_id("mlp-tanh-ce"))
    full = ref.case_hessian(built)
    sub = ref.case_hessian(built, ["2.weight", "0.bias"])
    expected = ref.block(full, built.params, [2, 1], [2, 1])
    torch.testing.assert_close(sub, expected)


def test_cache_returns_copies():
    built = build(case_by_id("mse-mean"))
    first = ref.case_hessian(built)
    first.zero_()
    assert ref.case_hessian(built).abs().sum() > 0


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_stand_in(affine):
    g = torch.Generator().manual_seed(4)
    x = _randn(3, 2, 5, generator=g)
    w, b = (_randn(2, 5, generator=g), _randn(2, 5, generator=g)) if affine else (None, None)
    torch.testing.assert_close(
        ref.layer_norm(x, (2, 5), w, b, 1e-3), F.layer_norm(x, (2, 5), w, b, 1e-3)
    )


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_stand_in(training):
    g = torch.Generator().manual_seed(5)
    x = _randn(4, 3, 2, 2, generator=g)
    mean, var = _randn(3, generator=g), _randn(3, generator=g).abs() + 0.5
    w, b = _randn(3, generator=g), _randn(3, generator=g)
    expected = F.batch_norm(x, mean.clone(), var.clone(), w, b, training, 0.1, 1e-3)
    torch.testing.assert_close(ref.batch_norm(x, mean, var, w, b, training, 0.1, 1e-3), expected)


def test_oracle_context_swaps_the_normalization_of_modules():
    # nn.LayerNorm and nn.BatchNorm call F.layer_norm / F.batch_norm at call time.
    ln = nn.LayerNorm(4, dtype=torch.float64)
    x = torch.ones(2, 4, dtype=torch.float64)
    with ref.oracle_context():
        assert F.layer_norm is ref.layer_norm
        assert F.batch_norm is ref.batch_norm
        ln(x)
    assert F.layer_norm is not ref.layer_norm
    assert F.batch_norm is not ref.batch_norm


def test_slicing_helpers():
    params = [torch.zeros(2, 1), torch.zeros(3)]
    H = torch.arange(25.0).reshape(5, 5)
    assert [d.tolist() for d in ref.diagonal(H, params)] == [[[0.0], [6.0]], [12.0, 18.0, 24.0]]
    first, second = ref.blocks(H, params)
    assert first.tolist() == [[0.0, 1.0], [5.0, 6.0]]
    assert second.tolist() == [[12.0, 13.0, 14.0], [17.0, 18.0, 19.0], [22.0, 23.0, 24.0]]
    assert ref.block(H, params, [1], [0]).tolist() == [[10.0, 11.0], [15.0, 16.0], [20.0, 21.0]]
    assert ref.flat(ref.unflat(torch.arange(5.0), params)).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    stacked = ref.unflat(torch.arange(10.0).reshape(2, 5), params)
    assert [t.shape for t in stacked] == [(2, 2, 1), (2, 3)]


def test_zoo_ids_are_unique_and_readable():
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids)
    assert all(i.replace("-", "").isalnum() for i in ids)


def test_variable_hessian_closed_forms():
    # MSE over o outputs: the Hessian w.r.t. the outputs of batch b is 2/(n_b o) I, weighted
    # by n_b / N; w.r.t. the inputs of a linear model, 2/(n_b o) W^T W per sample.
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(3, 2).double()
    batches = [(_randn(n, 3, generator=g), _randn(n, 2, generator=g)) for n in (3, 1, 2)]
    mse = nn.MSELoss()
    outputs = ref.variable_hessian(model, mse, batches, [""])
    torch.testing.assert_close(outputs, torch.eye(12, dtype=torch.float64) * 2 / (6 * 2))
    W = model.weight.detach()
    inputs = ref.variable_hessian(model, mse, batches)
    per_sample = 2 / (6 * 2) * W.T @ W
    torch.testing.assert_close(inputs, torch.block_diag(*[per_sample] * 6))


def test_split_loss_is_the_rest_of_the_model_as_a_function_of_the_output():
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = _randn(5, 3, generator=g), torch.tensor([0, 1, 1, 0, 1])
    fn, point = ref.split_loss(model, F.cross_entropy, x, y, ["1"])
    z = torch.tanh(model[0](x)).detach()
    expected = ref.hessian(lambda z: F.cross_entropy(model[2](z), y), [z])
    torch.testing.assert_close(ref.hessian(fn, point), expected)
    assert point[0].shape == z.shape
