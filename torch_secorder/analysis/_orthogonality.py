r"""Estimates of a Lanczos basis's loss of orthogonality, to skip passes over the basis.

A Lanczos step takes the product of the newest basis vector :math:`v_c`, removes the
vectors it couples with (the three-term recurrence) and normalises:
:math:`\beta v_j = A v_c - \sum_{l \in L} h_l v_l`. In exact arithmetic :math:`v_j` is
then orthogonal to the whole basis; in floating point it loses orthogonality to the older
vectors as Ritz values converge (Paige 1976), and a Gram-Schmidt pass against the whole
basis reads all of it: on a large operator that costs as much as the product.
Simon's recurrence estimates the inner products :math:`\omega_{ij} \approx v_i^\top v_j`
from the projected matrix alone: with :math:`A v_i = \sum_l T_{li} v_l` (the coefficients
of step :math:`i`),

.. math::
    \beta\, \omega_{ij} = \sum_l T_{li}\, \omega_{lc} - \sum_{l \in L} h_l\, \omega_{il}
        \pm \nu \varepsilon \|A\| ,

the last term the rounding of a step: :data:`NOISE` :math:`\varepsilon \|A\|`, or
:data:`ASYMMETRY` times the largest asymmetry of the products seen,
:math:`|v_{c-1}^\top A v_c - \beta_{c-1}|`, where that is more (products rounded beyond the
dtype's, as a float32 network's in a float64 operator are).
The basis is kept *semi-orthogonal*, :math:`|\omega_{ij}| \le \eta` with :math:`\eta =
\min(\sqrt{\varepsilon}, \texttt{tol} \cdot s / \|A\|)`, :math:`s` the least wanted pair's scale
of convergence (its :math:`|\theta|`, or the floor the search gives it) at the last step: a new
vector takes the pass against the whole basis only where an estimate exceeds :math:`\eta`, and
so does the vector after it (whose recurrence reads the one before the pass); the pass's
coefficients go into the projected matrix, as under full reorthogonalisation (left out, as
Simon's tridiagonal leaves them, float32 searches for eigenvalues within a few rounding units of
:math:`\|A\|` of zero drifted above the tolerance and stalled). Semi-orthogonality keeps that
matrix the projection of :math:`A` on the basis's span to :math:`O(\varepsilon \|A\|)`, so its
Ritz values are as accurate as under full reorthogonalisation (Simon 1984). The bound by the
tolerance is for the Ritz vectors: a loss of orthogonality :math:`\eta` leaves their residuals
at about :math:`\eta \|A\|`, which must stay below ``tol`` times the least wanted
:math:`|\theta|` (float64, three copies of an eigenvalue at ``tol=1e-10``: residuals up to
:math:`9 \cdot 10^{-10}` at :math:`\eta = \sqrt{\varepsilon}`, :math:`3 \cdot 10^{-10}` as with
an orthogonal basis at :math:`\eta =` ``tol``; float32, the six largest eigenvalues of
:math:`\operatorname{diag}(1/i^2)` at the default ``tol``: with :math:`\eta =` ``tol`` the
sixth, :math:`\|A\|/36`, stalled above it in 3 of 10 searches). Float32's
:math:`\sqrt{\varepsilon} = 3.5 \cdot 10^{-4}` is above the default tolerance.

References:
    Paige, C. C. (1976). Error analysis of the Lanczos algorithm for tridiagonalizing a
    symmetric matrix. IMA J. Appl. Math. 18(3), 341-349. https://doi.org/10.1093/imamat/18.3.341

    Simon, H. D. (1984). The Lanczos algorithm with partial reorthogonalization. Math. Comp.
    42(165), 115-142. https://doi.org/10.1090/S0025-5718-1984-0725988-X
"""

import torch
from torch import Tensor

from torch_secorder.analysis._rows import work_dtype

__all__ = ["ASYMMETRY", "NOISE", "Semiorthogonality"]

NOISE = 10.0
r"""Rounding of one step in units of :math:`\varepsilon \|A\|`: a product of a network's
Hessian is not symmetric to the last bit (two products :math:`u^\top (Av)` and
:math:`v^\top (Au)` differ by several rounding units of :math:`\|A\|`)."""

ASYMMETRY = 3.0
"""Rounding of one step in units of the products' largest asymmetry seen: one pair of
products samples the rounding errors that the step's inner products with every older vector
see."""


class Semiorthogonality:
    r"""Estimates :math:`\omega_{il}` of the inner products of a basis of up to ``size`` vectors.

    Args:
        size: Most vectors of the basis.
        dtype: Dtype of the vectors (its rounding unit :math:`\varepsilon`).
        device: Device of the vectors.
        tol: The search's relative residual tolerance (bounds :math:`\eta`).

    Attributes:
        passes: Vectors that took the pass over the whole basis so far.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device, tol: float) -> None:
        self.eps = torch.finfo(dtype).eps
        self.tol = tol
        self.level = min(self.eps**0.5, tol * self.eps ** (1 / 3))  # (no Ritz values yet)
        self.omega = torch.eye(size, dtype=work_dtype(device, dtype), device=device)
        self.follow = False  # the vector after a pass takes one too
        self.rounding = NOISE * self.eps  # of a step, relative to |A|
        self.passes = 0

    def check(self, T: Tensor, j: int, recent: int, H: Tensor, beta: float, scale: float) -> bool:
        r"""Estimate row ``j``'s inner products with the rows above; whether it takes the pass.

        Args:
            T: The projected matrix, ``T[l, i]`` the coefficient of row ``l`` in the product
                of row ``i``, filled for the rows above ``j - 1`` (its own column, ``H``, not
                yet: the diagonal and the couplings below it are read).
            j: The new row, from the product of row ``j - 1``.
            recent: The first of the rows taken out of the product, ``H``'s rows.
            H: ``(j, 1)`` coefficients of the rows taken out (rows from ``recent`` on).
            beta: The new row's norm before it is made unit.
            scale: An estimate of :math:`\|A\|`.

        Returns:
            Whether row ``j`` is to be taken out of the whole basis (its estimates are then
            those of a pass, :math:`\varepsilon`).
        """
        omega, c = self.omega, j - 1
        scale = max(scale, beta, float(H[c].abs().max()))  # (an estimate of |A| at least)
        due = self.follow or beta <= 0
        if not due:
            lower = T[:j, :j].tril()
            coupled = lower + lower.tril(-1).T  # (A v_i)^T v_l, its rounded upper part left out
            estimate = coupled @ omega[:j, c] - omega[:j, recent:j] @ H[recent:j, 0]
            # the step's rounding, relative to |A|: at least the products' largest asymmetry
            # so far, v_{c-1}^T (A v_c) against v_c^T (A v_{c-1}) (rounded beyond the dtype)
            if recent < c:
                asymmetry = abs(float(H[c - 1, 0] - T[c, c - 1])) / scale
                self.rounding = max(self.rounding, ASYMMETRY * asymmetry)
            estimate += torch.where(estimate < 0, -1.0, 1.0) * self.rounding * scale
            estimate /= beta
            estimate[recent:] = self.eps * max(1.0, scale / beta)  # taken out in this step
            due = bool(estimate.abs().max() > self.level)
            omega[j, :j] = omega[:j, j] = estimate
        self.follow = due and not self.follow
        if due:
            omega[j, :j] = omega[:j, j] = self.eps
            self.passes += 1
        return due

    def aim(self, relative: float) -> None:
        r"""Bound the estimates by ``tol`` times ``relative``.

        ``relative``: the wanted pairs' least scale of convergence (:math:`|\theta|`, or its
        floor) over :math:`\|A\|`, as the last step saw them.
        """
        self.level = min(self.eps**0.5, self.tol * relative)

    def fresh(self, j: int) -> None:
        """Row ``j`` is new and orthogonal to the rows above (a random row made so)."""
        self.omega[j, :j] = self.omega[:j, j] = self.eps
