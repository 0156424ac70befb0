r"""Lanczos iterations with reorthogonalisation, written as product-requesting generators.

Two algorithms share the machinery here; each is a generator for :func:`._driver.run` that
yields blocks of vectors and receives their products with the symmetric operator :math:`A`.

* :func:`thick_restart_lanczos` finds extreme eigenpairs. It builds an orthonormal Krylov
  basis :math:`V` block by block (block size 1 is classic Lanczos), orthogonalising every new
  block against the block it couples with and then against the whole basis (classical
  Gram-Schmidt, again where that pass removed more than a third), so the Rayleigh-Ritz
  projection :math:`T = V^\top A V` stays accurate in finite precision. One vector at a
  time on a large operator, its first basis (up to the first restart) takes the pass over
  the whole basis only where Simon's estimates of its loss of orthogonality call for one
  (:mod:`._orthogonality`): there these passes cost as much as the products. Its sums over
  the operator's size add float32 partial sums in float64 (:func:`~._rows.inner_rows`):
  summed in float32, a norm of 11M entries is off by :math:`4 \cdot 10^{-4}`.
  When the basis is full it restarts *thick* (Wu & Simon 2000): it keeps the most wanted Ritz
  vectors and the current residual block and goes on, so memory stays bounded while the
  wanted Ritz values keep improving. It stops when every wanted Ritz pair
  :math:`(\theta, x = Vy)` has a residual :math:`\|Ax - \theta x\| = \|B\, y_{\text{last}}\|`
  (read off the Lanczos relation :math:`AV = VT + U B E^\top`, no extra product) below
  ``tol`` times :math:`\max(|\theta|, \varepsilon^{1/3}\|A\|)`.
* :func:`lanczos_quadrature` runs several probes together (one batched product per step),
  each reorthogonalised against its own basis (its last vectors, on large operators), and
  returns each probe's Gauss quadrature
  nodes (Ritz values) and weights (squared first components of the Ritz vectors), the input
  of stochastic Lanczos quadrature.

References:
    Those cited by :mod:`torch_secorder.analysis.eigen` (Lanczos 1950; Wu and Simon 2000)
    and :mod:`torch_secorder.analysis.density` (Golub and Meurant 2010), and

    Greenbaum, A. (1989). Behavior of slightly perturbed Lanczos and conjugate-gradient
    recurrences. Linear Algebra Appl. 113, 7-63. https://doi.org/10.1016/0024-3795(89)90285-1

    Knizhnerman, L. A. (1996). The simple Lanczos procedure: estimates of the error of the
    Gauss quadrature formula and their applications. Comput. Math. Math. Phys. 36(11),
    1481-1492.

    Stathopoulos, A., Saad, Y. and Wu, K. (1998). Dynamic thick restarting of the Davidson,
    and the implicitly restarted Arnoldi methods. SIAM J. Sci. Comput. 19(1), 227-245.
    https://doi.org/10.1137/S1064827596304162
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from torch_secorder.analysis._driver import Steps
from torch_secorder.analysis._memory import kept_vectors, refuse
from torch_secorder.analysis._orthogonality import Semiorthogonality
from torch_secorder.analysis._rows import SLICE, combine_rows, inner_rows, work_dtype
from torch_secorder.analysis._sampling import gaussian, rademacher

__all__ = ["RitzPairs", "default_basis_size", "lanczos_quadrature", "thick_restart_lanczos"]

WHICH = ("largest", "smallest", "magnitude")

BASIS_BYTES = 2**32
"""Memory the quadrature's Lanczos bases may take together; more probes run in groups."""

MIN_WINDOW = 3
"""Fewest vectors of its basis a quadrature probe keeps: the last two and the next, which the
three-term recurrence needs (a step then reorthogonalises against the last two only)."""

PRODUCTS_BYTES = 2**28
"""Most memory of the basis's products an eigen-solver keeps to check its Ritz pairs without
products of their own. Beyond it (a ResNet-18's basis of 20 vectors of 11.2M parameters takes
900 MiB), copying every product into fresh memory costs more than the products it saves (at a
batch of 8, 0.6 s over 27 steps against one product of 0.12 s)."""

SEMIORTHOGONAL_BYTES = 2**20
"""Size of a vector from which an eigen-solver's first basis, one vector a step and nothing
locked, is kept semi-orthogonal (:mod:`._orthogonality`) until it restarts. Its passes over
the basis then cost as much as the products (a ResNet-18's top eigenvalue, 11.2M parameters
at a batch of 8: 2.3 s in 20 passes against 2.8 s in products); on smaller operators they
cost little, and a basis that spans the whole space gives exact pairs only if orthogonal."""

WINDOW_BYTES = 2**27
"""Memory of a quadrature probe's basis beyond which it keeps only its last vectors (at least
:data:`MIN_WINDOW`): a step reads the kept vectors twice, so this bounds the
reorthogonalisation's memory traffic per step (256 MiB) next to the product's. A ResNet-18's
11.2M parameters keep 3: its density, one probe of 100 steps at a batch of 8, spent 0.28-0.30
of the products' time outside them, against 0.46-0.49 with 8, for a density within 9e-5
(L1) of the one with 8 and the same extreme nodes to 4e-6."""


@dataclass
class RitzPairs:
    r"""Wanted Ritz pairs from an eigen-solver.

    Attributes:
        values: ``(k,)`` Ritz values, most wanted first.
        vectors: ``(n, k)`` unit Ritz vectors.
        residuals: ``(k,)`` residual norms :math:`\|Ax - \theta x\|`.
        converged: Whether every pair met the tolerance.
        spanned: Whether the basis spanned the whole space (the pairs are then exact).
        stalled: Whether the search stopped, products left, because the explicit residuals
            no longer improved (the rounding of the products limits them).
        products: ``(n, k)`` products :math:`Ax` of the vectors, where a search kept its
            basis's products (``None`` where not, and in what a solver returns).
        norm: The largest :math:`|\theta|` the search saw, its estimate of :math:`\|A\|`.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    converged: bool
    spanned: bool = False  # the basis spanned the whole space: exact to rounding
    stalled: bool = False
    products: Tensor | None = None
    norm: float = 0.0


def wanted_order(theta: Tensor, which: str) -> Tensor:
    """Indices of Ritz values from most to least wanted."""
    if which == "largest":
        return torch.argsort(theta, descending=True)
    if which == "smallest":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def default_basis_size(k: int, block_size: int = 1) -> int:
    r"""Largest basis before a thick restart: :math:`\max(20, 2k + 2b)` (as ARPACK's ``ncv``)."""
    return max(20, 2 * k + 2 * block_size)


def relative_floor(dtype: torch.dtype) -> float:
    r"""Ritz values below :math:`\varepsilon^{1/3}\|A\|` converge in absolute terms."""
    return torch.finfo(dtype).eps ** (1 / 3)


def _fill(V: Tensor, begin: int, end: int, locked: Tensor, generator: torch.Generator) -> None:
    """Rows ``begin`` to ``end`` of ``V``: random unit vectors orthogonal to the rows above."""
    for i in range(begin, end):
        V[i] = gaussian(generator, (V.shape[1],), V.dtype, V.device)
        _orthonormalise(V, i, locked)


def _orthonormalise(V: Tensor, i: int, locked: Tensor) -> float:
    """Make row ``i`` of ``V`` orthogonal to ``locked``'s columns and the rows above, and unit.

    Classical Gram-Schmidt, twice, in place.

    Returns:
        The row's norm before it was divided by it (zero: the row is left zero).
    """
    row = V[i : i + 1]
    for _ in range(2):
        for basis in (locked.T, V[:i]):
            if basis.shape[0]:
                row.T.addmm_(basis.T, inner_rows(basis, row).to(V.dtype), alpha=-1)
    norm = float(inner_rows(row, row)) ** 0.5
    if norm > 0:
        row.div_(norm)
    return norm


def wanted_key(theta: Tensor, which: str) -> Tensor:
    r"""A key that grows with how wanted a Ritz value is (its value, minus it, or its size).

    Each key moves by at most :math:`|\lambda - \theta|` between an eigenvalue and a Ritz
    value, so a residual bounds it.
    """
    if which == "largest":
        return theta
    if which == "smallest":
        return -theta
    return theta.abs()


def thick_restart_lanczos(
    n: int,
    k: int,
    which: str,
    tol: float,
    max_matvecs: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    *,
    block_size: int = 1,
    basis_size: int | None = None,
    start: Tensor | None = None,
    reach: list[float] | None = None,
) -> Steps:
    r"""Find ``k`` extreme eigenpairs of a symmetric operator by thick-restart (block) Lanczos.

    A Krylov space from one random vector holds one direction of each eigenspace, so it sees
    one copy of a repeated eigenvalue. For ``k > 1``, once the ``k`` wanted pairs converge, the
    search goes on in their orthogonal complement from a fresh random vector, as for the first
    of them:
    it stops once the most wanted Ritz pair there has converged to :math:`\sqrt{\texttt{tol}}`
    (relative residual) and is less wanted than the ``k``-th pair found by more than its
    residual; a more wanted one converges to ``tol`` and joins the pairs found, which are then
    verified again. Repeated eigenvalues are so found with all their copies, at the cost of a
    loosely converged extra eigenpair. (For one pair that search could only find another copy
    of the same eigenvalue: it is left out.)

    The residuals Lanczos reads off its recurrence drift from the true ones in finite precision
    (in float32, by factors of two or more on large networks, once near the rounding of the
    products), so every returned pair is then checked against the products: the vector
    normalised, the value its Rayleigh quotient, the residual :math:`\|Ax - \theta x\|`
    computed, and ``converged`` only if that explicit residual meets ``tol``. Where the basis's
    products :math:`AV` take at most :data:`PRODUCTS_BYTES` and the budget holds them besides
    the basis, they are kept as they arrive (combined at a restart as the basis is), and
    :math:`Ax = (AV)y` costs no product; else each pair takes one product of its own. Where the
    recurrence's residuals met ``tol`` but the explicit ones do not, the search goes on from
    the pairs found, with the inner tolerance lowered by as much as they were off (not below
    the rounding unit), while the explicit residuals at least halve and products remain; where
    a refinement does not halve them, the result is ``stalled``. A refinement's pairs converge
    when their explicit residuals meet ``tol``, also where its own recurrence ran out of
    products.

    Args:
        n: Dimension of the operator.
        k: Number of wanted eigenpairs, ``1 <= k <= n``.
        which: ``"largest"``, ``"smallest"`` (algebraic) or ``"magnitude"``.
        tol: Relative residual tolerance.
        max_matvecs: Budget of products.
        dtype: Dtype of the vectors.
        device: Device of the vectors.
        generator: Source of the random starting vectors.
        block_size: Vectors per step :math:`b` (one batched product of :math:`b` columns).
        basis_size: Largest basis before a restart (default :func:`default_basis_size`).
        start: ``(n, j)`` vectors to start from (eigenvectors found before, a warm start; or
            the loss gradient): their normalised sum plus a random unit vector is the first
            vector. The random half gives it a direction in every eigenspace, as a random
            start has, so an eigenvalue that has overtaken the ones found is found as from a
            cold start. (A zero ``start`` leaves the random vector alone.)
        reach: ``[r]``, shared by searches on diagonal blocks of one operator (a model's
            groups): the largest :math:`|\theta|` any of them has seen, updated as they go.
            Their products round relative to the whole operator, so Ritz values below
            :math:`\sqrt{\varepsilon}\, r` (besides those below :math:`\varepsilon^{1/3}`
            times the block's own largest) converge in absolute terms: a block of rounding
            noise, a bias before a train-mode BatchNorm, converges as zero.

    Yields:
        Blocks of at most ``block_size`` columns; receives their products.

    Returns:
        The wanted :class:`RitzPairs`, most wanted first.
    """
    # products kept back for the explicit residuals, unless the budget can span the whole space
    # or the basis's products are kept
    _, keeps_products = _basis_plan(n, k, min(block_size, n), 0, basis_size, dtype, device)
    check = 0 if keeps_products else k
    reserved = 0 if n <= max_matvecs else min(check, max_matvecs - 1)
    inner, best = tol, None
    used = 0
    # (held in a list the search takes it from: nothing keeps it once it is in the basis)
    starts = [] if start is None else [_warm(start, generator)]
    start = None
    workspace: list[Tensor] = []  # one basis for every search, its pages touched once
    while True:
        options = (which, inner, dtype, device, generator, block_size, basis_size, workspace, reach)
        budget = max_matvecs - (reserved if best is None else check) - used
        pairs, spent = yield from _all_copies(n, k, budget, starts, *options)
        used += spent
        products, pairs.products = pairs.products, None  # the check's, not the caller's
        if pairs.spanned:  # the basis spans everything: the pairs are exact to rounding
            return pairs
        asked = 0 if products is not None else k  # products the check takes
        if used + asked > max_matvecs:  # no products left to check them: not known to converge
            pairs.converged = False
            return pairs
        # A refinement starts from pairs already found: its explicit residuals decide alone.
        checked = yield from _explicit(
            pairs, products, which, tol, dtype, pairs.converged or best is not None, reach
        )
        used += asked
        halved = best is None or _worst(checked) <= _worst(best) / 2
        if best is not None and _worst(best) < _worst(checked):
            checked = best  # the better of the two checked sets
        if checked.converged or not pairs.converged or used + k >= max_matvecs or not halved:
            # stalled: a refinement did not halve the explicit residuals (rounding)
            checked.stalled = best is not None and not checked.converged and not halved
            return checked  # done, out of products, or no longer improving
        # The estimates met the tolerance, the explicit residuals not (rounding of the
        # products): go on from the pairs found, aiming as much lower as they were off.
        off = float(pairs.residuals.min()) / max(_worst(checked), 1e-300)
        # (no lower than the rounding unit: a recurrence aiming below it would not stop)
        inner = max(inner * min(1.0, off) / 2, torch.finfo(dtype).eps)
        starts, best = [checked.vectors], checked


def _warm(start: Tensor, generator: torch.Generator) -> Tensor:
    """The normalised sum of the columns of ``start`` plus a random unit vector, ``(n, 1)``.

    A sum of norm below the dtype's smallest normal number counts as zero (left out).
    """
    noise = gaussian(generator, (start.shape[0], 1), start.dtype, start.device)
    total = start.sum(dim=1, keepdim=True) if start.shape[1] > 1 else start
    size = float(inner_rows(total.T, total.T)) ** 0.5
    noise.div_(float(inner_rows(noise.T, noise.T)) ** 0.5)
    return noise if size <= torch.finfo(start.dtype).tiny else noise.add_(total, alpha=1 / size)


def _reach_floor(reach: list[float] | None, dtype: torch.dtype) -> float:
    """Ritz values below this converge in absolute terms for the run's ``reach``."""
    return torch.finfo(dtype).eps ** 0.5 * reach[0] if reach else 0.0


def _worst(pairs: RitzPairs) -> float:
    return float(pairs.residuals.max())


def _all_copies(
    n: int,
    k: int,
    max_matvecs: int,
    starts: list[Tensor],
    which: str,
    tol: float,
    *options: object,
) -> Steps:
    """The ``k`` wanted pairs, then (``k > 1``) a search for more copies of repeated eigenvalues.

    The first search starts from the vectors in ``starts`` (taken out), if any.

    Returns:
        ``(pairs, products used)``.
    """
    pairs, used = yield from _restarted_lanczos(
        n, k, max_matvecs, None, None, which, tol, *options, starts=starts
    )
    while k > 1 and pairs.converged and pairs.vectors.shape[1] < n and used < max_matvecs:
        least = float(wanted_key(pairs.values[-1], which))
        candidate, spent = yield from _restarted_lanczos(
            n, 1, max_matvecs - used, pairs.vectors, least, which, tol, *options
        )
        used += spent
        if candidate is None:
            break
        if not candidate.converged:
            pairs.converged = False
            break
        if float(wanted_key(candidate.values[0], which)) <= least:
            break
        pairs = _merge(pairs, candidate, k, which)
    return pairs, used


def _explicit(
    pairs: RitzPairs,
    products: Tensor | None,
    which: str,
    tol: float,
    dtype: torch.dtype,
    found: bool,
    reach: list[float] | None = None,
) -> Steps:
    r"""The pairs with explicit residuals, as the user would check them.

    The pairs' products are ``products`` where the search kept them, else one product per
    vector is asked for. The vectors are normalised, the values are their Rayleigh quotients
    :math:`x^\top A x / x^\top x` and the residuals :math:`\|Ax - \theta x\| / \|x\|`,
    from the products, computed in float64 (a float32 norm of millions of entries, off by
    :math:`10^{-4}`, would bias both by as much), a slice of :data:`SLICE` rows at a time;
    converged when every residual is at most ``tol`` times
    :math:`\max(|\theta|, \varepsilon^{1/3} \|A\|, \sqrt{\varepsilon}\, r)`
    (:math:`\|A\|` the larger of :math:`\max_i |\theta_i|` and the search's estimate
    ``pairs.norm``; ``reach`` :math:`[r]`, where given) and the pairs were ``found`` (their
    search converged, or they refine pairs that had).
    """
    norms = inner_rows(pairs.vectors.T, pairs.vectors.T).diagonal().sqrt().to(dtype)
    X = pairs.vectors / norms
    AX = (yield X) if products is None else products / norms
    work = work_dtype(X.device, dtype)
    slices = [slice(start, start + SLICE) for start in range(0, X.shape[0], SLICE)]
    size, quotient, squares = (X.new_zeros(X.shape[1], dtype=work) for _ in range(3))
    for rows in slices:
        x = X[rows].to(work)
        size += x.square().sum(dim=0)
        quotient += (x * AX[rows].to(work)).sum(dim=0)
    theta = quotient / size
    for rows in slices:
        squares += (AX[rows].to(work) - X[rows].to(work) * theta).square().sum(dim=0)
    residuals = (squares / size).sqrt().to(dtype)
    theta = theta.to(dtype)
    floor = relative_floor(dtype) * max(float(theta.abs().max()), pairs.norm)
    scale = torch.clamp(theta.abs(), min=max(floor, _reach_floor(reach, dtype)))
    converged = found and bool((residuals <= tol * scale).all())
    order = wanted_order(theta, which)
    return RitzPairs(theta[order], X[:, order], residuals[order], converged)


def _merge(pairs: RitzPairs, other: RitzPairs, k: int, which: str) -> RitzPairs:
    """The ``k`` most wanted of two sets of converged pairs."""
    values = torch.cat([pairs.values, other.values])
    keep = wanted_order(values, which)[:k]
    both = pairs.products is not None and other.products is not None
    return RitzPairs(
        values[keep],
        torch.cat([pairs.vectors, other.vectors], dim=1)[:, keep],
        torch.cat([pairs.residuals, other.residuals])[keep],
        True,
        products=torch.cat([pairs.products, other.products], dim=1)[:, keep] if both else None,
        norm=max(pairs.norm, other.norm),
    )


def _restarted_lanczos(
    n: int,
    k: int,
    max_matvecs: int,
    locked: Tensor | None,
    bound: float | None,
    which: str,
    tol: float,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    block_size: int,
    basis_size: int | None,
    workspace: list[Tensor],
    reach: list[float] | None = None,
    *,
    starts: list[Tensor] | None = None,
) -> Steps:
    r"""Thick-restart Lanczos in the orthogonal complement of the columns of ``locked``.

    With ``bound``, stops early (returning ``None``) once the most wanted Ritz pair has
    converged to the screening tolerance :math:`\sqrt{\texttt{tol}}` and is less wanted than
    ``bound`` by more than its residual: :math:`\text{key}(\theta) + \|r\| \le` ``bound``.
    Columns whose span should seed the search (e.g. Ritz vectors found before), taken out of
    ``starts`` where it holds them, replace the random first vector by their sum. The basis
    is the first rows of the one in ``workspace`` where that has enough (else a new one, kept
    there); each step writes the next block into the rows below the basis and a restart
    combines them in place, so no vector of the operator's size is allocated per step.
    ``reach`` is that of :func:`thick_restart_lanczos`. One vector a step, nothing locked
    and vectors of at least :data:`SEMIORTHOGONAL_BYTES`, the basis is semi-orthogonal
    (:class:`~._orthogonality.Semiorthogonality`) until the first restart, orthogonal from
    there on: a restart's Ritz vectors satisfy the Lanczos relation only to the level of
    their basis's orthogonality, which Simon's estimates do not follow.

    Returns:
        ``(pairs, products used)``; ``pairs`` is ``None`` after such an early stop.
    """
    eps = torch.finfo(dtype).eps
    work = work_dtype(device, dtype)
    locked = torch.zeros(n, 0, dtype=dtype, device=device) if locked is None else locked
    free = n - locked.shape[1]
    b = min(block_size, free)
    m, keeps_products = _basis_plan(n, k, b, locked.shape[1], basis_size, dtype, device)
    floor = relative_floor(dtype)
    if not workspace or workspace[0].shape[0] < m + b:
        workspace[:] = [torch.empty(m + b, n, dtype=dtype, device=device)]
    # The basis, one vector per row, with room below it for the block it grows by; rows
    # below j + b are written before they are read.
    V = workspace[0][: m + b]
    # The basis's products, row for row, where the budget holds them too: the pairs' explicit
    # residuals then need no product.
    AV = None
    if keeps_products:
        if len(workspace) < 2 or workspace[1].shape[0] < m:
            workspace[1:] = [torch.empty(m, n, dtype=dtype, device=device)]
        AV = workspace[1][:m]
    T = torch.zeros(m, m, dtype=work, device=device)
    # large vectors, one a step, nothing locked: until the first restart, passes over the whole
    # basis only where its orthogonality needs one
    large = n * torch.finfo(dtype).bits // 8 >= SEMIORTHOGONAL_BYTES
    alone = large and b == 1 and not locked.shape[1]
    semi = Semiorthogonality(m + b, dtype, device, tol) if alone else None
    given = 0
    if starts:  # their sum, made orthogonal to what is locked
        torch.sum(starts.pop(), dim=1, out=V[0])
        given = int(_orthonormalise(V, 0, locked) > 0)
    _fill(V, given, b, locked, generator)
    j, current, recent = b, slice(0, b), 0
    used, norm = 0, 0.0
    while True:
        # the products go into the rows below the basis, which become the next block
        new = V[j : j + current.stop - current.start]
        W = yield V[current].T.contiguous(), new.T
        used += current.stop - current.start
        if AV is not None:
            AV[current] = W.T
        # new^T B = A V[current]^T - V[:j]^T H, in place
        check = None if semi is None else partial(semi.check, T, j, recent, scale=norm)
        H, size = _against_basis(W, V, j, recent, locked, check)
        T[:j, current] = H
        theta, Y = torch.linalg.eigh((T[:j, :j] + T[:j, :j].T) / 2)
        norm = max(norm, float(theta.abs().max()))
        if reach is not None:
            reach[0] = max(reach[0], norm)
        singular, Vh = _factor(new, size)
        B = (singular[:, None] * Vh).to(work)
        # Residuals of all Ritz pairs, from A V = V T + U B E^T (zero once V spans everything).
        residuals = (B @ Y[current]).norm(dim=0) if j < free else theta.new_zeros(j)
        order = wanted_order(theta, which)
        wanted = order[:k]
        scale = torch.clamp(theta[wanted].abs(), min=max(floor * norm, _reach_floor(reach, dtype)))
        if semi is not None and norm > 0:  # the tolerance of the least wanted pair, relative
            semi.aim(float(scale.min()) / norm)
        if bound is not None:  # resolved to the screening tolerance and certainly unwanted
            best = order[0]
            resolved = residuals[best] <= tol**0.5 * scale[0]
            if resolved and float(wanted_key(theta[best], which) + residuals[best]) <= bound:
                return None, used
        converged = j >= k and bool((residuals[wanted] <= tol * scale).all())
        if converged:
            break
        # The next block; restart thick when the basis has no room for it.
        restart = j + min(b, free - j) > m
        keep = max(k, min((m + k) // 2, m - b, j)) if restart else j
        width = min(b, free - keep, max_matvecs - used)
        if width <= 0:
            break
        if restart:
            kept = order[:keep]
            coupling = B @ Y[current][:, kept]
            ritz = Y[:, kept].to(dtype)
            combine_rows(V, ritz, j)
            if AV is not None:
                combine_rows(AV, ritz, j)
            V[keep : keep + new.shape[0]] = new  # the next block follows the kept vectors
            T.zero_()
            T[:keep, :keep] = torch.diag(theta[kept])
            semi = None  # (Ritz vectors of a semi-orthogonal basis: see _orthogonality)
        else:
            coupling = torch.zeros(B.shape[0], j, dtype=work, device=device)
            coupling[:, current] = B
        recent = 0 if restart else current.start  # the columns the next product couples with
        j = keep
        take = min(width, B.shape[0])
        # A vanishing residual direction means V spans an invariant subspace: go on in fresh
        # random directions.
        strong = singular[:take] > eps ** (2 / 3) * norm
        if not bool(strong.all()) or take < width:
            coupling = _replace_weak(V, j, width, strong, coupling, locked, generator)
            if semi is not None:
                semi.fresh(j)
        T[j : j + width, :j] = coupling[:width]
        current = slice(j, j + width)
        j += width
    X = V[: Y.shape[0]].T @ Y[:, wanted].to(dtype)
    AX = None if AV is None else AV[: Y.shape[0]].T @ Y[:, wanted].to(dtype)
    spanned = j >= free and locked.shape[1] == 0
    pairs = RitzPairs(
        theta[wanted].to(dtype),
        X,
        residuals[wanted].to(dtype),
        converged,
        spanned,
        products=AX,
        norm=norm,
    )
    return pairs, used


def check_basis(n: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before any work, a search whose least basis does not fit the memory budget."""
    _basis_plan(n, k, 1, 0, None, dtype, device)


def _basis_plan(
    n: int,
    k: int,
    b: int,
    locked: int,
    basis_size: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[int, bool]:
    """The largest basis of a search besides ``locked`` vectors, and whether its products fit too.

    The budget (:func:`~._memory.kept_vectors`) holds the basis of ``m + b`` rows, ``k`` Ritz
    vectors and a block besides; the products of the basis, ``m`` rows and ``k`` for the
    pairs', where it holds them too and they take at most :data:`PRODUCTS_BYTES`.

    Raises:
        ValueError: Where not even a basis of ``k + b`` vectors fits.
    """
    free = n - locked
    room = kept_vectors(n, dtype, device) - locked - k - 2 * b  # besides the basis
    m = min(free, basis_size or default_basis_size(k, b), room)
    if m < min(free, k + b):
        least = (k + b) + (k + 2 * b + locked)  # the basis, and what it keeps besides
        raise refuse("Lanczos", least, n, dtype, device)
    small = m * n * torch.finfo(dtype).bits // 8 <= PRODUCTS_BYTES
    return m, small and 2 * m + k <= room


def _against_basis(
    W: Tensor,
    V: Tensor,
    j: int,
    recent: int,
    locked: Tensor,
    semi: Callable[[Tensor, float], bool] | None = None,
) -> tuple[Tensor, Tensor]:
    """Orthogonalise the columns of ``W``, the rows below the basis ``V[:j]``, in place.

    The product of the last block couples (in exact arithmetic) with the rows from ``recent``
    on only, so those are taken out first (no temporary of the operator's size), then the
    whole basis and the columns of ``locked`` (:func:`_project_out`: once, again where
    needed, one row made unit in the same update). With ``semi`` (one row, nothing locked),
    the whole basis only where ``semi(H, norm)`` asks for it from the coefficients so far
    and the row's norm (:class:`~._orthogonality.Semiorthogonality`); else the row is made
    unit.

    Returns:
        The coefficients ``V[:j] W`` (in the work dtype) and the squared norms of ``new``
        (one row is then unit).
    """
    basis, new = V[:j], W.T
    local = basis[recent:]
    near = inner_rows(local, new)
    if W.shape[1] == 1:  # a vector less a few: one pass of elementwise updates, no GEMM
        for row, c in zip(local, near[:, 0].tolist()):
            new[0].add_(row, alpha=-c)
    else:  # (columns: BLAS takes the product of one row with a matrix as a slow product)
        W.addmm_(local.T, near.to(W.dtype), alpha=-1)
    H = torch.zeros(j, W.shape[1], dtype=near.dtype, device=W.device)
    H[recent:] = near
    if semi is not None:
        size = inner_rows(new, new)[0]
        if not semi(H, float(size) ** 0.5):
            if float(size) > 0:
                new.div_(float(size) ** 0.5)
            return H, size
    passes, size = _project_out(new, [basis, locked.T])
    for coefficients in passes:
        H += coefficients[0]
    return H, size


def _project_out(new: Tensor, pieces: list[Tensor]) -> tuple[list[list[Tensor]], Tensor]:
    """Take the span of the rows of ``pieces`` out of the rows of ``new``, in place.

    Classical Gram-Schmidt once, again only where that pass removed more than a third of what
    was left (the "twice is enough" test). The squared norms of ``new`` after a pass follow
    from its norms before and the coefficients (Pythagoras), so a single row is divided by its
    norm in the same update.

    Returns:
        For each pass, the coefficients of each piece, ``(rows of the piece, rows of new)`` in
        the work dtype; and the squared norms of ``new`` before the division (a single row is
        then unit).
    """
    work = work_dtype(new.device, new.dtype)
    passes: list[list[Tensor]] = []
    for again in (True, False):
        coefficients = [
            inner_rows(piece, new) if piece.shape[0] else new.new_zeros(0, new.shape[0], dtype=work)
            for piece in pieces
        ]
        passes.append(coefficients)
        removed = sum(c.square().sum(dim=0) for c in coefficients)
        size = (inner_rows(new, new).diagonal() - removed).clamp(min=0)
        # |before|^2 = |after|^2 + |coefficients|^2: again where |after| < 2/3 |before|
        again = again and bool((removed > 1.25 * size).any())
        unit = not again and new.shape[0] == 1 and float(size) > 0
        scale = float(size) ** -0.5 if unit else 1.0
        beta = scale  # (the first update scales new, the others add to it)
        for piece, c in zip(pieces, coefficients):
            if piece.shape[0]:
                new.T.addmm_(piece.T, c.to(new.dtype), beta=beta, alpha=-scale)
                beta = 1.0
        if not again:
            break
    return passes, size


def _replace_weak(
    V: Tensor,
    j: int,
    width: int,
    strong: Tensor,
    coupling: Tensor,
    locked: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """Keep the strong rows of the block at ``j`` and fill it up to ``width`` rows at random.

    The random rows are orthogonal to ``locked``, to the basis and to each other; their
    coupling with the basis is zero.

    Returns:
        The coupling rows of the block's ``width`` rows.
    """
    index = strong.nonzero().squeeze(1)
    V[j : j + len(index)] = V[j + index]
    _fill(V, j + len(index), j + width, locked, generator)
    missing = width - len(index)
    return torch.cat([coupling[index], coupling.new_zeros(missing, coupling.shape[1])])


def _factor(rows: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """``rows^T = U diag(s) Vh`` (thin), ``U^T`` written into ``rows``.

    One row is unit already (:func:`_against_basis`): its ``s`` is the square root of
    ``size``. More take an SVD.

    Returns:
        ``(s, Vh)``.
    """
    if rows.shape[0] != 1:
        U, singular, Vh = torch.linalg.svd(rows.T, full_matrices=False)
        rows.copy_(U.T)
        return singular, Vh
    return size.sqrt().to(rows.dtype), torch.ones(1, 1, dtype=rows.dtype, device=rows.device)


def lanczos_quadrature(
    n: int,
    steps: int,
    num_probes: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    *,
    span: int | None = None,
) -> Steps:
    r"""Gauss quadrature nodes and weights of several random probes, run together.

    Each probe :math:`z` (Rademacher, scaled to unit norm) starts its own Lanczos recurrence;
    the probes advance together, one product of all active probes per step. Each step takes
    the three-term recurrence's terms out of the product, then reorthogonalises against the
    probe's basis (:func:`_next_vector`). After ``s`` steps the tridiagonal
    :math:`T_s = Y \Theta Y^\top` gives nodes :math:`\theta_j` and weights
    :math:`\tau_j = (e_1^\top y_j)^2`, so that
    :math:`z^\top f(A) z \approx \sum_j \tau_j f(\theta_j)`. A probe whose Krylov space is
    exhausted (:math:`\beta_j \le \sqrt{\varepsilon}\,\|A\|`) stops early; its quadrature is
    then exact and its rows are padded with weight zero.

    A probe keeps its whole basis up to :data:`WINDOW_BYTES` (100 steps of vectors of up to
    335k float32 entries), else its last vectors that fit there (at least
    :data:`MIN_WINDOW`; 3 for a ResNet-18's 11.2M), and is reorthogonalised against those:
    orthogonality to the older ones is then kept by the recurrence alone, and lost as Ritz
    values converge, which Gauss quadrature tolerates (the nodes and weights are those of a
    slightly perturbed operator's, a converged extreme eigenvalue may come back as a second
    node sharing its weight: Greenbaum 1989; Knizhnerman 1996; Golub and Meurant 2010,
    chapter 4). A step's reorthogonalisation reads the kept vectors twice: the window bounds
    its cost next to the product's on large networks.

    The kept vectors of all probes may exceed :data:`BASIS_BYTES` or the memory budget
    (:mod:`._memory`): the probes then run in consecutive groups that fit (the same probes,
    drawn in the same order), sized for vectors of the operator's size ``span`` (default
    ``n``), so that the quadratures of all blocks of one operator together hold what one of
    the whole would; where not even one probe's vectors fit, it keeps fewer (down to
    :data:`MIN_WINDOW`).

    Args:
        n: Dimension of the operator.
        steps: Lanczos steps per probe (capped at ``n``).
        num_probes: Number of probes.
        dtype: Dtype of the vectors.
        device: Device of the vectors.
        generator: Source of the probes.
        span: Size of the operator whose block of size ``n`` this quadrature sees (default
            ``n``), for the size of the groups of probes.

    Yields:
        ``(n, a)`` blocks of the ``a`` active probes' Lanczos vectors; receives their products.

    Returns:
        ``(nodes, weights)``, each ``(num_probes, steps)``, nodes ascending per probe.
    """
    steps = min(steps, n)
    vector = (span or n) * torch.finfo(dtype).bits // 8
    kept = kept_vectors(span or n, dtype, device)
    window = min(steps, max(MIN_WINDOW, WINDOW_BYTES // vector))  # vectors kept per probe
    fit = min(BASIS_BYTES // (window * vector), kept // (window + 2))  # probes at a time
    if not fit:  # not even one probe's vectors fit: it keeps fewer
        window = min(window, BASIS_BYTES // vector, kept - 2)
    if window < min(steps, MIN_WINDOW):
        least = min(steps, MIN_WINDOW) + 2
        raise refuse(f"a Lanczos basis of {steps} steps", least, span or n, dtype, device)
    group = min(num_probes, max(fit, 1))
    nodes, weights = [], []
    for start in range(0, num_probes, group):
        count = min(group, num_probes - start)
        probes = rademacher(generator, (count, n), dtype, device).div_(n**0.5)
        group_nodes, group_weights = yield from _quadrature(probes, steps, window)
        nodes.append(group_nodes)
        weights.append(group_weights)
    return torch.cat(nodes), torch.cat(weights)


def _quadrature(q: Tensor, steps: int, window: int) -> Steps:
    """Lanczos quadrature of the unit probes ``q`` (one per row), all advancing together.

    Each probe keeps its last ``window`` Lanczos vectors (all of them when ``window`` is
    ``steps``), step ``j``'s in slot ``j % window``; a step writes the next one into slot
    ``(j + 1) % window`` (:func:`_next_vector`).
    """
    num_probes, n = q.shape
    dtype, device = q.dtype, q.device
    work = work_dtype(device, dtype)
    threshold = torch.finfo(dtype).eps ** 0.5
    basis = q.new_empty(num_probes, window, n)  # rows are written before they are read
    basis[:, 0] = q
    alpha = torch.zeros(num_probes, steps, dtype=work, device=device)
    beta = torch.zeros(num_probes, steps, dtype=work, device=device)
    length = torch.full((num_probes,), steps, dtype=torch.long)
    active = list(range(num_probes))
    scale = 0.0
    for j in range(steps):
        slot, following = j % window, (j + 1) % window
        # The products go into the slots of the next vectors (the oldest, dropped next),
        # where the probes' vectors are views: one probe, or all.
        if window == 1:  # (one step: the product goes nowhere)
            request = basis[active, slot].T
        elif len(active) == 1:
            request = basis[active[0], slot, :, None], basis[active[0], following, :, None]
        elif len(active) == num_probes:
            request = basis[:, slot].T, basis[:, following].T
        else:
            request = basis[active, slot].T
        products = yield request
        # (the slots written, or the operator's rows as they are: no copy)
        rows = products.T if isinstance(request, tuple) else products.T.contiguous()
        last = j == steps - 1
        for p, w in zip(list(active), rows):
            a = float(inner_rows(basis[p, slot, None], w[None]))
            alpha[p, j] = a
            if last:
                continue
            previous = (basis[p, (j - 1) % window], float(beta[p, j - 1])) if j else None
            norm, correction = _next_vector(basis[p], w, j, window, a, previous)
            alpha[p, j] += correction
            scale = max(scale, abs(a), norm)
            if norm <= threshold * scale:  # the Krylov space is exhausted: exact from here
                length[p] = j + 1
                active.remove(p)
            else:
                beta[p, j] = norm
        if not active:
            break
    nodes = torch.zeros(num_probes, steps, dtype=work, device=device)
    weights = torch.zeros_like(nodes)
    for p in range(num_probes):
        size = int(length[p])
        tridiagonal = (
            torch.diag(alpha[p, :size])
            + torch.diag(beta[p, : size - 1], 1)
            + torch.diag(beta[p, : size - 1], -1)
        )
        theta, Y = torch.linalg.eigh(tridiagonal)
        pad = steps - size  # (in front, with weight zero: the nodes stay ascending)
        nodes[p, pad:] = theta
        nodes[p, :pad] = theta[0]
        weights[p, pad:] = Y[0] ** 2
    return nodes.to(dtype), weights.to(dtype)


def _next_vector(
    basis: Tensor,
    w: Tensor,
    j: int,
    window: int,
    alpha: float,
    previous: tuple[Tensor, float] | None,
) -> tuple[float, float]:
    r"""Write a probe's next Lanczos vector into slot ``(j + 1) % window`` of its ``basis``.

    The three-term recurrence :math:`w - \alpha q_j - \beta_{j-1} q_{j-1}` first, then the
    other kept vectors taken out and the result made unit (:func:`_project_out`). The
    coefficients beyond the recurrence are rounding errors; the one of :math:`q_j` corrects
    :math:`\alpha`.

    Returns:
        The norm :math:`\beta_j` before the division, and the correction of :math:`\alpha`.
    """
    slot, following = j % window, (j + 1) % window
    new = basis[following]
    torch.add(w, basis[slot], alpha=-alpha, out=new)
    if previous is not None:
        new.add_(previous[0], alpha=-previous[1])
    kept = min(j + 1, window)  # slots written so far (a full window drops the one replaced)
    pieces = [(0, following), (following + 1, kept)] if kept == window else [(0, kept)]
    passes, size = _project_out(new[None], [basis[begin:end] for begin, end in pieces])
    correction = 0.0
    for coefficients in passes:
        for (begin, end), c in zip(pieces, coefficients):
            if begin <= slot < end:
                correction += float(c[slot - begin, 0])
    return float(size) ** 0.5, correction
