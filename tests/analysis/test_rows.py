import pytest
import torch

from tests.analysis.operators import DTYPE, generator
from torch_secorder.analysis._rows import combine_rows, dot_rows, inner_rows


def test_sums_over_millions_of_float32_entries_are_accurate():
    # BLAS sums the 2M products of each entry in float32, off by 2e-4 here
    g = generator(0)
    V = torch.randn(4, 2**21, generator=g)
    V[1] = 0.6 * V[0] + 0.01 * V[1]  # a large inner product
    V /= V.double().norm(dim=1, keepdim=True).float()
    exact = V.double() @ V.double().T
    torch.testing.assert_close(inner_rows(V, V), exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(inner_rows(V, V[:1]), exact[:, :1], rtol=0, atol=1e-5)
    torch.testing.assert_close(inner_rows(V[1:2], V[:1]), exact[1:2, :1], rtol=0, atol=1e-5)
    assert inner_rows(V, V).dtype == torch.float64
    assert inner_rows(V[:0], V[:1]).shape == (0, 1)
    assert torch.equal(inner_rows(V[:2, :0], V[:1, :0]), torch.zeros(2, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="shorter"):  # (rows of different lengths)
        inner_rows(V, V[:1, : 2**20])


def test_dot_products_of_matching_rows_are_summed_as_inner_products_are():
    g = generator(1)
    A, B = torch.randn(3, 2**21, generator=g), torch.randn(3, 2**21, generator=g)
    B[0] = A[0]  # a norm: summed in float32, off by 1e-3 relative
    exact = (A.double() * B.double()).sum(dim=1)
    dots = dot_rows(A, B)
    assert dots.dtype == torch.float64
    torch.testing.assert_close(dots, exact, rtol=1e-5, atol=0)
    assert dot_rows(A[:0], B[:0]).shape == (0,)


def test_rows_combine_in_place_a_slice_at_a_time(monkeypatch):
    monkeypatch.setattr("torch_secorder.analysis._rows.COMBINE_BYTES", 7 * 3 * 8)
    g = generator(5)
    V = torch.randn(8, 50, generator=g, dtype=DTYPE)  # slices of 7 columns, the last of 1
    Q = torch.randn(6, 3, generator=g, dtype=DTYPE)
    expected = torch.cat([Q.T @ V[:6], V[3:]])
    combine_rows(V, Q, 6)
    torch.testing.assert_close(V, expected)
