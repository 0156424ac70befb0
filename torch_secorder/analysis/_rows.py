r"""Arithmetic on rows of the operator's size: inner products summed in float64, combinations.

The analyses keep their vectors as rows (the layout in which an operator writes its
products). Summed in float32, a norm of 11M entries is off by about :math:`4 \cdot 10^{-4}`:
:func:`inner_rows` adds float32 partial sums of :data:`SLICE` entries in float64, without a
float64 copy of the rows; :func:`combine_rows` forms combinations of rows in place.
"""

import torch
from torch import Tensor

__all__ = ["COMBINE_BYTES", "SLICE", "combine_rows", "dot_rows", "inner_rows", "work_dtype"]

SLICE = 2**17
"""Entries of each partial sum that a sum over the operator's size adds up in float64."""

COMBINE_BYTES = 2**22
"""Memory of the temporary with which :func:`combine_rows` works, a slice at a time."""


def work_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """Dtype of the small projected problems: float64 where the device supports it."""
    return dtype if device.type == "mps" else torch.float64


def inner_rows(A: Tensor, B: Tensor) -> Tensor:
    r"""``A B^\top`` for rows of the operator's size, in the work dtype.

    On a CPU, BLAS and PyTorch sum the float32 products of millions of entries in float32,
    off by :math:`10^{-4}` relative (a norm) to :math:`10^{-2}` (a product of one row with
    one column): so every slice of :data:`SLICE` entries is a product of its own (a dot
    product for one row with one row, a matrix-vector product for rows with one row), and
    the slices add up in float64, leaving errors near :math:`10^{-6}` relative. Elsewhere
    one product.
    """
    work = work_dtype(A.device, A.dtype)
    if A.device.type != "cpu":
        return (A @ B.T).to(work)
    pairs = zip(A.split(SLICE, dim=1), B.split(SLICE, dim=1), strict=True)
    if B.shape[0] != 1:
        parts = [a @ b.T for a, b in pairs]
    elif A.shape[0] == 1:
        parts = [torch.dot(a[0], b[0]) for a, b in pairs]
    else:  # (a matrix-vector product: as one column, BLAS reads the rows at half the speed)
        parts = [torch.mv(a, b[0]) for a, b in pairs]
    return torch.stack(parts).sum(0, dtype=work).reshape(A.shape[0], B.shape[0])


def dot_rows(A: Tensor, B: Tensor) -> Tensor:
    r"""The dot products of the rows of ``A`` with the same rows of ``B``, in the work dtype.

    Summed as :func:`inner_rows` sums (on a CPU, float64 sums of float32 partial sums), with
    no temporary of the rows' size.
    """
    work = work_dtype(A.device, A.dtype)
    if A.device.type != "cpu":
        return torch.einsum("ij,ij->i", A, B).to(work)
    total = torch.zeros(A.shape[0], dtype=work)
    for i in range(A.shape[0]):
        total[i] = inner_rows(A[i : i + 1], B[i : i + 1])[0, 0]
    return total


def combine_rows(V: Tensor, Q: Tensor, j: int) -> None:
    r"""``V[:q] = Q^\top V[:j]`` in place, for ``(j, q)`` ``Q``, a slice of columns at a time.

    A thick restart's Ritz vectors, Cholesky QR's new rows: without a temporary of their size
    (its first pages cost about as much as the product itself).
    """
    step = max(1, COMBINE_BYTES // (V.element_size() * Q.shape[1]))
    Qt = Q.T.contiguous()
    buffer = V.new_empty(Q.shape[1], min(step, V.shape[1]))
    for start in range(0, V.shape[1], step):
        columns = slice(start, start + step)
        part = buffer[:, : V[0, columns].shape[0]]
        torch.mm(Qt, V[:j, columns], out=part)
        V[: Q.shape[1], columns] = part
