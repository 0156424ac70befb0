"""output_sharpness and model_sharpness against the eigenvalues of dense torch.func Hessians."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tests import reference as ref
from tests.cases import build, case_by_id
from tests.core.helpers import assert_unchanged, cdist_model, snapshot
from tests.core.test_output import built_of
from torch_secorder import (
    EigenResult,
    SharpnessResult,
    model_hessian_matrix,
    model_sharpness,
    model_top_eigenvalues,
    output_hessian_matrix,
    output_sharpness,
)

F64 = torch.float64


def dense_sharpness(H: torch.Tensor) -> torch.Tensor:
    """Largest absolute eigenvalue of each ``(P, P)`` matrix of a stack."""
    return torch.linalg.eigvalsh(H).abs().amax(dim=-1)


# ----------------------------------------------------------------------------- output_sharpness


@pytest.mark.parametrize(
    "case_id", ["mlp-tanh-ce", "cnn-bn-train", "multi-input", "dropout", "scalar-param"]
)
def test_output_sharpness_matches_dense_eigenvalues(case_id):
    built = build(case_by_id(case_id))
    result = output_sharpness(built.model, built.inputs, tol=1e-10)
    H, shape = ref.case_output_hessians(built)
    assert isinstance(result, SharpnessResult)
    for field in (result.sharpness, result.eigenvalues, result.residuals, result.converged):
        assert field.shape == shape
    assert result.sharpness.dtype == F64
    assert bool(result.converged.all())
    # |lambda - theta| <= residual <= 1e-10 |theta|: well inside the default tolerances
    assert_close(result.sharpness.reshape(-1), dense_sharpness(H))
    assert_close(result.sharpness, result.eigenvalues.abs(), rtol=0, atol=0)
    assert bool((result.residuals <= 1e-10 * result.sharpness).all())
    assert result.num_matvecs >= H.shape[0]


def test_output_sharpness_defaults_are_accurate_to_1e_3():
    built = build(case_by_id("mlp-tanh-ce"))
    result = output_sharpness(built.model, built.inputs)
    H, _ = ref.case_output_hessians(built)
    truth = dense_sharpness(H)
    assert bool(result.converged.all())
    assert bool(((result.sharpness.reshape(-1) - truth).abs() <= 1e-3 * truth).all())
    assert bool((result.residuals <= 1e-4 * result.sharpness).all())


def test_output_sharpness_is_that_of_output_hessian_matrix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Conv2d(2, 2, 2)).to(F64)
    x = torch.randn(2, 1, 4, 4, dtype=F64)
    result = output_sharpness(model, x, params="0.*", tol=1e-10)
    H = output_hessian_matrix(model, x, params="0.*")
    assert result.sharpness.shape == (2, 2, 2, 2)
    assert_close(result.sharpness, dense_sharpness(H))


def test_output_sharpness_where_the_dense_hessians_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x = torch.randn(3, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"^output_hessian_matrix: the result of shape"):
        output_hessian_matrix(model, x, max_bytes=10_000)
    result = output_sharpness(model, x, tol=1e-10)
    H, _ = ref.case_output_hessians(built_of(model, x))
    assert_close(result.sharpness.reshape(-1), dense_sharpness(H))


def test_output_sharpness_of_one_sample_and_of_a_zero_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x = torch.randn(3, 3, dtype=F64)
    batch = output_sharpness(model, x, tol=1e-10)
    one = output_sharpness(model, x[1], batched=False, tol=1e-10)
    assert one.sharpness.shape == (2,)
    assert_close(one.sharpness, batch.sharpness[1])
    linear = output_sharpness(model, x, params="2.bias")  # the output is linear in it
    assert torch.count_nonzero(linear.sharpness) == 0
    assert bool(linear.converged.all())


def test_output_sharpness_no_side_effects_and_reproducible():
    built = build(case_by_id("dropout"))
    before = snapshot(built.model)
    first = output_sharpness(built.model, built.inputs)
    assert_unchanged(before, built.model)
    with torch.no_grad():
        second = output_sharpness(built.model, built.inputs)
    for a, b in zip(
        (first.sharpness, first.eigenvalues, first.residuals, first.converged),
        (second.sharpness, second.eigenvalues, second.residuals, second.converged),
    ):
        assert torch.equal(a, b)
    assert first.num_matvecs == second.num_matvecs
    other = output_sharpness(built.model, built.inputs, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(other.residuals, first.residuals)  # other starting vectors
    assert_close(other.sharpness, first.sharpness, rtol=1e-3, atol=0)  # both to tol=1e-4


def test_output_sharpness_bn_train_leaves_statistics():
    built = build(case_by_id("cnn-bn-train"))
    before = snapshot(built.model)
    output_sharpness(built.model, built.inputs)
    assert_unchanged(before, built.model)


def test_output_sharpness_warns_when_not_converged():
    built = build(case_by_id("mlp-tanh-ce"))
    with pytest.warns(
        RuntimeWarning,
        match=r"^output_sharpness: 18 of 18 output elements did not reach tol=1e-12 \(relative "
        r"residual\) within max_matvecs=2; the results are the best found \(converged=False\)\. "
        r"Raise max_matvecs or tol\.$",
    ):
        result = output_sharpness(built.model, built.inputs, tol=1e-12, max_matvecs=2)
    assert not bool(result.converged.any())
    assert result.num_matvecs == 36


def test_output_sharpness_refuses_tuple_outputs():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).to(F64)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(
        TypeError, match=r"^output_sharpness: model must return a Tensor; got tuple"
    ):
        output_sharpness(Pair(), torch.ones(2, 3, dtype=F64))


# ----------------------------------------------------------------------------- model_sharpness


@pytest.mark.parametrize(
    "case_id", ["mlp-tanh-ce", "mse-sum", "cnn-bn-train", "transformer", "tied-embedding"]
)
def test_model_sharpness_matches_dense_eigenvalues(case_id):
    built = build(case_by_id(case_id))
    data = (built.inputs, built.targets)
    result = model_sharpness(built.model, built.loss_fn, data, tol=1e-10)
    assert isinstance(result, EigenResult)
    assert result.converged
    H = ref.case_hessian(built)
    assert_close(result.eigenvalues.abs(), dense_sharpness(H).reshape(1))
    x = torch.cat([v.reshape(1, -1) for v in result.eigenvectors], dim=1)[0]
    assert_close(H @ x, result.eigenvalues[0] * x)  # a true eigenpair of the dense Hessian
    assert [v.shape for v in result.eigenvectors] == [(1, *p.shape) for p in built.params]


def test_model_sharpness_is_top_eigenvalues_by_magnitude():
    built = build(case_by_id("dropout"))
    data = (built.inputs, built.targets)
    result = model_sharpness(built.model, built.loss_fn, data)
    same = model_top_eigenvalues(built.model, built.loss_fn, data, which="magnitude")
    assert torch.equal(result.eigenvalues, same.eigenvalues)
    assert result.num_matvecs == same.num_matvecs
    # dropout masks of seed 0, as the matrix of the same batch
    H = model_hessian_matrix(built.model, built.loss_fn, built.inputs, built.targets)
    assert_close(result.eigenvalues.abs(), dense_sharpness(H).reshape(1), rtol=1e-3, atol=0)


def test_model_sharpness_per_group_and_over_batches():
    built = build(case_by_id("mse-mean"))
    x, y = built.inputs, built.targets
    groups = model_sharpness(
        built.model, built.loss_fn, [(x[:2], y[:2]), (x[2:], y[2:])], groups="module", tol=1e-10
    )
    assert list(groups) == ["0", "2"]
    H = ref.case_hessian(built)
    for name, rows in [("0", slice(0, 16)), ("2", slice(16, 26))]:
        assert_close(groups[name].eigenvalues.abs(), dense_sharpness(H[rows, rows]).reshape(1))


def test_model_sharpness_side_effects_and_warnings():
    built = build(case_by_id("cnn-bn-train"))
    data = (built.inputs, built.targets)
    before = snapshot(built.model)
    with pytest.warns(
        RuntimeWarning,
        match=r"^model_sharpness: the eigenpairs did not reach tol=1e-12 \(relative residual\) "
        r"within max_matvecs=2; the results are the best found \(converged=False\)\. Raise "
        r"max_matvecs or tol\.$",
    ):
        result = model_sharpness(built.model, built.loss_fn, data, tol=1e-12, max_matvecs=2)
    assert not result.converged
    assert result.num_matvecs == 2
    with pytest.warns(
        RuntimeWarning, match=r"^model_sharpness: groups '0', '1', '4' did not reach"
    ):
        model_sharpness(built.model, built.loss_fn, data, groups="module", tol=1e-12, max_matvecs=2)
    assert_unchanged(before, built.model)


def test_output_sharpness_names_itself_and_the_module():
    # its operator's errors named HessianOperator, without the module
    with pytest.raises(
        RuntimeError,
        match=r"^output_sharpness: PyTorch cannot differentiate the operator 'cdist'.*, called "
        r"in module '2' \(_Distances\)",
    ):
        output_sharpness(cdist_model(), torch.randn(4, 3, dtype=torch.float64))
