"""What PyHessian 0.1 needs from torch 2 to run, shared by the benchmarks that time it."""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def eig_shim() -> Iterator[None]:
    """PyHessian 0.1's density calls ``torch.eig``, removed in torch 2: supply it meanwhile.

    The shim returns what ``torch.eig(T, eigenvectors=True)`` returned for a symmetric ``T``:
    ``(n, 2)`` eigenvalues (real, imaginary) and the eigenvectors as columns.
    """
    before = getattr(torch, "eig", None)

    def eig(T: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
        values, vectors = torch.linalg.eigh(T)
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    torch.eig = eig  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if before is None:
            del torch.eig  # type: ignore[attr-defined]
        else:
            torch.eig = before  # type: ignore[attr-defined]
