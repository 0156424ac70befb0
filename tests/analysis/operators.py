"""Test operators with known spectra, and a small tanh MLP, for the analysis tests."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

DTYPE = torch.float64


class DenseOperator:
    """A dense symmetric matrix behind the operator protocol, counting its products.

    Attributes:
        A: The matrix.
        shape, dtype, device: As the protocol asks.
        num_matvecs: Columns multiplied so far.
        calls: Number of ``matmat`` calls.
        widths: Number of columns of each call.
    """

    def __init__(self, A: Tensor) -> None:
        self.A = A
        self.shape = tuple(A.shape)
        self.dtype = A.dtype
        self.device = A.device
        self.num_matvecs = 0
        self.calls = 0
        self.widths: list[int] = []

    def matmat(self, V: Tensor) -> Tensor:
        assert V.dim() == 2, V.shape
        assert V.shape[0] == self.shape[1], V.shape
        assert V.dtype == self.dtype
        assert V.device == self.device
        self.num_matvecs += V.shape[1]
        self.calls += 1
        self.widths.append(V.shape[1])
        return self.A @ V


def with_spectrum(eigenvalues: Sequence[float] | Tensor, seed: int = 0) -> Tensor:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (float64, exactly symmetric)."""
    lam = torch.as_tensor(eigenvalues, dtype=DTYPE)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=DTYPE))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def dominant(n: int = 200) -> Tensor:
    """A few large eigenvalues over a small indefinite bulk, like a network's Hessian."""
    head = torch.tensor([100.0, 60.0, 40.0, 25.0, 15.0], dtype=DTYPE)
    return torch.cat([head, torch.linspace(-1.0, 1.0, n - len(head), dtype=DTYPE)])


def clustered(n: int = 120) -> Tensor:
    """Well separated clusters of eigenvalues (near 10, 5 and -3)."""
    g = torch.Generator().manual_seed(7)
    centres = torch.tensor([10.0, 5.0, -3.0], dtype=DTYPE).repeat_interleave(n // 3)
    return centres + 1e-2 * torch.rand(len(centres), generator=g, dtype=DTYPE)


def indefinite(n: int = 100) -> Tensor:
    """A spectrum whose most negative eigenvalue has the largest magnitude."""
    return torch.cat(
        [
            torch.tensor([-50.0, -30.0, 20.0, 12.0], dtype=DTYPE),
            torch.linspace(-5.0, 5.0, n - 4, dtype=DTYPE),
        ]
    )


def tanh_mlp(seed: int = 0, sizes: tuple[int, ...] = (3, 5, 4, 2), samples: int = 12):
    """A small float64 tanh MLP with MSE on random data: (model, loss_fn, inputs, targets)."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))
    inputs = torch.randn(samples, sizes[0], generator=g, dtype=DTYPE)
    targets = torch.randn(samples, sizes[-1], generator=g, dtype=DTYPE)
    return model, nn.MSELoss(), inputs, targets


def generator(seed: int) -> torch.Generator:
    """A CPU generator with a seed."""
    return torch.Generator().manual_seed(seed)


class Recording(DenseOperator):
    """A :class:`DenseOperator` that keeps the columns of every ``matmat`` call."""

    def __init__(self, A: Tensor) -> None:
        super().__init__(A)
        self.requests: list[Tensor] = []

    def matmat(self, V: Tensor) -> Tensor:
        self.requests.append(V.clone())
        return super().matmat(V)


def exchangeable(A: Tensor, Omega: Tensor, diagonal: bool = False) -> Tensor:
    r"""XTrace's (or XDiag's) exchangeable estimates from their definition, one per column.

    Column :math:`i` leaves :math:`\omega_i` out of the sketch, :math:`P_i` the projector on
    :math:`\operatorname{range}(A\Omega_{-i})`: :math:`\operatorname{tr}(P_iA) + \omega_i^\top
    (I - P_i)A(I - P_i)\omega_i`, or :math:`\operatorname{diag}(P_iA) + \omega_i \odot
    (I - P_i)A\omega_i`.
    """
    estimates = []
    for i in range(Omega.shape[1]):
        others = torch.cat([Omega[:, :i], Omega[:, i + 1 :]], dim=1)
        Q = torch.linalg.qr(A @ others)[0]
        P = Q @ Q.T
        rest = Omega[:, i] - P @ Omega[:, i]
        if diagonal:
            estimates.append(
                (P @ A).diagonal() + Omega[:, i] * (A @ Omega[:, i] - P @ A @ Omega[:, i])
            )
        else:
            estimates.append((P @ A).trace() + rest @ A @ rest)
    return torch.stack(estimates, dim=-1)


def jackknife(A: Tensor, Omega: Tensor, diagonal: bool = False) -> Tensor:
    """The jackknife's standard error of the mean of :func:`exchangeable`, over test vectors."""
    s = Omega.shape[1]
    means = torch.stack(
        [
            exchangeable(A, torch.cat([Omega[:, :k], Omega[:, k + 1 :]], dim=1), diagonal).mean(-1)
            for k in range(s)
        ],
        dim=-1,
    )
    deviations = means - means.mean(-1, keepdim=True)
    return ((s - 1) / s * (deviations**2).sum(-1)).sqrt()
