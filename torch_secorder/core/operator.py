r"""The Hessian as a linear operator on flat vectors, of one loss or of a whole data set.

:class:`HessianOperator` multiplies :math:`H` with vectors in the SciPy layout: ``matvec``
takes a ``(P,)`` vector, ``matmat`` and ``@`` take ``(P, k)`` columns. Over a data set
:math:`D` split into batches :math:`B_b` of sizes :math:`n_b`, with ``loss_fn`` returning the
mean loss :math:`f_b` of a batch, the operator is the Hessian of the mean loss over all
:math:`N = \sum_b n_b` samples,

.. math:: H = \frac{1}{N} \sum_b n_b \, \nabla^2_\theta f_b(\theta),

summed over the batches of every process when :mod:`torch.distributed` is initialized.
With ``wrt="activations"`` or ``wrt="inputs"`` the variables are the outputs of chosen modules
or the inputs of every batch instead of the parameters (:mod:`._activations`).
"""

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder import _flat
from torch_secorder._checks import (
    batch_size,
    check_batch,
    check_bool,
    check_callable,
    check_columns,
    check_data,
    check_int,
    check_layout,
    check_out,
    param_label,
)
from torch_secorder._data import rng_kept, to_device
from torch_secorder._types import LossClosure, Params, ParamSelection
from torch_secorder.core._autograd import GradientGraph
from torch_secorder.core._model import (
    batch_loss,
    closure_objective,
    model_params,
    operator_locator,
    preserved_state,
)
from torch_secorder.core._progress import Meter, require_tqdm
from torch_secorder.core._structured import StructuredDiagonal
from torch_secorder.core.params import flatten, unflatten

__all__ = ["HessianOperator"]


class HessianOperator:
    r"""The Hessian :math:`H = \nabla^2_\theta f(\theta)` as a linear operator.

    Built from a closure, the loss and its differentiable gradient are computed at the first
    product and reused by every later one until :meth:`release` (or the end of a ``with``
    block); the next product after a release rebuilds them. Built with :meth:`from_model`, it
    is the Hessian of the mean loss over a data set,
    :math:`H = \frac1N \sum_b n_b \nabla^2_\theta f_b(\theta)` for batches of sizes
    :math:`n_b` and mean losses :math:`f_b`, and each product streams over the batches.

    Products against ``k`` columns run as batched Hessian-vector products and count ``k`` in
    :attr:`num_matvecs`. :meth:`from_model` also gives the Hessian with respect to the
    outputs of chosen modules (``wrt="activations"``) or to the inputs (``wrt="inputs"``).

    Args:
        func: Zero-argument closure returning the scalar loss.
        params: Parameters :math:`\theta` (any iterable), all of one dtype and device.

    Attributes:
        params: The parameters, in flat order (empty for activations and inputs).
        names: Their names (from :meth:`from_model`), else ``None``; for activations the
            modules' names, for inputs the input tensors' (``"inputs"``, ``"inputs[1]"``,
            ``"inputs['x']"``).
        wrt: ``"params"``, ``"activations"`` or ``"inputs"``: what the Hessian is taken with
            respect to.
        variables: For activations and inputs, the blocks of the flat order, one
            ``(batch, name, shape)`` per batch and variable (batch by batch, the variables in
            the order of :attr:`names`); ``None`` for parameters.
        shape: ``(P, P)``.
        dtype: The parameters' (variables') dtype.
        device: The parameters' (variables') device.
        num_matvecs: Hessian-vector products performed so far.

    Raises:
        TypeError: If ``func`` is not callable or ``params`` holds a non-tensor.
        ValueError: If ``params`` is empty or mixes dtypes or devices.

    Example:
        >>> import torch
        >>> from torch_secorder import HessianOperator
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        >>> with HessianOperator(lambda: 0.5 * x @ A @ x, [x]) as H:
        ...     print(H @ torch.tensor([1.0, 1.0], dtype=torch.float64), H.num_matvecs)
        tensor([3., 4.], dtype=torch.float64) 1
    """

    def __init__(self, func: LossClosure, params: Params) -> None:
        self._setup("HessianOperator", _closure_source("HessianOperator", func, params), None)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        params: ParamSelection = None,
        wrt: str = "params",
        modules: ParamSelection = None,
        seed: int = 0,
        distributed: bool | None = None,
        progress: bool = False,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> "HessianOperator":
        r"""The Hessian of a model's mean loss over a data set.

        Every product runs the model over all batches of ``data``, each batch once for all
        columns, and sums the batches' Hessian products weighted by their sizes, so memory
        does not grow with the number of batches. For a single batch the gradient graph is
        built once and reused, as for a closure.

        ``loss_fn`` should return the *mean* loss over its batch (PyTorch's default
        reduction); the operator is then :math:`\frac1N \sum_b n_b H_b`, the Hessian of the
        mean loss over all :math:`N` samples, and ``N * H`` (:attr:`num_samples`) is the
        Hessian of the summed loss. A batch's size :math:`n_b` is the leading dimension of its
        first input tensor, or what ``batch_size_fn`` says (a sequence-first recurrent
        model's inputs, ``(T, B, F)``, count their samples in dimension 1).

        The model runs in its current train/eval mode, which is left as found. Each batch's
        forward pass runs under its own fixed RNG seed (``seed + b``, in a forked RNG, so the
        global RNG is untouched): dropout draws the same masks in every product and the
        operator stays one fixed symmetric matrix. Buffers (BatchNorm running statistics)
        are restored after every pass. Batches are moved to the parameters' device.

        With :mod:`torch.distributed` initialized, each process passes its own shard as
        ``data``; every product sums the weighted products and sample counts of all
        processes with one ``all_reduce``, so every process holds the Hessian of the mean
        loss over all processes' data (shards may differ in size, and a process may hold no
        batch). All processes must then request the same products in the same order; an
        error in one process's checks of its data or pass over it is raised on every
        process. The batches are numbered for their seeds rank by rank, as one process
        holding the shards in rank order numbers them, so with dropout too the processes
        together describe that process's Hessian.

        **Activations and inputs.** With ``wrt="activations"`` the variables are the outputs
        :math:`z_{b,m}` of the ``modules`` on every batch :math:`b`, with ``wrt="inputs"`` the
        floating-point tensors of every batch's inputs. Different batches have different
        variables, so the Hessian of the mean loss is block diagonal over the batches,

        .. math:: H = \operatorname{blockdiag}_b \Big(\frac{n_b}{N}\,
            \nabla^2_{z_b} f_b(z_b)\Big),

        each batch's block weighted as the parameter Hessian weights its batch (for one batch,
        :math:`\nabla^2_z f`). :math:`\nabla^2_{z_b} f_b` includes all curvature downstream
        of the modules, parameters held fixed. Flat order: batch by batch, within a batch the
        variables in :attr:`names` order, each flattened row-major (:attr:`variables`).
        Building the operator runs the model once over the data (forward passes only) to find
        the variables' shapes and check the modules: each must be called exactly once per
        forward pass and return one floating-point tensor. A product skips the batches its
        vector is zero on; :meth:`diagonal` takes unit-vector products of all batches at
        once, and of all samples of a batch at once where the Hessian blocks between
        different samples are proven zero (exact-zero checks, as the structured diagonal's).
        These operators belong to one process (each process's activations are its own
        variables): ``distributed=True`` is refused, and so is the default while
        :mod:`torch.distributed` runs several processes (``distributed=False`` analyses the
        process's own batches).

        Args:
            model: The model.
            loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
            data: One ``(inputs, targets)`` batch (a pair whose targets are a tensor), or a
                re-iterable collection of such batches (a list, a
                :class:`~torch.utils.data.DataLoader`). Inputs may be a tensor, a tuple of
                positional arguments or a dict of keyword arguments.
            params: Parameter selection by names or glob patterns (``None``: all trainable);
                only for ``wrt="params"``.
            wrt: ``"params"`` (default), ``"activations"`` (the outputs of ``modules``) or
                ``"inputs"`` (the floating-point input tensors).
            modules: For ``wrt="activations"``, module names of
                :meth:`~torch.nn.Module.named_modules` or glob patterns (``"layer*.0"``),
                kept in the model's order; ``""`` is the model itself (its output).
            seed: Base of the per-batch RNG seeds.
            distributed: Sum over processes; ``None`` (default) does so when
                :func:`torch.distributed.is_initialized`.
            progress: Show a progress bar over batches (needs ``tqdm``, the ``progress``
                extra).
            batch_size_fn: ``batch_size_fn(inputs)`` returns the number of samples of a
                batch, a positive int (``None``: the leading dimension of its first input
                tensor), e.g. ``lambda x: x.shape[1]`` for sequence-first inputs.

        Returns:
            The operator.

        Raises:
            TypeError: If ``model`` is not a module, ``loss_fn`` not callable, ``data`` not a
                batch or re-iterable collection of batches, or a batch not an
                ``(inputs, targets)`` pair.
            ValueError: If ``data`` is empty (summed over processes: where no process holds
                a sample, at the first product), a ``DataLoader`` draws another order on every
                pass (shuffling; passes that differ otherwise are refused at the product that
                finds them), the selection matches nothing, or the selected
                parameters mix dtypes or devices; for activations and inputs also if ``wrt``
                is unknown, ``params`` is given, ``modules`` is missing (or given for other
                ``wrt``) or matches no module, a module is not called exactly once, the
                variables mix dtypes or devices, the inputs hold no floating-point tensor, or
                ``distributed`` is not ``False`` while :mod:`torch.distributed` runs several
                processes (``True`` always).
            TypeError: For activations, if a module returns something other than a tensor.
            ImportError: If ``progress=True`` and ``tqdm`` is missing.

        Example:
            >>> import torch
            >>> from torch_secorder import HessianOperator
            >>> model = torch.nn.Linear(2, 1, bias=False).double()
            >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
            >>> y = torch.zeros(3, 1, dtype=torch.float64)
            >>> data = [(x[:2], y[:2]), (x[2:], y[2:])]  # H = 2/N x^T x, N = 3
            >>> H = HessianOperator.from_model(model, torch.nn.MSELoss(), data)
            >>> H @ torch.eye(2, dtype=torch.float64) * 3
            tensor([[4., 2.],
                    [2., 4.]], dtype=torch.float64)

            The Hessian with respect to the model's output ``z = x w``: :math:`2/N` per
            sample, block diagonal over the batches.

            >>> H = HessianOperator.from_model(model, torch.nn.MSELoss(), data, wrt="activations",
            ...                                modules="")
            >>> H @ torch.eye(3, dtype=torch.float64) * 3
            tensor([[2., 0., 0.],
                    [0., 2., 0.],
                    [0., 0., 2.]], dtype=torch.float64)
        """
        return model_operator(
            "HessianOperator.from_model",
            model,
            loss_fn,
            data,
            params=params,
            wrt=wrt,
            modules=modules,
            seed=seed,
            distributed=distributed,
            progress=progress,
            batch_size_fn=batch_size_fn,
        )

    def _setup(self, fname: str, source: Any, names: Any) -> None:
        params = source.params
        self._source = source
        self.params = params
        self.names: list[str] | None = names
        self.wrt: str = source.wrt
        self.variables: list[tuple[int, str, torch.Size]] | None = source.variables
        if self.wrt == "params":
            check_layout(
                fname,
                "an operator on flat vectors",
                [(param_label(i, names), p) for i, p in enumerate(params)],
                "convert the model to one dtype and device, or select parameters that share "
                "them (params=).",
            )
            size, dtype, device = sum(p.numel() for p in params), params[0].dtype, params[0].device
        else:
            size, dtype, device = source.size, source.dtype, source.device
        self.shape = (size, size)
        self.dtype = dtype
        self.device = device
        self.num_matvecs = 0

    @property
    def keeps_graph(self) -> bool:
        """Whether every product reuses one kept gradient graph: products cost alike in any chunks.

        So for a closure and a data set of one batch; over several batches each ``matmat`` is
        a pass over the data. Over several processes never: they must request their products
        alike, and another process's data may be several batches.
        """
        distributed = getattr(self._source, "_distributed", None)
        return bool(self._source.keeps_graph) and not (distributed is not None and distributed())

    @property
    def num_samples(self) -> int | None:
        """Samples in the data set (all processes), known after the first product over data.

        ``None`` for an operator built from a closure.
        """
        return getattr(self._source, "num_samples", None)

    def matvec(self, v: Tensor) -> Tensor:
        """Multiply with one flat vector.

        Args:
            v: A ``(P,)`` tensor of the operator's dtype and device.

        Returns:
            :math:`Hv`, shape ``(P,)``.

        Raises:
            ValueError: If ``v`` has the wrong shape, dtype or device.
        """
        check_columns("HessianOperator.matvec", "v", v, 1, self)
        return self._apply(v.unsqueeze(1)).squeeze(1)

    def matmat(self, V: Tensor, *, out: Tensor | None = None) -> Tensor:
        """Multiply with ``k`` flat vectors given as columns, batched.

        Args:
            V: A ``(P, k)`` tensor of the operator's dtype and device.
            out: A ``(P, k)`` tensor to write :math:`HV` into instead of new memory, with
                contiguous columns (such as the transpose of a ``(k, P)`` tensor, whose
                rows the products are written into) and not overlapping ``V``. Memory
                reused this way costs nothing to touch first, where new memory of a product's
                size costs about a fifth of a ResNet-18's product on a CPU.

        Returns:
            :math:`HV`, shape ``(P, k)`` (``out``, where given).

        Raises:
            ValueError: If ``V`` or ``out`` has the wrong shape, dtype or device, ``out``
                non-contiguous columns or memory shared with ``V``.
        """
        check_columns("HessianOperator.matmat", "V", V, 2, self)
        if out is not None:
            check_out("HessianOperator.matmat", out, V, self)
        return self._apply(V, out)

    def __matmul__(self, other: Tensor) -> Tensor:
        """``H @ v`` for a ``(P,)`` vector or ``(P, k)`` columns."""
        if isinstance(other, Tensor) and other.dim() == 1:
            return self.matvec(other)
        return self.matmat(other)

    def diagonal(self) -> Tensor:
        r"""Compute the exact diagonal of the operator.

        From a closure: one unit-vector product per row, on the kept gradient graph. Over a
        data set: each batch's exact diagonal, under the batch's RNG seed, weighted by its
        size (summed over processes); each batch's is computed as
        :func:`~torch_secorder.model_hessian_diagonal` does, reading layers off products
        with respect to their outputs where that is proven exact and cheaper. For activations
        and inputs: unit vectors of all batches at once, and of all samples of a batch at
        once where the blocks between its samples are proven zero. The products count in
        :attr:`num_matvecs`.

        Returns:
            :math:`\operatorname{diag}(H)`, a ``(P,)`` tensor.

        Example:
            >>> import torch
            >>> from torch_secorder import HessianOperator
            >>> x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
            >>> H = HessianOperator(lambda: x[0] ** 2 + 3 * x[0] * x[1] + 2 * x[1] ** 2, [x])
            >>> H.diagonal(), H.num_matvecs
            (tensor([2., 4.], dtype=torch.float64), 2)
        """
        return flatten(exact_diagonal(self)[0])

    def release(self) -> None:
        """Free the kept gradient graph; the next product rebuilds it, at the parameters then.

        Over data, the losses of the batches' first pass are forgotten too (later passes
        must still see the same batches): call it after changing the parameters, e.g. after
        a training step, and the operator is the Hessian at the new ones. Without it a
        product after such a change is refused (a kept graph compares the parameters'
        version counters and memory, over a model's data all of them and its modules' modes;
        passes over several batches compare their losses).
        """
        self._source.release()

    def __enter__(self) -> "HessianOperator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"HessianOperator(shape={self.shape}, dtype={self.dtype}, device={self.device}, "
            f"num_matvecs={self.num_matvecs})"
        )

    def to_scipy(self) -> Any:
        """Wrap the operator as a :class:`scipy.sparse.linalg.LinearOperator`.

        The SciPy operator converts NumPy arrays (any strides) to tensors of the operator's
        dtype and device and back; a complex array's real and imaginary parts are multiplied
        apart, in one product of twice the columns (two products each: :math:`H` is real). It
        is symmetric (``rmatvec`` is ``matvec``). Needs SciPy (the ``scipy`` extra).

        Returns:
            A ``scipy.sparse.linalg.LinearOperator`` of shape ``(P, P)``.

        Raises:
            ImportError: If SciPy is not installed.
        """
        try:
            import numpy as np
            from scipy.sparse.linalg import LinearOperator
        except ImportError as err:
            raise ImportError(
                "HessianOperator.to_scipy needs SciPy; install it with "
                "pip install 'torch-secorder[scipy]'."
            ) from err

        size = self.shape[0]

        def columns(x: Any) -> Any:
            x = np.asarray(x).reshape(size, -1)
            if np.iscomplexobj(x):
                both = columns(np.concatenate([x.real, x.imag], axis=1))
                return both[:, : x.shape[1]] + 1j * both[:, x.shape[1] :]
            X = torch.as_tensor(np.ascontiguousarray(x), dtype=self.dtype, device=self.device)
            return self.matmat(X).cpu().numpy()

        def vector(x: Any) -> Any:
            return columns(x).reshape(-1)

        dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator(
            self.shape, matvec=vector, rmatvec=vector, matmat=columns, rmatmat=columns, dtype=dtype
        )

    def _apply(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        k = V.shape[1]
        if k == 0:
            return V.new_zeros(V.shape) if out is None else out
        if self.wrt == "params":
            rows = None if out is None else out.T
            HV = self._source.products(unflatten(V.T, self.params), rows).T
        else:
            HV = self._source.matmat(V)
        self.num_matvecs += k
        if out is None:
            return HV
        if HV.data_ptr() != out.data_ptr():  # (activations, float32 sums, all_reduce)
            out.copy_(HV)
        return out


_Fingerprint = tuple[int, tuple[float, ...], float]
"""A batch as seen by one pass: its size, checksums of its tensors, its loss."""


def _checksum(*objects: Any) -> tuple[float, ...]:
    """The sums of the tensors in (nested) inputs and targets, in float64."""
    sums: list[float] = []
    for obj in objects:
        if isinstance(obj, Tensor):
            sums.append(float(obj.detach().sum(dtype=torch.float64)))
        elif isinstance(obj, Mapping):
            sums.extend(_checksum(*obj.values()))
        elif isinstance(obj, (tuple, list)):
            sums.extend(_checksum(*obj))
    return tuple(sums)


def exact_diagonal(operator: HessianOperator) -> tuple[list[Tensor], list[int]]:
    """The exact diagonal like params and the products each parameter took (counted)."""
    diagonal, costs = operator._source.diagonal()
    operator.num_matvecs += sum(costs)
    return diagonal, costs


def planned_diagonal_costs(operator: HessianOperator, budget: float = math.inf) -> list[int]:
    """Per parameter, the products :meth:`HessianOperator.diagonal` will take, before the work.

    For a closure, one per element. Over a model's data, the plan of the structured diagonal
    on the first batch (one forward pass, its gradient and the independence checks, which
    the diagonal then reuses), under :mod:`torch.distributed` that of the first batch in rank
    order, so that every process decides as one process holding all the shards would;
    :func:`forget_plan` drops it when the diagonal is not wanted after all. Where even a plan
    passing every check for free would take more than ``budget`` products, no check is run
    and the costs are those of the generic path.
    """
    return operator._source.plan_diagonal(budget)


def forget_plan(operator: HessianOperator) -> None:
    """Drop a kept plan of the exact diagonal and its gradient graph."""
    operator._source.planned = None


def kept_gradient(operator: object) -> Tensor | None:
    """The loss gradient, flat, where a :class:`HessianOperator` keeps one gradient graph.

    A closure's operator and a lone batch's on one process build the graph as their first
    product would, and their products reuse it. Elsewhere (several batches or processes,
    where the gradient would take a pass of its own; activations; other operators): ``None``.
    """
    if not isinstance(operator, HessianOperator) or operator.wrt != "params":
        return None
    gradient = getattr(operator._source, "gradient", None)
    return None if gradient is None else gradient()


def closure_operator(fname: str, func: object, params: object) -> HessianOperator:
    """``HessianOperator(func, params)`` whose errors name the public function ``fname``."""
    return objective_operator(fname, closure_objective(fname, func, params))


def objective_operator(fname: str, objective: Any) -> HessianOperator:
    """An objective's Hessian (``params``, ``gradient()``) naming ``fname`` in its errors."""
    operator = HessianOperator.__new__(HessianOperator)
    operator._setup(fname, _ClosureProducts(objective), None)
    return operator


def model_operator(
    fname: str,
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: ParamSelection = None,
    wrt: str = "params",
    modules: ParamSelection = None,
    seed: int = 0,
    distributed: bool | None = None,
    progress: bool = False,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> HessianOperator:
    """``HessianOperator.from_model(...)`` whose errors name the public function ``fname``."""
    if batch_size_fn is not None:
        check_callable(fname, "batch_size_fn", batch_size_fn)
    if wrt != "params" or modules is not None:
        from torch_secorder.core._activations import activation_operator
        from torch_secorder.core._variables import variables_of

        variables = variables_of(fname, params, wrt, modules)
        if variables is not None:
            return activation_operator(
                fname, model, loss_fn, data, variables, seed, distributed, progress, batch_size_fn
            )
    names, tensors = model_params(fname, model, params)
    check_callable(fname, "loss_fn", loss_fn)
    check_bool(fname, "progress", progress)
    seed = check_int(fname, "seed", seed)
    if distributed is not None:
        check_bool(fname, "distributed", distributed)
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not initialized:
        raise ValueError(
            f"{fname}: distributed=True sums products over processes, but torch.distributed "
            "is not initialized; call torch.distributed.init_process_group first, or pass "
            "distributed=None (the default: sum where it is initialized)."
        )
    # (one of several processes may hold no batch: it adds nothing to the sums)
    spread = initialized if distributed is None else distributed
    shard = spread and torch.distributed.get_world_size() > 1
    batches: Iterable[Any] = []
    with _Held(shard) as held:
        batches = check_data(fname, data, batch_size_fn, shard=shard)
    if shard:  # no process waits in its first product for one that refused its data
        flag = torch.tensor([int(held.error is not None)], device=tensors[0].device)
        torch.distributed.all_reduce(flag)
        _raise_agreed(fname, held.error, flag.item() > 0, "checking its data")
    warn_summed_loss(fname, loss_fn, batches)
    if progress:
        require_tqdm(fname)
    source = _DataSetProducts(
        fname, model, loss_fn, batches, tensors, names, seed, distributed, progress, batch_size_fn
    )
    operator = HessianOperator.__new__(HessianOperator)
    operator._setup(fname, source, names)
    return operator


def warn_summed_loss(fname: str, loss_fn: Any, batches: Iterable[Any]) -> None:
    """Warn where a loss that sums over its batch meets several batches."""
    if getattr(loss_fn, "reduction", None) == "sum" and (_length(batches) or 2) > 1:
        warnings.warn(
            f"{fname}: loss_fn sums over its batch (reduction='sum'), but each batch's Hessian "
            "is weighted by its size as a mean loss's is: over several batches the operator "
            "is the Hessian of neither the mean nor the summed loss; use reduction='mean' (the "
            "summed loss's Hessian is then num_samples times it).",
            RuntimeWarning,
            stacklevel=3,
        )


def _length(batches: Iterable[Any]) -> int | None:
    """The number of batches where the collection knows it (an iterable dataset's loader not)."""
    try:
        return len(batches) if isinstance(batches, Sized) else None
    except TypeError:
        return None


class _Held:
    """A block whose error waits, where ``held``, for the processes' next collective.

    The error is then raised after the others hear of it (:func:`_raise_agreed`), so that no
    process waits for one that raised; else it is raised at once.
    """

    def __init__(self, held: bool) -> None:
        self.held = held
        self.error: Exception | None = None

    def __enter__(self) -> "_Held":
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> bool:
        if self.held and isinstance(error, Exception):
            self.error = error
            return True
        return False


def _raise_agreed(
    fname: str, failure: Exception | None, anywhere: bool, when: str = "in this pass over the data"
) -> None:
    """After the processes' sum of a pass: this process's own error, or one for another's."""
    if failure is not None:
        raise failure
    if anywhere:
        raise RuntimeError(
            f"{fname}: another process raised an error {when} (its own message says which); "
            "this one stopped with it."
        )


def _flat_like(
    cotangents: list[Tensor],
    params: list[Tensor],
    out: Tensor | None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """A ``(k, P)`` buffer for the products with ``k`` stacked cotangents.

    ``out`` where it has the dtype, else uninitialised new memory.
    """
    if out is not None and out.dtype == (dtype or out.dtype):
        return out
    k = cotangents[0].shape[0]
    size = sum(p.numel() for p in params)
    return cotangents[0].new_empty((k, size), dtype=dtype or cotangents[0].dtype)


def _flat_gradient(graph: GradientGraph, params: list[Tensor]) -> Tensor:
    """A graph's gradient as one flat vector.

    Zero where the graph keeps none: a parameter the loss does not use or that enters it
    linearly (no curvature there).
    """
    grads = graph.grads[: len(params)]
    return flatten(
        [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
    )


KeptState = tuple[list[tuple[int, int]], list[bool]]
"""What a kept gradient graph was built at: tensors' version counters and memory, modes."""


def kept_state(params: Iterable[Tensor], model: nn.Module | None = None) -> KeptState:
    """What a training step changes: the parameters' version counters and memory.

    Of a ``model``: all its parameters, and every module's train/eval mode. (Not its buffers:
    ``DistributedDataParallel`` broadcasts them in place before its forward passes.)
    """
    tensors = params if model is None else list(model.parameters())
    modes = [] if model is None else [m.training for m in model.modules()]
    return [(t._version, t.data_ptr()) for t in tensors], modes


def check_unchanged(fname: str, now: KeptState, built_at: KeptState | None) -> None:
    """Refuse to reuse a kept gradient graph built at another :func:`kept_state` than ``now``.

    An in-place update (an optimizer's step) advances a tensor's version counter, an
    assignment to ``.data`` gives it other memory; the kept graph would then give the Hessian
    of the old model, or fail in PyTorch on a tensor it saved. ``built_at``: the state once
    the graph was kept (``None``: not known, nothing checked).
    """
    if built_at is not None and now != built_at:
        modes = bool(now[1])  # (recorded for a model)
        what = "the model (its parameters or mode)" if modes else "the parameters"
        raise ValueError(
            f"{fname}: {what} changed since the operator built its gradient graph (a training "
            "step?); call release() first, so that the next product builds it anew."
        )


def _closure_source(fname: str, func: object, params: object) -> "_ClosureProducts":
    return _ClosureProducts(closure_objective(fname, func, params))


class _ClosureProducts:
    """Products of a closure's Hessian, reusing one gradient graph until released."""

    wrt = "params"
    variables = None
    keeps_graph = True

    def __init__(self, objective: Any) -> None:
        self.objective = objective
        self.params = objective.params
        self.graph: GradientGraph | None = None
        self.built_at: KeptState | None = None

    def _kept(self) -> GradientGraph:
        """The kept gradient graph, built on first use."""
        if self.graph is None:
            self.graph = self.objective.gradient()
            self.built_at = kept_state(self.params)
        else:
            check_unchanged(self.objective.fname, kept_state(self.params), self.built_at)
        return self.graph

    def products(self, cotangents: list[Tensor], out: Tensor | None = None) -> Tensor:
        """The products with ``k`` stacked cotangents like params, flat ``(k, P)`` (in ``out``)."""
        flat = _flat_like(cotangents, self.params, out)
        self._kept().products(cotangents, self.params, out=_flat.split(flat, self.params))
        return flat

    def gradient(self) -> Tensor:
        """The loss gradient, flat, from the kept graph (built as the first product would)."""
        return _flat_gradient(self._kept(), self.params)

    planned = None

    def plan_diagonal(self, budget: float) -> list[int]:
        return [p.numel() for p in self.params]

    def diagonal(self) -> tuple[list[Tensor], list[int]]:
        graph = self._kept()
        diagonal, costs = [], []
        for i in range(len(self.params)):
            before = graph.num_products
            diagonal.append(graph.own_diagonal(i))
            costs.append(graph.num_products - before)
        return diagonal, costs

    def release(self) -> None:
        self.graph = None


class _DataSetProducts:
    """Products of the mean-loss Hessian over a data set, streamed batch by batch."""

    wrt = "params"
    variables = None

    def __init__(
        self,
        fname: str,
        model: nn.Module,
        loss_fn: Any,
        batches: Iterable[Any],
        params: list[Tensor],
        names: list[str],
        seed: int,
        distributed: bool | None,
        progress: bool,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        self.fname = fname
        self.batch_size_fn = batch_size_fn
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        self.params = params
        self.names = names
        self.dtype = params[0].dtype if params else None
        self.seed = seed
        self.distributed = distributed
        self.progress = progress
        self.num_samples: int | None = None
        self.cached: tuple[GradientGraph, int] | None = None  # graph and size of a lone batch
        self.built_at: KeptState | None = None  # the model's state when the graph was kept
        self.planned: tuple[StructuredDiagonal, int, tuple[float, ...]] | None = None  # batch 0
        self.fingerprints: list[_Fingerprint] | None = None  # of each batch in the first pass
        self.routed = False  # whether a forward pass needed the routing mode: all do from then
        self.first_batch: int | None = None  # the number of this process's first batch
        self.keeps_graph = isinstance(batches, Sequence) and len(batches) == 1

    def products(self, cotangents: list[Tensor], out: Tensor | None = None) -> Tensor:
        """The mean-loss Hessian's products with ``k`` stacked cotangents, flat ``(k, P)``.

        Each batch's products are added into one flat buffer (``out`` where given and of the
        accumulator's dtype; weighted by its size) and divided in place: beside the
        cotangents, the memory of two sets of products. A lone batch's products (one
        process) are the Hessian's: written into the buffer directly.
        """
        dtype = cotangents[0].dtype
        lone = self._lone()
        # half precisions would overflow a sum weighted by batch sizes: accumulate in float32
        accumulator = torch.float32 if torch.finfo(dtype).bits < 32 and not lone else dtype
        flat_total = _flat_like(cotangents, self.params, out, accumulator)
        if not lone:
            flat_total.zero_()
        total = _flat.split(flat_total, self.params)
        count = 0

        def accumulate(graph: GradientGraph, size: int) -> None:
            nonlocal count
            count += size
            if lone:
                graph.products(cotangents, self.params, out=total)
                return
            products = graph.products(cotangents, self.params)
            for acc, product in zip(total, products):
                acc.add_(product.to(accumulator), alpha=size)

        distributed = self._distributed()
        differs = None
        with _Held(distributed) as held:
            differs = self._pass(accumulate)
        if distributed:
            if self.num_samples is None:  # counted once, exactly: the passes are checked equal
                samples = torch.tensor([count], dtype=torch.int64, device=total[0].device)
                torch.distributed.all_reduce(samples)
                count = int(samples.item())
            else:
                count = self.num_samples
            # the flags: no process waits for one that raised
            flags = [float(differs is not None), float(held.error is not None)]
            packed = torch.cat([flat_total.reshape(-1), flat_total.new_tensor(flags)])
            torch.distributed.all_reduce(packed)
            _raise_agreed(self.fname, held.error, packed[-1].item() > 0)
            if differs is None and packed[-2].item() > 0:
                differs = "the data passes of another process differ"
            flat_total = packed[:-2].reshape(flat_total.shape)
        if differs is not None:
            self._refuse(differs)
        if count == 0:
            raise ValueError(f"{self.fname}: data holds no samples; expected at least one.")
        self.num_samples = count
        return (flat_total if lone else flat_total.div_(count)).to(dtype)

    def _pass(self, accumulate: Callable[[GradientGraph, int], None]) -> str | None:
        """One pass over the data, each batch's gradient graph and size given to ``accumulate``.

        A lone batch's graph is kept (and reused by the next pass); the others are released
        before the next batch's forward pass.

        Returns:
            How this pass differs from the first (``None``: not at all).
        """
        if self.cached is not None:
            check_unchanged(self.fname, kept_state(self.params, self.model), self.built_at)
            accumulate(*self.cached)
            return None
        self._number_batches()
        fingerprints: list[_Fingerprint] = []
        differs = None
        with preserved_state(self.model), rng_kept():
            for index, batch in enumerate(self._iterate()):
                graph, size, fingerprint = self._gradient(index, batch)
                fingerprints.append(fingerprint)
                differs = self._compare(fingerprints)
                if differs is not None:
                    break
                accumulate(graph, size)
                if self.keeps_graph:
                    self.cached = (graph, size)
                else:
                    graph.release()
        # (as the model's state was restored: a renormed embedding's weights copied back)
        self.built_at = kept_state(self.params, self.model) if self.cached is not None else None
        if differs is None and self.fingerprints is not None:
            differs = self._compare(fingerprints, complete=True)
        forgotten = bool(self.fingerprints) and math.isnan(self.fingerprints[0][2])
        if self.fingerprints is None or (differs is None and forgotten):
            self.fingerprints = fingerprints  # the first pass, or the first after release()
        return differs

    def gradient(self) -> Tensor | None:
        """The flat loss gradient where a lone batch's graph is kept (one process); else None."""
        if not self._lone():
            return None
        differs = self._pass(lambda graph, size: None)  # (keeps the batch's graph)
        if differs is not None:
            self._refuse(differs)
        assert self.cached is not None
        return _flat_gradient(self.cached[0], self.params)

    def _lone(self) -> bool:
        """Whether the data is one batch on one process: its graph is kept, its H is the H."""
        return self.keeps_graph and not self._distributed()

    def _refuse(self, differs: str) -> None:
        raise ValueError(
            f"{self.fname}: {differs}. Every product runs the model over the data again, "
            "and all passes must see the same batches in the same order and compute the "
            "same losses; use a DataLoader with shuffle=False (a fixed order, data without "
            "random augmentation), and for a model whose forward pass is random beyond "
            "torch's RNG, eval mode. Where the parameters changed on purpose (a training "
            "step), call release() first: the operator is then the Hessian at the new ones."
        )

    def _compare(self, fingerprints: list[_Fingerprint], complete: bool = False) -> str | None:
        """How this pass differs from the first, so far (``None``: not at all).

        Batch sizes and input checksums must agree exactly, losses to the square root of the
        dtype's machine epsilon (GPU kernels may sum in another order).
        """
        if self.fingerprints is None:
            return None
        first = self.fingerprints
        index = len(fingerprints) - 1
        if complete or index >= len(first):
            if len(fingerprints) != len(first):
                return (
                    f"the data gave {len(first)} batches in the first pass and "
                    f"{len(fingerprints)} in a later one"
                )
            return None
        (size, checksum, loss), (size0, checksum0, loss0) = fingerprints[index], first[index]
        same = all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(checksum, checksum0))
        if size != size0 or len(checksum) != len(checksum0) or not same:
            return (
                f"data batch {index} differs between passes over the data (its size or inputs "
                "changed)"
            )
        tolerance = torch.finfo(self.dtype).eps ** 0.5 * max(abs(loss), abs(loss0))
        if abs(loss - loss0) > tolerance:  # (never where loss0 is NaN: forgotten by release())
            return (
                f"the loss of data batch {index} was {loss0:.8g} in the first pass over the data "
                f"and {loss:.8g} in a later one"
            )
        return None

    def plan_diagonal(self, budget: float) -> list[int]:
        distributed = self._distributed()
        held = _Held(distributed)
        if self.planned is None:
            self._number_batches()
            with held, self._own_passes(), preserved_state(self.model), rng_kept():
                for batch in self.batches:
                    self.planned = self._structured(0, batch, budget)
                    break
        if self.planned is None and not distributed:
            raise ValueError(f"{self.fname}: data holds no samples; expected at least one.")
        costs = [0] * len(self.params) if self.planned is None else self.planned[0].costs
        if distributed:  # the plan of the first batch in rank order, as in one process
            mine = [int(self.planned is not None), int(held.error is not None), *costs]
            packed = torch.tensor(mine, dtype=torch.int64, device=self.params[0].device)
            plans = [torch.zeros_like(packed) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(plans, packed)
            _raise_agreed(self.fname, held.error, any(int(plan[1]) for plan in plans))
            first = next((plan for plan in plans if int(plan[0])), plans[0])
            costs = first[2:].tolist()
        return costs

    def diagonal(self) -> tuple[list[Tensor], list[int]]:
        """The size-weighted sum of the batches' exact diagonals, and each one's products.

        A product over the data set counts one, as for :meth:`products`: a parameter's count
        is the most products any batch took for it. A plan of the first batch
        (:meth:`plan_diagonal`) is used, not made again.
        """
        total = [torch.zeros_like(p) for p in self.params]
        costs = [0] * len(self.params)
        count = 0
        planned, self.planned = self.planned, None
        if planned is not None and planned[0].over_budget:  # cut short: plan it in full
            planned = None
        meter: Meter | None = None
        self._number_batches()
        distributed = self._distributed()
        try:
            with (
                _Held(distributed) as held,
                self._own_passes(),
                preserved_state(self.model),
                rng_kept(),
            ):
                for index, batch in enumerate(self.batches):
                    if planned is not None and planned[2] != _checksum(*check_batch("", 0, batch)):
                        self._refuse("data batch 0 differs between passes over the data")
                    structured, size, _ = planned or self._structured(index, batch)
                    planned = None
                    if meter is None:  # the first batch's plan, for every batch
                        meter = self._meter(sum(structured.costs))
                    with structured:
                        diagonal, used = structured.run(), structured.costs
                    meter.update(sum(used))
                    for acc, d in zip(total, diagonal):
                        acc.add_(d, alpha=size)
                    count += size
                    costs = [max(c, u) for c, u in zip(costs, used)]
        finally:
            if meter is not None:
                meter.close()
        if distributed:
            packed = flatten(total)
            torch.distributed.all_reduce(packed)
            # the samples and the processes that raised; each parameter's most products of any
            # batch of any process
            head = [count, int(held.error is not None)]
            counts = torch.tensor([*head, *costs], dtype=torch.int64, device=total[0].device)
            torch.distributed.all_reduce(counts[:2])
            torch.distributed.all_reduce(counts[2:], op=torch.distributed.ReduceOp.MAX)
            count, raised, *costs = counts.tolist()
            _raise_agreed(self.fname, held.error, raised > 0)
            total = unflatten(packed, self.params)
        if count == 0:
            raise ValueError(f"{self.fname}: data holds no samples; expected at least one.")
        return [acc / count for acc in total], costs

    def _meter(self, per_batch: int) -> Meter:
        """Products of the exact diagonal over the data, counted as each batch finishes."""
        batches = len(self.batches) if isinstance(self.batches, Sequence) else 1
        hint = "hessian_diagonal_estimate estimates it from far fewer products."
        return Meter(self.fname, per_batch * batches, self.progress, "exact diagonal", hint)

    def _structured(
        self, index: int, batch: Any, budget: float = math.inf
    ) -> tuple[StructuredDiagonal, int, tuple[float, ...]]:
        """The structured diagonal of one batch, planned under its seed; its size and checksum."""
        inputs, targets = to_device(check_batch(self.fname, index, batch), self.params[0].device)
        structured = StructuredDiagonal(
            batch_loss(self.model, self.loss_fn, inputs, targets),
            self.model,
            self.params,
            fname=self.fname,
            names=self.names,
            strict=False,
            seed=self._seed(index),
            locate=operator_locator(self.model, inputs),
            chunk_size=None,
            budget=budget,
        )
        size = batch_size(self.fname, index, inputs, self.batch_size_fn)
        return structured, size, _checksum(inputs, targets)

    def release(self) -> None:
        self.cached = self.planned = None
        # the parameters may have changed: the next pass's losses are the new reference
        if self.fingerprints is not None:
            self.fingerprints = [(size, sums, math.nan) for size, sums, _ in self.fingerprints]

    @contextlib.contextmanager
    def _own_passes(self) -> Iterator[None]:
        """Forward passes of the library's own beside a kept graph (a plan, the diagonal).

        What they write into the parameters (a renorming embedding's forward, the weights
        restored after it) is not a change of the model: a kept graph unchanged before them
        takes the state after them.
        """
        unchanged = self.cached is not None and self.built_at == kept_state(self.params, self.model)
        yield
        if unchanged:
            self.built_at = kept_state(self.params, self.model)

    def _distributed(self) -> bool:
        if self.distributed is not None:
            return self.distributed
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def _seed(self, index: int) -> int:
        """The RNG seed of this process's batch ``index``: ``seed`` plus its number in all data."""
        assert self.first_batch is not None, "_number_batches() before the batches' seeds"
        return self.seed + self.first_batch + index

    def _number_batches(self) -> None:
        """Number this process's first batch, before a pass over the data (all processes).

        Over processes the batches are numbered rank by rank (the batches of lower ranks
        first), as one process holding every shard in rank order would number them, so that
        dropout draws the same masks there as here; counted once, with one ``all_gather``.
        """
        if self.first_batch is None:
            if not self._distributed():
                self.first_batch = 0
                return
            count, held = _length(self.batches), _Held(True)
            if count is None:  # (a loader's workers draw their seeds: the RNG is kept)
                count = -1  # (where counting raises)
                with held, rng_kept():
                    count = sum(1 for _ in self.batches)
            device = self.params[0].device
            counts = [
                torch.zeros((), dtype=torch.int64, device=device)
                for _ in range(torch.distributed.get_world_size())
            ]
            torch.distributed.all_gather(counts, torch.tensor(count, device=device))
            anywhere = any(int(c) < 0 for c in counts)
            _raise_agreed(self.fname, held.error, anywhere, "counting its batches")
            self.first_batch = int(sum(counts[: torch.distributed.get_rank()]))

    def _gradient(self, index: int, batch: Any) -> tuple[GradientGraph, int, _Fingerprint]:
        """The gradient graph of one batch, under the batch's RNG seed, its size and fingerprint."""
        inputs, targets = to_device(check_batch(self.fname, index, batch), self.params[0].device)
        graph = GradientGraph(
            batch_loss(self.model, self.loss_fn, inputs, targets),
            self.params,
            fname=self.fname,
            names=self.names,
            seed=self._seed(index),
            source="loss_fn",
            locate=operator_locator(self.model, inputs),
            route=self.routed,
        )
        self.routed = graph.routed
        size = batch_size(self.fname, index, inputs, self.batch_size_fn)
        return graph, size, (size, _checksum(inputs, targets), float(graph.loss))

    def _iterate(self) -> Iterable[Any]:
        if not self.progress:
            return self.batches
        from tqdm.auto import tqdm

        total = len(self.batches) if isinstance(self.batches, Sequence) else None
        return tqdm(self.batches, total=total, desc="Hessian product", unit="batch", leave=False)
