r"""Curvature during training: the sharpness every few optimizer steps, warm-started.

:class:`CurvatureMonitor` runs beside a training loop. Every ``every`` optimizer steps (a
*check*) it computes, on a fixed batch or a fixed data set, the top eigenvalues of the
Hessian :math:`H` of the mean loss (the operator of :meth:`HessianOperator.from_model
<torch_secorder.HessianOperator.from_model>`) by thick-restart Lanczos, and optionally the
top eigenvalues of each group's diagonal block :math:`H_{gg}` (``groups=``), the trace, and,
given the optimizer, the top eigenvalue of the preconditioned Hessian :math:`P^{-1}H` with
the optimizer's stability threshold (:mod:`._optimizers`: :math:`2/\eta` for gradient
descent, :math:`38/\eta` for Adam with :math:`\beta_1 = 0.9`).

**Warm starts.** Between two checks the weights move a little, and so do the top
eigenvectors. Each check's Lanczos starts from the previous check's eigenvectors (their
normalised sum, :func:`~torch_secorder.analysis._lanczos.thick_restart_lanczos`'s ``start``)
plus a random unit vector, instead of a random vector alone, so a check costs a fraction of
the products of a cold start for the same residual tolerance, and an eigenvalue that overtook
the previous top one is still found; every check reports its products. The first check
starts cold.

**No trace on training.** Every forward pass runs on copies of the buffers (BatchNorm
statistics do not count it) under a forked RNG with a fixed seed per batch; products come from
:func:`torch.autograd.grad`, so ``.grad`` is untouched; the optimizer's state is only read. A
run with the monitor and one without give bitwise-identical weights.

References:
    Cohen, J. M., Kaur, S., Li, Y., Kolter, J. Z. and Talwalkar, A. (2021). Gradient descent on
    neural networks typically occurs at the edge of stability. ICLR 2021. arXiv:2103.00065.

    Cohen, J. M., Ghorbani, B., Krishnan, S., Agarwal, N., Medapati, S., Badura, M., Suo, D.,
    Cardoze, D., Nado, Z., Dahl, G. E. and Gilmer, J. (2022). Adaptive gradient methods at the
    edge of stability. arXiv:2207.14484.

    Wu, K. and Simon, H. (2000). Thick-restart Lanczos method for large symmetric eigenvalue
    problems. SIAM J. Matrix Anal. Appl. 22(2), 602-616.
    https://doi.org/10.1137/S0895479898334605
"""

import time
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder._checks import (
    check_bool,
    check_estimator,
    check_generator,
    check_int,
    check_positive,
)
from torch_secorder._types import ParamSelection
from torch_secorder.analysis._driver import Problem, run
from torch_secorder.analysis._eigensolvers import check_k, default_max_matvecs, warn_not_converged
from torch_secorder.analysis._groups import resolve_groups, rows_of
from torch_secorder.analysis._lanczos import RitzPairs, thick_restart_lanczos
from torch_secorder.analysis._optimizers import (
    PreconditionedOperator,
    Stability,
    check_optimizer,
    stability,
)
from torch_secorder.analysis._sampling import make_generator, spawn
from torch_secorder.analysis.history import CurvatureHistory, CurvatureRecord
from torch_secorder.analysis.trace import NEEDS as TRACE_NEEDS
from torch_secorder.analysis.trace import model_hessian_trace
from torch_secorder.core._progress import require_tqdm
from torch_secorder.core.operator import HessianOperator, model_operator

__all__ = ["CurvatureMonitor"]

FNAME = "CurvatureMonitor"


class CurvatureMonitor:
    r"""Record the Hessian's top eigenvalues every ``every`` optimizer steps of a training loop.

    Call :meth:`step` after every ``optimizer.step()``; every ``every``-th call runs a check,
    and :meth:`check` runs one at once (before training, for instance). A check computes, on
    ``data``, the ``k`` largest eigenvalues of the Hessian :math:`H` of the mean loss (the
    sharpness :math:`\lambda_{\max}(H)` first), warm-started from the previous check's
    eigenvectors, and adds a :class:`~torch_secorder.CurvatureRecord` per value to
    :attr:`history`:

    * ``"eigenvalue"``: of :math:`H`, and with ``groups`` of each group's block
      :math:`H_{gg}` (all computed together, one batched product per step);
    * ``"preconditioned_eigenvalue"`` and ``"threshold"``, given an ``optimizer``: the largest
      eigenvalues of :math:`P^{-1}H` for the diagonal preconditioner :math:`P` of ``Adam``,
      ``AdamW``, ``RMSprop`` or ``Adagrad`` read from the optimizer's state (computed as
      those of the symmetric :math:`P^{-1/2} H P^{-1/2}`), and the optimizer's stability
      threshold at its current learning rate :math:`\eta`: :math:`2/\eta` for ``SGD``,
      :math:`(2 + 2\beta)/\eta` with heavy-ball momentum :math:`\beta`,
      :math:`(2 + 2\beta)/(\eta(1 + 2\beta))` with Nesterov's,
      :math:`(2 + 2\beta_1)/(\eta(1 - \beta_1))` for Adam (:math:`38/\eta` at
      :math:`\beta_1 = 0.9`), :math:`(2 + 2\mu)/\eta` for RMSprop with momentum :math:`\mu`
      (:math:`2/\eta` without), :math:`2/\eta_t` for Adagrad with its decayed rate
      :math:`\eta_t` (an infinite threshold at a learning rate of 0). For ``SGD`` the
      threshold applies to :math:`\lambda_{\max}(H)` (:math:`P = I`), for the others to
      :math:`\lambda_{\max}(P^{-1}H)`. Where :math:`P` comes from and each formula's
      derivation are in :mod:`torch_secorder.analysis._optimizers`.
    * ``"trace"`` with ``trace=True``: :math:`\operatorname{tr}(H)` (and of each group's
      block), by :func:`~torch_secorder.model_hessian_trace`.

    ``data`` is the data set whose Hessian is monitored, the same at every check: one
    ``(inputs, targets)`` batch (the full batch of full-batch training, or a fixed batch of a
    stochastic one) or a re-iterable collection of batches in a fixed order (a list, a
    :class:`~torch.utils.data.DataLoader` without shuffling), e.g. a fixed subset of the
    training set as the edge-of-stability papers use. The model's current train/eval mode is
    used and left as found.

    Each check costs its Hessian-vector products (one pass over ``data`` each, batched across
    groups) and reports them with its wall-clock time in every record; :attr:`num_matvecs`
    and :attr:`seconds` add them up, and ``progress=True`` shows a bar over each check's
    products. Training is left bitwise unchanged: the monitor's forward passes run on copies of
    the buffers under a forked RNG, it never writes ``.grad``, and it only reads the
    optimizer's state.

    Args:
        model: The model being trained.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        data: One ``(inputs, targets)`` batch or a re-iterable collection of batches in a fixed
            order.
        every: Check every ``every`` calls of :meth:`step`.
        k: Eigenvalues per check (of :math:`H`, of each group and of :math:`P^{-1}H`), at most
            the size of the selection and of each group.
        params: Parameter selection by names or glob patterns (``None``: all trainable, fixed
            when the monitor is made).
        groups: ``None``, ``"module"``, ``"parameter"`` or a dict name -> parameter
            names/patterns, as for :func:`~torch_secorder.model_top_eigenvalues`: each group's
            block is monitored besides the whole selection.
        optimizer: The training's optimizer (``SGD``, ``Adam``, ``AdamW``, ``RMSprop`` or
            ``Adagrad``), read at every check, or ``None`` (no threshold).
        trace: Also record the trace (and each group's).
        trace_method: ``method`` of :func:`~torch_secorder.model_hessian_trace` (default
            ``"auto"``: exact where that costs at most ``trace_num_matvecs`` products).
        trace_num_matvecs: Its budget per check and group.
        tol: Relative residual tolerance of the eigenvalues, as for
            :func:`~torch_secorder.top_eigenvalues`.
        max_matvecs: Budget of each eigenvalue computation per check; ``None`` means
            :math:`100k + 200`.
        warm_start: Start each check's Lanczos from the previous check's eigenvectors;
            ``False`` starts every check from a random vector.
        generator: Source of the random starting vectors (and trace probes); ``None`` uses a
            private generator with a fixed seed at every check; the global RNG is never
            touched.
        seed: Batch ``b`` runs under RNG seed ``seed + b`` (dropout masks), as for
            :meth:`HessianOperator.from_model <torch_secorder.HessianOperator.from_model>`.
        distributed: Sum products over processes; ``None`` does so when
            :mod:`torch.distributed` is initialized (every process must then check at the
            same steps).
        progress: Show a progress bar over each check's products (needs ``tqdm``).

    Attributes:
        history: The :class:`~torch_secorder.CurvatureHistory` of all checks.
        steps: Calls of :meth:`step` so far (optimizer steps).
        seconds: Wall-clock seconds of all checks.

    Raises:
        TypeError: If an argument has the wrong type, or the optimizer is not supported.
        ValueError: If an option is out of range, ``k`` exceeds the selection or a group, the
            selection or a group matches nothing, the data are empty or shuffled, a monitored
            parameter is not in the optimizer, or the optimizer's groups holding them differ
            in a hyperparameter of the threshold.

    Warns:
        RuntimeWarning: If a check's eigenvalues did not converge within ``max_matvecs`` (the
            record's ``converged`` is then ``False``).

    Example:
        >>> import torch
        >>> from torch_secorder import CurvatureMonitor
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> monitor = CurvatureMonitor(model, torch.nn.MSELoss(), (x, y), every=2,
        ...                            optimizer=optimizer)
        >>> for _ in range(4):
        ...     optimizer.zero_grad()
        ...     torch.nn.MSELoss()(model(x), y).backward()
        ...     optimizer.step()
        ...     records = monitor.step()
        >>> [(r.step, r.quantity, round(r.value, 8)) for r in records]  # H = diag(1, 4)
        [(4, 'eigenvalue', 4.0), (4, 'threshold', 20.0)]
        >>> monitor.history.series("eigenvalue")
        ([2, 4], [4.0, 4.0])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        every: int = 1,
        k: int = 1,
        params: ParamSelection = None,
        groups: object = None,
        optimizer: torch.optim.Optimizer | None = None,
        trace: bool = False,
        trace_method: str = "auto",
        trace_num_matvecs: int = 100,
        tol: float = 1e-4,
        max_matvecs: int | None = None,
        warm_start: bool = True,
        generator: torch.Generator | None = None,
        seed: int = 0,
        distributed: bool | None = None,
        progress: bool = False,
    ) -> None:
        every = check_int(FNAME, "every", every, 1)
        k = check_int(FNAME, "k", k, 1)
        tol = check_positive(FNAME, "tol", tol)
        budget = default_max_matvecs("lanczos", k, "largest")
        if max_matvecs is not None:
            budget = check_int(
                FNAME, "max_matvecs", max_matvecs, k, f"Lanczos needs k={k} products"
            )
        for name, value in (("trace", trace), ("warm_start", warm_start), ("progress", progress)):
            check_bool(FNAME, name, value)
        check_generator(FNAME, generator)
        if trace:
            trace_num_matvecs = check_estimator(
                FNAME, trace_method, trace_num_matvecs, generator, TRACE_NEEDS, "trace_"
            )
        if progress:
            require_tqdm(FNAME)
        operator = model_operator(
            FNAME, model, loss_fn, data, params=params, seed=seed, distributed=distributed
        )  # checks the model, loss_fn, data, params, seed and distributed; runs nothing
        names: list[str] = operator.names  # type: ignore[assignment]
        tensors = operator.params
        check_k(FNAME, k, operator.shape[0], "P")
        resolved = resolve_groups(FNAME, model, names, tensors, groups)
        for name, indices in (resolved or {}).items():
            size = sum(tensors[i].numel() for i in indices)
            check_k(FNAME, k, size, f"the size of group {name!r}")
        if optimizer is not None:
            check_optimizer(FNAME, optimizer, tensors, names)
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every, self.k, self.tol, self.max_matvecs = every, k, tol, budget
        self.names, self.groups, self.group_spec = names, resolved, groups
        self.optimizer = optimizer
        self.trace, self.trace_method, self.trace_num_matvecs = (
            trace,
            trace_method,
            trace_num_matvecs,
        )
        self.warm_start, self.generator = warm_start, generator
        self.seed, self.distributed, self.progress = seed, distributed, progress
        self.history = CurvatureHistory()
        self.steps = 0
        self.seconds = 0.0
        self._starts: dict[tuple[str, str | None], Tensor] = {}

    @property
    def num_matvecs(self) -> int:
        """Hessian-vector products of all checks."""
        return self.history.num_matvecs

    def __repr__(self) -> str:
        return (
            f"CurvatureMonitor(every={self.every}, k={self.k}, steps={self.steps}, "
            f"checks={len({r.step for r in self.history})}, num_matvecs={self.num_matvecs})"
        )

    def step(self) -> list[CurvatureRecord]:
        """Count one optimizer step; run a check if the count is a multiple of ``every``.

        Returns:
            The records of the check, or an empty list when none was due.
        """
        self.steps += 1
        if self.steps % self.every:
            return []
        return self._check()

    def check(self) -> list[CurvatureRecord]:
        """Run a check now, at the current step count (e.g. ``0`` before training).

        Returns:
            The check's records, also appended to :attr:`history`.
        """
        return self._check()

    # ------------------------------------------------------------------------- a check

    def _check(self) -> list[CurvatureRecord]:
        began = time.perf_counter()
        records: list[CurvatureRecord] = []
        operator = model_operator(
            FNAME,
            self.model,
            self.loss_fn,
            self.data,
            params=self.names,
            seed=self.seed,
            distributed=self.distributed,
        )
        stable = None  # (read first: its errors come before any product)
        if self.optimizer is not None:
            stable = stability(FNAME, self.optimizer, operator.params, self.names)
        with operator:
            records += self._eigenvalues(operator)
            if stable is not None:
                records += self._preconditioned(operator, stable)
        if self.trace:
            records += self._traces()
        self.history.extend(records)
        self.seconds += time.perf_counter() - began
        return records

    def _eigenvalues(self, operator: HessianOperator) -> list[CurvatureRecord]:
        """Top eigenvalues of H and of every group's block, all in one lockstep run."""
        sizes = [p.numel() for p in operator.params]
        members: dict[str | None, Any] = {None: None}
        for name, indices in (self.groups or {}).items():
            members[name] = rows_of(indices, sizes, operator.device)
        generators = spawn(make_generator(self.generator), len(members))
        problems = []
        for (group, rows), gen in zip(members.items(), generators):
            n = operator.shape[0] if rows is None else _count(rows)
            problems.append(self._problem(("eigenvalue", group), n, operator, gen, rows))
        seconds = self._run(operator, problems)
        return [
            record
            for (group, _), problem in zip(members.items(), problems)
            for record in self._records("eigenvalue", group, problem, seconds)
        ]

    def _preconditioned(
        self, operator: HessianOperator, stable: Stability
    ) -> list[CurvatureRecord]:
        """The optimizer's threshold, and the top eigenvalues of P^{-1/2} H P^{-1/2}."""
        threshold = CurvatureRecord(self.steps, "threshold", stable.threshold, 0.0, 0, 0.0)
        if stable.scale is None:  # SGD (P = I), or no step taken yet
            return [threshold]
        preconditioned = PreconditionedOperator(operator, stable.scale)
        gen = make_generator(self.generator)
        key = ("preconditioned_eigenvalue", None)
        problem = self._problem(key, operator.shape[0], preconditioned, gen, None)
        seconds = self._run(preconditioned, [problem])
        return [*self._records(key[0], None, problem, seconds), threshold]

    def _traces(self) -> list[CurvatureRecord]:
        """The trace of H, and of every group's block, by model_hessian_trace."""
        options = {
            "params": self.names,
            "method": self.trace_method,
            "num_matvecs": self.trace_num_matvecs,
            "generator": self.generator,
            "seed": self.seed,
            "distributed": self.distributed,
            "progress": self.progress,
        }
        records = []
        for groups in [None] if self.groups is None else [None, self.group_spec]:
            began = time.perf_counter()
            result = model_hessian_trace(
                self.model, self.loss_fn, self.data, groups=groups, **options
            )
            seconds = time.perf_counter() - began
            results = {None: result} if groups is None else result
            for group, estimate in results.items():  # type: ignore[union-attr]
                records.append(
                    CurvatureRecord(
                        self.steps,
                        "trace",
                        float(estimate.value),
                        float(estimate.stderr),
                        estimate.num_matvecs,
                        seconds,
                        group,
                    )
                )
        return records

    def _problem(
        self,
        key: tuple[str, str | None],
        n: int,
        operator: Any,
        gen: torch.Generator,
        rows: slice | Tensor | None,
    ) -> Problem:
        start = self._starts.get(key) if self.warm_start else None
        steps = thick_restart_lanczos(
            n,
            self.k,
            "largest",
            self.tol,
            self.max_matvecs,
            operator.dtype,
            operator.device,
            gen,
            start=start,
        )
        problem = Problem(steps, rows, self.max_matvecs)
        problem.key = key  # type: ignore[attr-defined]
        return problem

    def _run(self, operator: Any, problems: list[Problem]) -> float:
        began = time.perf_counter()
        run(FNAME, operator, problems, progress=self.progress)
        for problem in problems:
            pairs: RitzPairs = problem.result
            self._starts[problem.key] = pairs.vectors.detach().clone()  # type: ignore[attr-defined]
        return time.perf_counter() - began

    def _records(
        self, quantity: str, group: str | None, problem: Problem, seconds: float
    ) -> list[CurvatureRecord]:
        pairs: RitzPairs = problem.result
        if not pairs.converged:
            what = f"the {quantity}s" + ("" if group is None else f" of group {group!r}")
            warn_not_converged(
                FNAME,
                f"{what} at step {self.steps}",
                "lanczos",
                self.tol,
                self.max_matvecs,
                6,
                stalled=pairs.stalled,
            )
        return [
            CurvatureRecord(
                self.steps,
                quantity,
                float(pairs.values[i]),
                float(pairs.residuals[i]),
                problem.num_matvecs if i == 0 else 0,
                seconds,
                group,
                i,
                pairs.converged,
            )
            for i in range(len(pairs.values))
        ]


def _count(rows: slice | Tensor) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else int(rows.numel())
