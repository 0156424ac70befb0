r"""The trace and diagonal estimators, written as product-requesting generators.

Each generator yields blocks of vectors and receives their products with the symmetric
operator (:func:`._driver.run`); its return value is the estimate and its standard error.
The estimators and their references are described in :mod:`torch_secorder.analysis.trace`
and :mod:`torch_secorder.analysis.diagonal_estimate`, which hold the public functions.
"""

import math
import warnings
from collections.abc import Generator

import torch
from torch import Tensor

from torch_secorder._checks import format_bytes
from torch_secorder.analysis._driver import MakeSteps, Steps
from torch_secorder.analysis._memory import (
    check_room,
    current,
    kept_vectors,
    max_columns,
    refuse,
)
from torch_secorder.analysis._rows import combine_rows, dot_rows, inner_rows, work_dtype
from torch_secorder.analysis._sampling import make_generator, rademacher, rademacher_columns
from torch_secorder.core._progress import outside_stacklevel


def estimator_steps(
    method: str,
    n: int,
    num_matvecs: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
    *,
    span: int | None = None,
    diagonal: bool = False,
) -> Steps:
    """The trace (or, with ``diagonal``, diagonal) estimator ``method`` as a generator.

    It returns the estimate and its standard error. ``span`` (default ``n``) is the size of
    the operator whose block of size ``n`` the estimator sees: chunks of probes are sized for
    it, so that the estimators of all blocks of one operator together hold what one estimator
    of the whole operator would.
    """
    gen = make_generator(generator)
    if method == "exact":
        return exact(n, dtype, device, span=span, diagonal=diagonal)
    if diagonal:
        if method == "hutchinson":
            return hutchinson_diagonal(n, num_matvecs, dtype, device, gen, span=span)
        return xdiag(n, num_matvecs, dtype, device, gen)
    if method == "hutchinson":
        return hutchinson(n, num_matvecs, dtype, device, gen, span=span)
    if method == "hutch++":
        return hutch_plus_plus(n, num_matvecs, dtype, device, gen, span=span)
    return xtrace(n, num_matvecs, dtype, device, gen)


def _mean_and_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    count = samples.numel()
    if count < 2:
        return samples.mean(), samples.new_tensor(math.nan)
    return samples.mean(), samples.std() / math.sqrt(count)


def estimator_maker(method: str, num_matvecs: int, *, diagonal: bool = False) -> MakeSteps:
    """The estimator ``method`` as ``make_steps`` of :func:`._groups.run_model` (no gradient)."""

    def make_steps(
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        gen: torch.Generator,
        span: int,
        _: object,
        __: object,
    ) -> Steps:
        return estimator_steps(
            method, n, num_matvecs, dtype, device, gen, span=span, diagonal=diagonal
        )

    return make_steps


def hutchinson(
    n: int,
    num_matvecs: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    *,
    span: int | None = None,
) -> Steps:
    r"""Hutchinson's estimator with ``num_matvecs`` Rademacher probes, in memory-bounded chunks.

    A chunk holds :func:`max_columns` probes of the operator's size ``span`` (default ``n``).
    """
    check_room("method='hutchinson'", 0, span or n, dtype, device)
    chunk = max_columns(span or n, dtype, device)
    samples = []
    remaining = num_matvecs
    while remaining > 0:
        count = min(chunk, remaining)
        Z = rademacher_columns(gen, n, count, dtype, device)
        HZ = yield Z
        samples.append((Z * HZ).sum(dim=0))
        remaining -= count
    return _mean_and_stderr(torch.cat(samples))


def hutch_plus_plus(
    n: int,
    num_matvecs: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    *,
    span: int | None = None,
) -> Steps:
    r"""Hutch++ with :math:`s = \lfloor m/3 \rfloor` sketch vectors and :math:`m - 2s` probes.

    The sketch is smaller where :math:`2s` vectors would not fit the memory budget
    (:mod:`._memory`); the products saved go to probes.

    When the sketch spans the whole space (:math:`s \ge n`) the trace
    :math:`\operatorname{tr}(Q^\top H Q)` is exact and no probes are spent. Every block goes
    out in chunks of :func:`max_columns` vectors of the operator's size ``span`` (default
    ``n``; :math:`Q`'s vectors and the first probes share one) and its products are reduced as
    they come: it holds the :math:`s` sketch products (made orthonormal in place,
    :func:`orthonormal_rows`) plus a chunk of requests and one of products (the operator
    writes them there), not all :math:`m` vectors with their products.
    """
    chunk = max_columns(span or n, dtype, device)
    sketch = min(num_matvecs // 3, n, kept_vectors(span or n, dtype, device) // 2)
    if sketch < 1:
        raise refuse("method='hutch++'", 2, span or n, dtype, device)
    # Vectors are kept as rows, the layout in which the operator writes its products and
    # LAPACK reads a matrix (column-major): no transposing copy of n-long vectors. Requests
    # are written into one buffer of a chunk's rows (new memory of this size costs about as
    # much to touch first as the arithmetic on it).
    block = torch.empty(
        min(chunk, max(sketch, num_matvecs - sketch)), n, dtype=dtype, device=device
    )
    HS = torch.empty(sketch, n, dtype=dtype, device=device)
    for start in range(0, sketch, chunk):
        stop = min(start + chunk, sketch)
        probes = rademacher(gen, (stop - start, n), dtype, device, out=block[: stop - start])
        yield probes.T, HS[start:stop].T  # the products straight into their rows
    Q = orthonormal_rows(HS)  # (in HS's memory, unless Householder QR took over)
    del HS
    # Q's rows, then the probes (drawn and deflated as they go out), a chunk at a time
    low_rank = torch.zeros((), dtype=work_dtype(device, dtype), device=device)  # (dot_rows')
    samples: list[Tensor] = []
    done, left = 0, 0 if sketch == n else num_matvecs - 2 * sketch
    # over several blocks, their products in one buffer written again (a single block's
    # products go to new memory: a buffer held for the whole phase raised the peak)
    results = torch.empty_like(block) if sketch + left > chunk else None
    while done < sketch or left > 0:
        width = min(chunk, sketch - done)
        count = min(chunk - width, left)
        request = Q[done : done + width]
        if count:
            request = block[: width + count]
            request[:width] = Q[done : done + width]
            G = rademacher(gen, (count, n), dtype, device, out=request[width:])
            G.addmm_(G @ Q.T, Q, alpha=-1)  # G - Q Q^T G, as rows
        ask = request.T if results is None else (request.T, results[: width + count].T)
        products = (yield ask).T
        low_rank = low_rank + dot_rows(request[:width], products[:width]).sum()
        if count:
            samples.append(dot_rows(request[width:], products[width:]))
        done, left = done + width, left - count
    if not samples:
        return low_rank.to(dtype), torch.zeros((), dtype=dtype, device=device)
    mean, stderr = _mean_and_stderr(torch.cat(samples))
    return (low_rank + mean).to(dtype), stderr.to(dtype)


XDIAG_SLICE = 2**20
"""Entries (rows times test vectors) of each slice of XDiag's estimates and jackknife terms."""

GRAM_SLICE = 2**15
"""Entries of the operator's size per float64 partial product of :func:`orthonormal_rows`."""


def orthonormal_rows(S: Tensor) -> Tensor:
    r"""Make the rows of ``S``, ``(s, n)`` with :math:`s \le n`, orthonormal, spanning the same.

    In place, and returned. Cholesky QR twice (Yamamoto et al. 2015): :math:`S \gets L^{-1}S`
    with :math:`LL^\top` the Cholesky factorisation of the Gram matrix :math:`SS^\top`,
    summed in float64 a slice of :data:`GRAM_SLICE` entries at a time, then the same again,
    the new rows' Gram matrix a float64 sum of products in their own precision
    (:func:`~._rows.inner_rows`; near the identity, its rounding errors are those of the
    result, at a third of the time): two products of an :math:`s \times n` matrix with its
    transpose and two with :math:`L^{-1}` (a slice at a time, :func:`~._rows.combine_rows`),
    where Householder QR takes several times as long on long rows (a ResNet-18's sketch of
    33 × 11.2M: 9 s against 2.7 s) and works on a copy. The first pass leaves the rows
    orthonormal to about the rounding unit times the condition number of ``S``, the second to
    a small multiple of the rounding unit. Where a Cholesky factorisation fails or the first
    pass's Gram matrix is off the identity by more than 1/2 (``S`` rank-deficient or
    conditioned beyond about :math:`10^7` in float32), Householder QR of the rows as they are
    (spanning what ``S`` spans) instead; that result is a new tensor.

    References:
        Yamamoto, Y., Nakatsukasa, Y., Yanagisawa, Y. and Fukaya, T. (2015). Roundoff error
        analysis of the CholeskyQR2 algorithm. Electron. Trans. Numer. Anal. 44, 306-326.
    """
    for second in (False, True):
        gram = inner_rows(S, S) if second else _gram64(S)
        identity = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        off = second and float((gram - identity).abs().max()) > 0.5
        L, info = torch.linalg.cholesky_ex(gram)
        if off or int(info):
            return torch.linalg.qr(S.T.to(_factored(S.dtype)))[0].T.to(S.dtype)
        inverse = torch.linalg.solve_triangular(L, identity, upper=False)
        combine_rows(S, inverse.T.to(S.dtype), len(S))
    return S


def _gram64(S: Tensor) -> Tensor:
    """``S S^T`` in float64 (where the device has it), summed a slice of columns at a time.

    Each slice is converted before its product: the float32 partial products of
    :func:`~._rows.inner_rows` (errors near :math:`10^{-6}` relative) would limit Cholesky QR
    to sketches conditioned below about :math:`10^3`.
    """
    work = torch.float32 if S.device.type == "mps" else torch.float64
    gram = S.new_zeros(len(S), len(S), dtype=work)
    buffer = S.new_empty(len(S), min(GRAM_SLICE, S.shape[1]), dtype=work)
    for start in range(0, S.shape[1], GRAM_SLICE):
        part = S[:, start : start + GRAM_SLICE]
        if part.dtype != work:
            part = buffer[:, : part.shape[1]].copy_(part)
        gram.addmm_(part, part.T)
    return gram


def xtrace(
    n: int, num_matvecs: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> Steps:
    r"""XTrace with :math:`s = \lfloor m/2 \rfloor` Rademacher test vectors.

    Fewer where the five blocks of :math:`s` vectors it holds would not fit the memory budget.

    With :math:`Y = H\Omega = QR`, :math:`Z = HQ`, the leave-one-out projector is
    :math:`Q_{(i)}Q_{(i)}^\top = Q(I - s_is_i^\top)Q^\top` with :math:`s_i` the normalised
    :math:`i`-th column of :math:`R^{-\top}`. Writing :math:`H_Q = Q^\top Z`,
    :math:`W = Q^\top\Omega`, :math:`u_i = w_i - s_i(s_i^\top w_i)`, each exchangeable
    estimate is

    .. math::
        t_i = \operatorname{tr} H_Q - s_i^\top H_Q s_i + \omega_i^\top y_i
              - (Z^\top\omega_i)^\top u_i - u_i^\top R e_i + u_i^\top H_Q u_i .

    The standard error is the jackknife's over the test vectors (:func:`_jackknife`), each
    :math:`t_i` without :math:`\omega_k` too from the same factorisation
    (:func:`_second_directions`). When the sketch spans the whole space (:math:`s \ge n`) the
    trace is exact.
    """
    size = _exchangeable_size("xtrace", num_matvecs, n, dtype, device)
    Omega = rademacher_columns(gen, n, size, dtype, device)
    Omega, Y, Q, R, Z = yield from _sketched(Omega, dtype)
    HQ = Q.T @ Z
    if size == n:
        value = HQ.trace()
        return value.to(dtype), torch.zeros((), dtype=dtype, device=device)
    S = _left_out_directions(R)
    W = Q.T @ Omega
    U = W - S * (S * W).sum(dim=0)
    ZR = Z.T @ Omega + R  # (its columns (Z^T omega_i + r_i): the estimates' linear terms)
    estimates = (
        HQ.trace()
        - (S * (HQ @ S)).sum(dim=0)
        + (Omega * Y).sum(dim=0)
        - (ZR * U).sum(dim=0)
        + (U * (HQ @ U)).sum(dim=0)
    )
    mean = estimates.mean()
    if size < 2:
        return mean.to(dtype), torch.full_like(mean, math.nan, dtype=dtype)
    # t_i without the test vector k too: the projector also leaves out b, the normalised
    # part of s_k orthogonal to s_i, so (with c = b^T u_i)
    # t_i^(-k) = t_i - b^T H_Q b + c b^T (Z^T omega_i + r_i) - 2c b^T H_Q u_i + c^2 b^T H_Q b
    G, root, keep = _second_directions(S)
    M = S.T @ HQ @ S
    diagonal = M.diagonal()
    bHb = (diagonal[:, None] - 2 * G * M + G**2 * diagonal) / root**2
    c = (S.T @ U) / root  # (s_i^T u_i = 0)
    bZR = (S.T @ ZR - G * (S * ZR).sum(dim=0)) / root
    HU = HQ @ U
    bHU = (S.T @ HU - G * (S * HU).sum(dim=0)) / root
    two_out = estimates + torch.where(keep, c * bZR - 2 * c * bHU + (c**2 - 1) * bHb, 0)
    # row k: the estimates without test vector k; their means' deviations from the mean
    others = ~torch.eye(size, dtype=torch.bool, device=two_out.device)
    deviations = (two_out * others).sum(dim=1) / (size - 1) - mean
    return mean.to(dtype), _jackknife(deviations).to(dtype)


def _exchangeable_size(
    method: str, num_matvecs: int, n: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Test vectors of XTrace or XDiag: half the budget, fewer where five blocks do not fit.

    Warns where the memory budget leaves fewer than the products asked for unused.

    Raises:
        ValueError: Where not even five vectors fit the budget.
    """
    kept = kept_vectors(n, dtype, device) // 5
    if kept < 1:
        raise refuse(f"method={method!r}", 5, n, dtype, device)
    size = min(num_matvecs // 2, n, kept)
    if size < min(num_matvecs // 2, n):
        fname, max_bytes = current(device)
        other = "'hutch++' (two blocks)" if method == "xtrace" else "'hutchinson'"
        warnings.warn(
            f"{fname}: max_bytes={format_bytes(max_bytes)} holds five blocks of {size} vectors "
            f"of P={n:,} entries, so method={method!r} takes {2 * size} of num_matvecs="
            f"{num_matvecs} products; raise max_bytes, or take method={other}.",
            RuntimeWarning,
            stacklevel=outside_stacklevel(),
        )
    return size


def exact(
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    span: int | None = None,
    diagonal: bool = False,
) -> Steps:
    """The exact trace (or diagonal) from products with unit vectors, in memory-bounded chunks.

    A chunk holds :func:`max_columns` vectors of the operator's size ``span`` (default ``n``)
    besides the result's ``n`` entries (the public functions check the room for both:
    :func:`~._memory.check_diagonal_room`).
    """
    chunk = max_columns(span or n, dtype, device)
    entries = torch.zeros(n, dtype=dtype, device=device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        index = torch.arange(stop - start, device=device)
        E = torch.zeros(n, stop - start, dtype=dtype, device=device)
        E[start + index, index] = 1
        HE = yield E
        entries[start:stop] = HE[start + index, index]
    result = entries if diagonal else entries.sum()
    return result, torch.zeros_like(result)


def _factored(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which QR factorises matrices of ``dtype``: float32 for 16-bit floats.

    LAPACK (and cuSOLVER) have no half-precision QR.
    """
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def _sketched(
    Omega: Tensor, dtype: torch.dtype
) -> Generator[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    r"""Ask for :math:`Y = H\Omega`, factorise :math:`Y = QR`, ask for :math:`Z = HQ`.

    The factorisation runs in :func:`_factored` precision and ``Q`` goes to the operator
    rounded to ``dtype``: the estimates use it as rounded, so that ``Q`` and its products are
    consistent.

    Returns:
        ``(Omega, Y, Q, R, Z)``, all in the factorisation's dtype.
    """
    Y = (yield Omega).to(_factored(dtype))
    Q, R = torch.linalg.qr(Y)
    Q = Q.to(dtype)
    Z = yield Q
    return Omega.to(Y.dtype), Y, Q.to(Y.dtype), R, Z.to(Y.dtype)


def _left_out_directions(R: Tensor) -> Tensor:
    r"""The normalised columns :math:`s_i` of :math:`R^{-\top}`, for leave-one-out projectors.

    :math:`Q_{(i)}Q_{(i)}^\top = Q(I - s_is_i^\top)Q^\top` projects onto the sketch without its
    :math:`i`-th vector. An exactly singular sketch (a low-rank :math:`H`) has tiny pivots in
    :math:`R`; they are raised to :math:`\varepsilon \max_j |R_{jj}|` with their sign, which
    makes :math:`s_i` the missing direction (to 1 where :math:`R = 0`: a zero :math:`H`).
    """
    diagonal = R.diagonal()
    finfo = torch.finfo(R.dtype)
    largest = float(diagonal.abs().max())
    tiny = max(finfo.eps * largest, finfo.tiny) if largest > 0 else 1.0
    pivots = torch.where(diagonal.abs() < tiny, torch.where(diagonal < 0, -tiny, tiny), diagonal)
    guarded = R - torch.diag(diagonal) + torch.diag(pivots)
    identity = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    S = torch.linalg.solve_triangular(guarded.T, identity, upper=False)
    return S / S.norm(dim=0)


def _second_directions(S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""For leaving out test vectors :math:`i` and :math:`k`: :math:`b_{ki} = (s_k - g s_i)/r`.

    With :math:`g = s_k^\top s_i` and :math:`r = \sqrt{1 - g^2}`, :math:`b_{ki}` completes
    :math:`s_i` to an orthonormal basis of what the projector without both leaves out.

    Returns:
        ``(G, root, keep)``: :math:`g` and :math:`r` for every ``(k, i)``, and where
        :math:`b_{ki}` exists (:math:`k \ne i`, :math:`s_k` not parallel to :math:`s_i`;
        elsewhere ``root`` is 1 and the terms of :math:`b` are dropped).
    """
    G = S.T @ S
    squared = 1 - G**2
    # (g, and with it r^2, is computed to about eps: below 16 eps, s_k and s_i are taken as
    # parallel; above, b's terms are accurate to about eps / r^2)
    keep = squared > 16 * torch.finfo(S.dtype).eps
    keep.fill_diagonal_(False)
    return G, torch.where(keep, squared, 1).sqrt(), keep


def _jackknife(deviations: Tensor) -> Tensor:
    r"""The jackknife's standard error from the deviations of the leave-one-out estimates.

    :math:`\sqrt{(s-1)/s \sum_k (\bar t_{(k)} - \bar t_{(\cdot)})^2}` along the last
    dimension, the deviations taken from the estimate :math:`\bar t` (small numbers: no
    cancellation in the sum of squares).
    """
    size = deviations.shape[-1]
    spread = (deviations**2).sum(dim=-1) - deviations.sum(dim=-1) ** 2 / size
    return (spread.clamp(min=0) * (size - 1) / size).sqrt()


def _stderr(m2: Tensor, count: int) -> Tensor:
    if count < 2:
        return torch.full_like(m2, math.nan)
    return (m2 / (count - 1)).sqrt() / math.sqrt(count)


def hutchinson_diagonal(
    n: int,
    num_matvecs: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    *,
    span: int | None = None,
) -> Steps:
    """Hutchinson's diagonal estimator, in memory-bounded chunks (Chan's running variance).

    A chunk holds :func:`max_columns` probes of the operator's size ``span`` (default ``n``)
    besides the running mean and sum of squares (``n`` entries each); each chunk's samples are
    formed in its probes' memory.
    """
    check_room("method='hutchinson'", 2, span or n, dtype, device)
    chunk = max_columns(span or n, dtype, device)
    mean = torch.zeros(n, dtype=dtype, device=device)
    m2 = torch.zeros_like(mean)
    count = 0
    while count < num_matvecs:
        size = min(chunk, num_matvecs - count)
        Z = rademacher_columns(gen, n, size, dtype, device)
        samples = Z.mul_((yield Z))
        chunk_mean = samples.mean(dim=1)
        delta = chunk_mean - mean
        total = count + size
        squares = samples.sub_(chunk_mean[:, None]).square_().sum(dim=1)
        m2 = m2 + squares + delta**2 * count * size / total
        mean = mean + delta * size / total
        count = total
    return mean, _stderr(m2, count)


def xdiag(
    n: int, num_matvecs: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> Steps:
    r"""XDiag with :math:`s = \lfloor m/2 \rfloor` Rademacher test vectors.

    Fewer where the five blocks of :math:`s` vectors it holds would not fit the memory budget.

    With :math:`Y = H\Omega = QR`, :math:`Z = HQ` and :math:`s_i` the normalised columns of
    :math:`R^{-\top}`, each exchangeable estimate is

    .. math::
        d_i = \operatorname{diag}(QZ^\top) - (Qs_i) \odot (Zs_i)
              + \omega_i \odot \big(y_i - Q(r_i - s_i\, s_i^\top r_i)\big),

    with :math:`r_i = Re_i = Q^\top y_i`; the standard errors are the jackknife's, as for
    :func:`xtrace`, all computed :data:`XDIAG_SLICE` entries at a time (no temporary of the
    sketch's size). When the sketch spans the space (:math:`s \ge n`) the diagonal
    :math:`\operatorname{diag}(QZ^\top)` is exact.
    """
    size = _exchangeable_size("xdiag", num_matvecs, n, dtype, device)
    Omega = rademacher_columns(gen, n, size, dtype, device)
    Omega, Y, Q, R, Z = yield from _sketched(Omega, dtype)
    if size == n:
        return (Q * Z).sum(dim=1).to(dtype), torch.zeros(n, dtype=dtype, device=device)
    S = _left_out_directions(R)
    deflated = R - S * (S * R).sum(dim=0)
    # The jackknife's terms (see xtrace): without test vector k too, estimate i loses
    # (Q b) * (Z b) and gains e omega_i * (Q b), e = b^T r_i, where b = (s_k - g s_i) / r.
    G, root, keep = _second_directions(S)
    w = torch.where(keep, root**-2, 0)
    f = torch.where(keep, (S.T @ R - G * (S * R).sum(dim=0)) / root**2, 0)
    mean = torch.empty(n, dtype=Y.dtype, device=device)
    stderr = torch.empty_like(mean)
    step = max(1, XDIAG_SLICE // size)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        QS, ZS, omega = Q[rows] @ S, Z[rows] @ S, Omega[rows]
        left_out = QS * ZS
        estimates = (Q[rows] * Z[rows]).sum(dim=1, keepdim=True) - left_out
        estimates += omega * (Y[rows] - Q[rows] @ deflated)
        mean[rows] = estimates.mean(dim=1)
        if size < 2:
            continue
        changes = (
            left_out * w.sum(dim=1)
            - QS * (ZS @ (w * G).T)
            - (QS @ (w * G).T) * ZS
            + left_out @ (w * G**2).T
            - QS * (omega @ f.T)
            + (omega * QS) @ (f * G).T
        )
        deviations = (mean[rows, None] - estimates - changes) / (size - 1)
        stderr[rows] = _jackknife(deviations)
    if size < 2:
        stderr.fill_(math.nan)
    return mean.to(dtype), stderr.to(dtype)
