"""Long exact computations say so: progress bars on request, a warning with the cost up front."""

import builtins
import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tests import reference as ref
from tests.cases import build, case_by_id
from torch_secorder import (
    hessian_diagonal,
    hessian_matrix,
    model_hessian_diagonal,
    model_hessian_matrix,
)
from torch_secorder.core import _progress

F64 = torch.float64


def _mlp():
    return build(case_by_id("mlp-tanh-ce"))


@pytest.mark.parametrize("name", ["hessian_diagonal", "model_hessian_diagonal", "matrix"])
def test_progress_bar_counts_every_product(name, monkeypatch, capsys):
    built = _mlp()
    updates, written = [], []
    import tqdm.auto

    class Bar:
        def __init__(self, total, **kwargs):
            self.total = total

        def update(self, n):
            updates.append(n)

        def close(self):
            updates.append(("closed", self.total))

        @staticmethod
        def write(text):
            written.append(text)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    if name == "hessian_diagonal":
        result = hessian_diagonal(built.func, built.params, progress=True)
        assert_close(result, ref.diagonal(ref.case_hessian(built), built.params))
    elif name == "model_hessian_diagonal":
        m = built
        result = model_hessian_diagonal(m.model, m.loss_fn, m.inputs, m.targets, progress=True)
        assert_close(result, ref.diagonal(ref.case_hessian(built), built.params))
        (plan,) = written  # the path of each layer, before the products
        assert plan.startswith("Exact diagonal:")
        assert "layer (" in plan
    else:
        assert_close(
            hessian_matrix(built.func, built.params, progress=True), ref.case_hessian(built)
        )
    *counts, closed = updates
    assert closed[0] == "closed"
    assert sum(counts) == closed[1] > 0  # the bar's total is what ran


def test_progress_needs_tqdm(monkeypatch):
    built = _mlp()
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm" or name.startswith("tqdm."):
            raise ImportError("No module named 'tqdm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    monkeypatch.delitem(sys.modules, "tqdm", raising=False)
    with pytest.raises(ImportError, match=r"^hessian_matrix: progress=True needs tqdm"):
        hessian_matrix(built.func, built.params, progress=True)
    m = built
    with pytest.raises(ImportError, match=r"^model_hessian_diagonal: progress=True needs tqdm"):
        model_hessian_diagonal(m.model, m.loss_fn, m.inputs, m.targets, progress=True)


def test_progress_must_be_a_bool():
    built = _mlp()
    with pytest.raises(TypeError, match=r"^hessian_diagonal: progress must be a bool; got int"):
        hessian_diagonal(built.func, built.params, progress=1)


def test_long_diagonals_and_matrices_warn_with_their_cost(monkeypatch):
    monkeypatch.setattr(_progress, "LONG_PRODUCTS", 1)
    built = _mlp()
    P = sum(p.numel() for p in built.params)
    with pytest.warns(UserWarning, match=rf"hessian_diagonal: the exact diagonal takes {P} "):
        hessian_diagonal(built.func, built.params)
    with pytest.warns(UserWarning, match=rf"hessian_matrix: the exact Hessian takes {P} .*"):
        hessian_matrix(built.func, built.params)
    m = built
    with pytest.warns(UserWarning, match="model_hessian_diagonal: .*hessian_diagonal_estimate"):
        model_hessian_diagonal(m.model, m.loss_fn, m.inputs, m.targets)
    with pytest.warns(UserWarning, match="model_hessian_matrix: the exact Hessian takes"):
        model_hessian_matrix(m.model, m.loss_fn, m.inputs, m.targets)


def test_the_time_warning_takes_the_rate_of_the_products_at_the_users_line(monkeypatch):
    built = _mlp()
    P = sum(p.numel() for p in built.params)
    monkeypatch.setattr(_progress, "TIMED_PRODUCTS", 2)
    monkeypatch.setattr(_progress, "LONG_SECONDS", 0.0)
    with pytest.warns(UserWarning, match=rf"^hessian_diagonal: the exact diagonal takes {P} ") as w:
        hessian_diagonal(built.func, built.params, chunk_size=1)
    assert w[0].filename == __file__  # the user's line, not the library's
    m = built
    with pytest.warns(UserWarning, match=r"^model_hessian_diagonal: the exact diagonal") as w:
        model_hessian_diagonal(m.model, m.loss_fn, m.inputs, m.targets, chunk_size=1)
    assert w[0].filename == __file__
    # a rate measured from the products: a day per product would be long, a second is not
    monkeypatch.setattr(_progress, "LONG_SECONDS", 86400.0 * P)
    hessian_diagonal(built.func, built.params, chunk_size=1)  # filterwarnings=error


def test_a_warning_up_front_points_at_the_users_line(monkeypatch):
    monkeypatch.setattr(_progress, "LONG_PRODUCTS", 1)
    built = _mlp()
    with pytest.warns(UserWarning, match=r"^hessian_matrix: the exact Hessian takes") as w:
        hessian_matrix(built.func, built.params)
    assert w[0].filename == __file__


def test_short_computations_do_not_warn():
    built = _mlp()
    hessian_diagonal(
        built.func, built.params
    )  # filterwarnings=error turns a warning into a failure
    model = nn.Linear(3, 2).to(F64)
    model_hessian_diagonal(
        model, nn.MSELoss(), torch.ones(4, 3, dtype=F64), torch.ones(4, 2, dtype=F64)
    )
