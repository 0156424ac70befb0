"""hessian_matrix and model_hessian_matrix against the dense reference, and the size guard."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tests import reference as ref
from tests.cases import build, case_by_id
from tests.core.helpers import Recorder
from torch_secorder import hessian_matrix, model_hessian_matrix


def test_matrix_matches_reference(case):
    result = hessian_matrix(case.func, case.params)
    P = sum(p.numel() for p in case.params)
    assert result.shape == (P, P)
    assert result.dtype == case.params[0].dtype
    assert_close(result, ref.case_hessian(case))


def test_matrix_is_symmetric(case):
    H = hessian_matrix(case.func, case.params)
    assert_close(H, H.T)


def test_model_matrix_matches_reference_and_closure(case):
    result = model_hessian_matrix(case.model, case.loss_fn, case.inputs, case.targets)
    assert_close(result, ref.case_hessian(case))
    assert_close(result, hessian_matrix(case.func, case.params))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1000, None])
@pytest.mark.parametrize("case_id", ["cnn-bn-train", "transformer", "tied-embedding"])
def test_matrix_chunk_sizes(case_id, chunk_size):
    built = build(case_by_id(case_id))
    result = hessian_matrix(built.func, built.params, chunk_size=chunk_size)
    assert_close(result, ref.case_hessian(built))


def test_model_matrix_selection_with_frozen_parameter():
    built = build(case_by_id("frozen"))
    frozen = built.model.get_parameter("0.bias")
    result = model_hessian_matrix(
        built.model, built.loss_fn, built.inputs, built.targets, params=["0.*"]
    )
    assert_close(result, ref.case_hessian(built, ["0.weight", "0.bias"]))
    assert not frozen.requires_grad
    assert frozen.grad is None


def test_matrix_of_a_quadratic_in_two_tensors():
    # f = z^T A z over z = [vec(X); y]: H = A + A^T, X flattened row-major.
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, 7, generator=g, dtype=torch.float64)
    X = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def f():
        z = torch.cat([X.reshape(-1), y])
        return z @ A @ z

    assert_close(hessian_matrix(f, [X, y]), A + A.T)


def test_unused_parameter_rows_are_zero():
    built = build(case_by_id("unused"))
    H = hessian_matrix(built.func, built.params)
    start = sum(p.numel() for p in built.params[:2])  # first.weight, first.bias
    assert torch.count_nonzero(H[start : start + 5]) == 0
    assert torch.count_nonzero(H[:, start : start + 5]) == 0


# ----------------------------------------------------------------------------- size guard


def _tib(num_bytes):
    return f"{num_bytes / 2**40:.1f} TiB"


def test_refuses_a_million_parameters_before_any_work():
    model = nn.Linear(1000, 1000)  # 1 001 000 float32 parameters
    P = 1000 * 1000 + 1000
    func = Recorder(lambda: model(torch.ones(1, 1000)).sum())
    message = (
        rf"^hessian_matrix: the {P} x {P} Hessian \(float32\) needs {_tib(P * P * 4)}, more "
        r"than max_bytes=8\.0 GiB; use HessianOperator, hessian_blocks or hessian_block "
        r"instead\.$"
    )
    with pytest.raises(ValueError, match=message):
        hessian_matrix(func, model.parameters())
    assert func.calls == 0

    loss_fn = Recorder(lambda out, target: out.sum())
    with pytest.raises(ValueError, match=message.replace("hessian_matrix", "model_hessian_matrix")):
        model_hessian_matrix(model, loss_fn, torch.ones(1, 1000), None)
    assert loss_fn.calls == 0


def test_max_bytes_is_a_sharp_limit():
    built = build(case_by_id("mse-mean"))  # P = 26, float64: 26 * 26 * 8 = 5408 bytes
    assert hessian_matrix(built.func, built.params, max_bytes=5408).shape == (26, 26)
    func = Recorder(built.func)
    with pytest.raises(
        ValueError,
        match=r"^hessian_matrix: the 26 x 26 Hessian \(float64\) needs 5\.3 KiB, more than "
        r"max_bytes=5\.3 KiB; ",
    ):
        hessian_matrix(func, built.params, max_bytes=5407)
    assert func.calls == 0


def test_model_matrix_max_bytes():
    built = build(case_by_id("mse-mean"))
    with pytest.raises(ValueError, match=r"^model_hessian_matrix: the 16 x 16 Hessian \(float64\)"):
        model_hessian_matrix(
            built.model,
            built.loss_fn,
            built.inputs,
            built.targets,
            params="0.*",
            max_bytes=1000,
        )
