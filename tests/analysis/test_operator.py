import pytest
import torch

import torch_secorder as ts
from tests.analysis.operators import DTYPE, DenseOperator, with_spectrum
from torch_secorder.analysis._operator import resolve


class Fake:
    def __init__(self, **attributes):
        self.matmat = lambda V: V
        self.shape = (3, 3)
        self.dtype = DTYPE
        self.device = torch.device("cpu")
        self.__dict__.update(attributes)


def test_operator_form():
    operator = DenseOperator(with_spectrum([1.0, 2.0]))
    target = resolve("f", operator, None)
    assert target.operator is operator
    assert target.params is None
    assert (target.size, target.dtype, target.device) == (2, DTYPE, torch.device("cpu"))
    assert not target.owned


def test_closure_form_builds_and_releases_a_hessian_operator():
    x = torch.zeros(2, 3, dtype=DTYPE, requires_grad=True)
    y = torch.zeros(4, dtype=DTYPE, requires_grad=True)
    target = resolve("f", lambda: (x**2).sum() + (y**2).sum(), (p for p in (x, y)))
    assert isinstance(target.operator, ts.HessianOperator)
    assert target.params == [x, y]
    assert target.size == 10
    assert target.owned
    with target.open() as operator:
        operator.matmat(torch.eye(10, dtype=DTYPE)[:, :1])
        assert operator._source.graph is not None
    assert operator._source.graph is None


def test_device_given_as_a_string():
    assert resolve("f", Fake(device="cpu"), None).device == torch.device("cpu")


ON_DEVICE = [
    lambda op: ts.hessian_trace(op, method="hutchinson", num_matvecs=3).value,
    lambda op: ts.hessian_trace(op, method="hutch++", num_matvecs=6).value,
    lambda op: ts.hessian_trace(op, method="xtrace", num_matvecs=6).stderr,
    lambda op: ts.hessian_trace(op, method="exact").value,
    lambda op: ts.top_eigenvalues(op).eigenvalues,
    lambda op: ts.top_eigenvalues(op, k=2, method="power").eigenvalues,
    lambda op: ts.spectral_density(op, num_matvecs=4).nodes,
    lambda op: ts.hessian_diagonal_estimate(op, num_matvecs=3).diagonal,
    lambda op: ts.hessian_diagonal_estimate(op, method="xdiag", num_matvecs=6).stderr,
    lambda op: ts.hessian_diagonal_estimate(op, method="hutchinson", num_matvecs=3).stderr,
]


@pytest.mark.parametrize("analysis", ON_DEVICE)
def test_every_analysis_takes_an_operator_whose_device_is_a_string(analysis):
    A = with_spectrum([1.0, 2.0, 3.0, 4.0])
    named = Fake(matmat=lambda V: A @ V, shape=(4, 4), device="cpu")
    assert torch.equal(analysis(named), analysis(DenseOperator(A)))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (
            (3, None),
            TypeError,
            r"f: func_or_operator must be a loss closure \(with params\) or an operator with "
            r"matmat, "
            r"shape, dtype and device; got int\.",
        ),
        ((torch.eye(3), None), TypeError, r"f: func_or_operator must be .*; got Tensor\."),
        (
            (lambda: 0, None),
            TypeError,
            r"f: params is required with a loss closure; expected an iterable of tensors, got "
            r"None\.",
        ),
        (
            (Fake(), [torch.zeros(3)]),
            TypeError,
            r"f: params must be None when func_or_operator is an operator; got list\.",
        ),
        ((Fake(matmat=3), None), TypeError, r"f: func_or_operator\.matmat must be callable\."),
        (
            (Fake(shape=(3, 4)), None),
            ValueError,
            r"f: func_or_operator has shape \(3, 4\); expected a square operator \(P, P\)\.",
        ),
        (
            (Fake(shape=(3,)), None),
            ValueError,
            r"f: func_or_operator has shape \(3,\); expected a ",
        ),
        (
            (Fake(shape=(0, 0)), None),
            ValueError,
            r"f: func_or_operator has shape \(0, 0\); "
            r"expected P >= 1\.",
        ),
        (
            (Fake(shape="3x3"), None),
            TypeError,
            r"f: func_or_operator\.shape must be a pair of ints; got '3x3'\.",
        ),
        (
            (Fake(dtype="float64"), None),
            TypeError,
            r"f: func_or_operator\.dtype must be a torch\.dtype; got str\.",
        ),
        (
            (Fake(dtype=torch.int64), None),
            ValueError,
            r"f: func_or_operator has dtype torch\.int64; expected a floating-point operator\.",
        ),
        (
            (Fake(device=3.5), None),
            TypeError,
            r"f: func_or_operator\.device must be a torch\.device",
        ),
    ],
)
def test_bad_forms(args, error, match):
    with pytest.raises(error, match=match):
        resolve("f", *args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("analysis", ON_DEVICE)
def test_every_analysis_runs_on_a_cuda_operator(analysis):
    A = with_spectrum([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    result = analysis(DenseOperator(A.cuda()))
    assert result.device.type == "cuda"
    torch.testing.assert_close(result.cpu(), analysis(DenseOperator(A)))
