r"""The Hessian of a model's loss with respect to the outputs of modules, or to its inputs.

**Variables.** With ``wrt="activations"`` the variables of batch :math:`b` are the outputs
:math:`z_{b,m}` of the chosen modules :math:`m` on that batch; with ``wrt="inputs"`` the
floating-point tensors of the batch's inputs. Batch :math:`b`'s mean loss :math:`f_b` depends
on its own variables only, so the Hessian of the mean loss over the data set,
:math:`L = \frac1N \sum_b n_b f_b(z_b)`, is block diagonal over the batches,

.. math:: H = \operatorname{blockdiag}_b \Big(\frac{n_b}{N}\, \nabla^2_{z_b} f_b(z_b)\Big),

each block weighted as the parameter Hessian weights its batch. The flat order is batch by
batch, within a batch the variables in order (modules in the model's order, inputs in argument
order), each flattened row-major.

**Probes.** A zero tensor :math:`\varepsilon` requiring gradients is added to each variable (a
forward hook returns :math:`z + \varepsilon`; an input :math:`x` is passed as
:math:`x + \varepsilon`); the Hessian with respect to :math:`\varepsilon` at zero is the one
with respect to :math:`z`, all curvature downstream included, parameters held fixed: the model
split at the module, the part after it as a function of its output. With several modules, one
downstream of another, the rest of the forward pass (the later modules included) computes from
each perturbed output: every module's diagonal block is the Hessian of the model split at that
module, and the block between two modules holds the mixed derivatives of the loss with respect
to perturbations of both outputs. The probes are the parameters of each batch's
:class:`~torch_secorder.core._autograd.GradientGraph`, built under the batch's RNG seed
(``seed + b``, as for parameters), so dropout draws the same masks as in the parameter
operator.

**Passes.** Building the operator runs the model once over the data, forward only, to find the
variables' shapes and check the modules (each called once, returning one floating-point tensor).
Every product then streams over the batches; a batch whose part of every vector is zero is not
run. Each pass is compared with the first (batch sizes, input checksums, losses, shapes) and a
difference is refused, as for parameters.

**Diagonal.** Unit vectors of all batches run together (a product over the data set carries
one unit vector per batch), so the diagonal takes as many products as the largest batch has
entries. Where the variables' leading dimension counts the batch's samples and the Hessian
blocks between different samples are exactly zero (checked as the structured diagonal checks
independence: :mod:`._structured.independence`, about :math:`\log_2 n` products), one product
carries the same unit vector in every sample: the products of a variable are its size per
sample.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder import _flat
from torch_secorder._checks import (
    batch_size,
    check_batch,
    check_bool,
    check_callable,
    check_data,
    check_int,
    check_loss,
    check_module,
    type_name,
)
from torch_secorder._data import rng_kept, to_device
from torch_secorder.core._autograd import GradientGraph
from torch_secorder.core._forward import forward_context
from torch_secorder.core._model import (
    call_model,
    operator_locator,
    preserved_state,
    private_buffers,
)
from torch_secorder.core._progress import require_tqdm
from torch_secorder.core._structured.independence import count, hessian_reached
from torch_secorder.core._variables import (
    Probes,
    Variables,
    input_slots,
    input_values,
    select_modules,
    with_probes,
)
from torch_secorder.core.operator import (
    HessianOperator,
    _checksum,
    _DataSetProducts,
    check_unchanged,
    kept_state,
    warn_summed_loss,
)


def _several_processes() -> bool:
    """Whether :mod:`torch.distributed` runs more than one process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def activation_operator(
    fname: str,
    model: object,
    loss_fn: object,
    data: object,
    variables: Variables,
    seed: object,
    distributed: object,
    progress: object,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> HessianOperator:
    """The operator of the loss Hessian with respect to ``variables``, checked up front."""
    check_module(fname, "model", model)
    modules = select_modules(fname, model, variables.modules) if variables.wrt != "inputs" else []
    check_callable(fname, "loss_fn", loss_fn)
    check_bool(fname, "progress", progress)
    seed = check_int(fname, "seed", seed)
    if distributed is not None:
        check_bool(fname, "distributed", distributed)
    if distributed:
        raise ValueError(
            f"{fname}: distributed=True sums products over processes, but with "
            f"wrt={variables.wrt!r} each process's variables are its own (its batches' "
            "activations or inputs); pass distributed=False and analyse each "
            "process's data on its own."
        )
    if distributed is None and _several_processes():
        raise ValueError(
            f"{fname}: torch.distributed is initialized, but with wrt={variables.wrt!r} each "
            "process's variables are its own (its batches' activations or inputs): the Hessian "
            "over all processes' data is block diagonal across them, which one process's "
            "operator cannot span; pass distributed=False to analyse this process's data on "
            "its own (its batches weighted among themselves)."
        )
    batches = check_data(fname, data, batch_size_fn)
    warn_summed_loss(fname, loss_fn, batches)
    if progress:
        require_tqdm(fname)
    source = ActivationProducts(
        fname,
        model,  # type: ignore[arg-type]
        loss_fn,
        batches,
        variables.wrt,
        modules,
        seed,  # type: ignore[arg-type]
        progress,  # type: ignore[arg-type]
        batch_size_fn,
    )
    operator = HessianOperator.__new__(HessianOperator)
    operator._setup(fname, source, source.names)
    return operator


def _model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` for neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


class ActivationProducts(_DataSetProducts):
    """Products of the loss Hessian w.r.t. activations or inputs, block diagonal over batches.

    Attributes:
        wrt: ``"activations"`` or ``"inputs"``.
        names: The variables' names within a batch (module names, input labels).
        shapes: Per batch, the shape of each variable.
        sizes: Per batch, its number of samples.
        variables: ``(batch, name, shape)`` per block, in flat order.
        size: :math:`P`, the entries of all blocks.
        num_samples: :math:`N`, the samples of all batches.
    """

    def __init__(
        self,
        fname: str,
        model: nn.Module,
        loss_fn: Any,
        batches: Any,
        wrt: str,
        modules: list[tuple[str, nn.Module]],
        seed: int,
        progress: bool,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        super().__init__(
            fname, model, loss_fn, batches, [], [], seed, False, progress, batch_size_fn
        )
        self.wrt = wrt  # type: ignore[misc]
        self.modules = modules
        self.target_device = _model_device(model)
        self.slots: list[tuple[str, object]] = []
        self.independence: bool | None = None  # samples proven independent in every batch
        self._scan()

    # ------------------------------------------------------------------------- the first pass

    def _batch(self, index: int, batch: Any) -> tuple[Any, Any]:
        pair = check_batch(self.fname, index, batch)
        return pair if self.target_device is None else to_device(pair, self.target_device)

    def _scan(self) -> None:
        """Run the model once over the data: the variables' shapes, and the checks."""
        shapes: list[list[torch.Size]] = []
        sizes: list[int] = []
        fingerprints = []
        layout: tuple[str, torch.dtype, torch.device] | None = None
        devices = [] if self.target_device is None else [self.target_device]
        with preserved_state(self.model), rng_kept():
            for index, batch in enumerate(self.batches):
                inputs, targets = self._batch(index, batch)
                size = batch_size(self.fname, index, inputs, self.batch_size_fn)
                hooks = Probes(self.modules, None)
                with hooks, forward_context([], self.seed + index, devices=devices):
                    with private_buffers(self.model):
                        loss = self.loss_fn(call_model(self.model, inputs), targets)
                    loss = check_loss(self.fname, loss, "loss_fn")
                values = self._found(index, inputs, hooks)
                for name, value in zip(self.names, values):
                    if layout is None:
                        layout = (name, value.dtype, value.device)
                    elif (value.dtype, value.device) != layout[1:]:
                        raise ValueError(
                            f"{self.fname}: a flat operator needs variables of one dtype and "
                            f"device, but {layout[0]!r} is {layout[1]} on {layout[2]} and "
                            f"{name!r} is {value.dtype} on {value.device} in data batch {index}."
                        )
                shapes.append([value.shape for value in values])
                sizes.append(size)
                fingerprints.append((size, _checksum(inputs, targets), float(loss.detach())))
                del values, loss
        if not sizes or sum(sizes) == 0:
            raise ValueError(f"{self.fname}: data holds no samples; expected at least one.")
        self.shapes, self.sizes, self.fingerprints = shapes, sizes, fingerprints
        self.num_samples = sum(sizes)
        _, self.dtype, self.device = layout  # type: ignore[misc]
        self.offsets = [0]
        for batch_shapes in shapes:
            self.offsets.append(self.offsets[-1] + sum(s.numel() for s in batch_shapes))
        self.size = self.offsets[-1]
        self.variables = [  # type: ignore[misc]
            (b, name, shape)
            for b, batch_shapes in enumerate(shapes)
            for name, shape in zip(self.names, batch_shapes)
        ]
        if self.size == 0:
            raise ValueError(
                f"{self.fname}: the variables have no entries (every one has a zero-size shape); "
                "expected at least one."
            )

    def _found(self, index: int, inputs: Any, hooks: Probes) -> list[Tensor]:
        """The variables of one batch from the first pass, checked; sets :attr:`names`."""
        if self.wrt == "inputs":
            slots = input_slots(inputs)
            if not slots:
                raise ValueError(
                    f"{self.fname}: wrt='inputs' needs floating-point inputs, but the inputs of "
                    f"data batch {index} hold none (token indices, for instance); differentiate "
                    "by the embedding's output with wrt='activations', modules=[...] instead."
                )
            if self.slots and [label for label, _ in slots] != self.names:
                self._refuse(
                    f"the floating-point inputs of data batch {index} differ from batch 0's"
                )
            self.slots, self.names = slots, [label for label, _ in slots]
            return input_values(inputs, slots)
        self.names = [name for name, _ in self.modules]
        values = []
        for (name, _), calls, output in zip(self.modules, hooks.calls, hooks.outputs):
            where = f"in the forward pass of data batch {index}"
            if calls == 0:
                raise ValueError(
                    f"{self.fname}: modules selects {name!r}, which is not called {where}; "
                    "expected each module to be called once."
                )
            if calls > 1:
                raise ValueError(
                    f"{self.fname}: modules selects {name!r}, which is called {calls} times "
                    f"{where}, so it has no single output; choose a module called once (one "
                    "nn.ReLU reused at several places is called several times)."
                )
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"{self.fname}: modules selects {name!r}, which returns a "
                    f"{type_name(output)}; expected a floating-point tensor (its output is the "
                    "variable). Choose a module that returns one tensor."
                )
            if not output.is_floating_point():
                raise ValueError(
                    f"{self.fname}: modules selects {name!r}, which returns a tensor of dtype "
                    f"{output.dtype}; expected a floating-point tensor."
                )
            values.append(output)
        return values

    # ------------------------------------------------------------------------- one batch

    def _gradient(self, index: int, batch: Any) -> tuple[GradientGraph, int, Any]:  # type: ignore[override]
        """The gradient graph of one batch w.r.t. its probes, under its seed; size, fingerprint."""
        inputs, targets = self._batch(index, batch)
        probes = [
            torch.zeros(shape, dtype=self.dtype, device=self.device, requires_grad=True)
            for shape in self.shapes[index]
        ]
        hooks = Probes(self.modules, probes if self.wrt == "activations" else None)
        model, loss_fn, slots = self.model, self.loss_fn, self.slots

        losses: list[Tensor] = []

        def func() -> Tensor:
            probed = with_probes(inputs, slots, probes) if self.wrt == "inputs" else inputs
            with private_buffers(model):
                losses.append(loss_fn(call_model(model, probed), targets))
            return losses[-1]

        if self.wrt == "inputs":
            values = input_values(inputs, slots) if input_slots(inputs) == slots else []
            if [v.shape for v in values] != self.shapes[index]:
                self._refuse(f"the inputs of data batch {index} changed shape between passes")
        with hooks:
            graph = GradientGraph(
                func,
                probes,
                fname=self.fname,
                names=self.names,
                seed=self.seed + index,
                source="loss_fn",
                locate=operator_locator(model, inputs),
            )
        if self.wrt == "activations":
            if hooks.mismatch is not None or any(c != 1 for c in hooks.calls):
                graph.release()
                name = self.names[hooks.mismatch if hooks.mismatch is not None else 0]
                self._refuse(
                    f"the output of module {name!r} in data batch {index} changed between "
                    "passes (its shape, dtype, device or number of calls)"
                )
            altered = hooks.altered()
            loss = losses[-1] if losses else None
            elsewhere = [] if loss is None or altered else hooks.read_elsewhere(loss)
            losses.clear()
            if altered or elsewhere:
                graph.release()
                what = "modified in place later in the forward pass" if altered else "read there"
                raise ValueError(
                    f"{self.fname}: the output of module {self.names[(altered or elsewhere)[0]]!r} "
                    f"is held elsewhere (a forward hook, a cache) and {what}, so a perturbation "
                    "of it would not reach what reads it; choose the module that modifies or "
                    "reads it, or one whose output is not held elsewhere."
                )
        size = batch_size(self.fname, index, inputs, self.batch_size_fn)
        return graph, size, (size, _checksum(inputs, targets), float(graph.loss))

    def _rows(self, index: int) -> slice:
        return slice(self.offsets[index], self.offsets[index + 1])

    def _weight(self, index: int, tensor: Tensor) -> Tensor:
        """``tensor`` times :math:`n_b / N`, batch ``index``'s weight."""
        size, total = self.sizes[index], self.num_samples
        return tensor if size == total else tensor * size / total  # type: ignore[operator]

    def _multiply(self, graph: GradientGraph, index: int, V: Tensor, out: Tensor) -> None:
        rows = self._rows(index)
        like = [torch.empty(s, device="meta") for s in self.shapes[index]]
        cotangents = _flat.split(V[rows].T, like)
        products = graph.products(cotangents, graph.params)
        out[rows] = self._weight(index, _flat.join(products, batched=True).T)

    def _graphs(
        self,
        wanted: Callable[[int], bool] = lambda index: True,
        keep: Callable[[int], bool] = lambda index: False,
    ) -> Iterator[tuple[int, GradientGraph | None]]:
        """Yield ``(index, graph)`` per batch, ``graph`` ``None`` where not ``wanted``.

        Each pass is compared with the first (sizes and checksums of every batch, the losses
        of those run). A batch's graph is released after its turn unless ``keep`` says
        otherwise; a lone batch's is kept (:attr:`cached`) until :meth:`release` and reused.
        """
        if self.cached is not None:
            check_unchanged(self.fname, kept_state((), self.model), self.built_at)
            yield 0, self.cached
            return
        lone = self.keeps_graph
        fingerprints: list[Any] = []
        with preserved_state(self.model), rng_kept():
            for index, batch in enumerate(self._iterate()):
                if index >= len(self.sizes):
                    fingerprints.append(None)
                    break
                graph = None
                if wanted(index):
                    graph, _, fingerprint = self._gradient(index, batch)
                else:
                    inputs, targets = self._batch(index, batch)
                    size = batch_size(self.fname, index, inputs, self.batch_size_fn)
                    loss = self.fingerprints[index][2]  # type: ignore[index]
                    fingerprint = (size, _checksum(inputs, targets), loss)
                fingerprints.append(fingerprint)
                differs = self._compare(fingerprints)
                if differs is not None:
                    if graph is not None:
                        graph.release()
                    self._refuse(differs)
                try:
                    yield index, graph
                finally:
                    if graph is not None and lone:
                        self.cached = graph
                    elif graph is not None and not keep(index):
                        graph.release()
        if self.cached is not None:  # (as the model's state was restored)
            self.built_at = kept_state((), self.model)
        differs = self._compare(fingerprints, complete=True)
        if differs is not None:
            self._refuse(differs)

    # ------------------------------------------------------------------------- products

    def matmat(self, V: Tensor) -> Tensor:
        """:math:`HV` for ``(P, k)`` columns, batch by batch (skipping zero parts)."""
        out = torch.zeros_like(V)
        nonzero = [bool(V[self._rows(index)].any()) for index in range(len(self.sizes))]
        for index, graph in self._graphs(lambda index: nonzero[index]):
            if graph is not None and nonzero[index]:
                self._multiply(graph, index, V, out)
        return out

    def products(self, cotangents: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError  # the operator calls matmat

    # ------------------------------------------------------------------------- diagonal

    def _per_sample(self) -> bool:
        """Whether every variable's leading dimension counts its batch's samples."""
        return all(
            len(shape) > 0 and shape[0] == n
            for shapes, n in zip(self.shapes, self.sizes)
            for shape in shapes
        )

    def _costs(self, index: int, coupled: set[int] | None, only: Sequence[int]) -> list[int]:
        """Products of each variable's diagonal on batch ``index``.

        By sample where ``coupled`` (the variables whose samples are coupled) is known, else
        by entry; zero for the variables not in ``only``.
        """
        costs = []
        for v, shape in enumerate(self.shapes[index]):
            if v not in only:
                costs.append(0)
            elif coupled is None or v in coupled:
                costs.append(shape.numel())
            else:
                costs.append(shape[1:].numel())
        return costs

    def _by_sample(self, index: int, only: Sequence[int]) -> bool:
        """Whether batch ``index``'s diagonal checks its samples and goes by sample."""
        n = self.sizes[index]
        if not self._per_sample() or n < 2:
            return False
        generic = sum(self._costs(index, None, only))
        return count(n) + sum(self._costs(index, set(), only)) < generic

    def _coupled(self, graph: GradientGraph, index: int) -> set[int]:
        """The variables whose Hessian couples different samples of batch ``index``."""
        members = [(v, p, 0) for v, p in enumerate(graph.params) if graph.grads[v] is not None]
        if not members or self.sizes[index] < 2:
            return set()
        return hessian_reached(graph, members, None)

    def plan_diagonal(self, budget: float, only: Sequence[int] | None = None) -> list[int]:
        """Per variable, the products :meth:`diagonal` ``(only)`` will take, before the work.

        A product over the data counts one; a batch's checks count for the first variable of
        ``only`` (default: all). Batch 0's samples are checked only where that can bring the
        diagonal within ``budget``; its graph and check are kept for the diagonal.
        """
        only = range(len(self.names)) if only is None else sorted(only)
        generic = self._planned_costs(None, only)
        if (math.isfinite(budget) and sum(generic) <= budget) or not self._by_sample(0, only):
            return generic
        if sum(self._planned_costs(set(), only)) > budget:
            return generic  # not within the budget even if no sample were coupled
        if self.planned is None:
            for _, graph in self._graphs(lambda index: index == 0, lambda index: index == 0):
                before = graph.num_products  # type: ignore[union-attr]
                coupled = self._coupled(graph, 0)  # type: ignore[arg-type]
                checks = graph.num_products - before  # type: ignore[union-attr]
                kept = None if self.keeps_graph else graph
                self.planned = (kept, coupled, checks)  # type: ignore[assignment]
                break
        return self._planned_costs(self.planned[1], only)  # type: ignore[index]

    def _planned_costs(self, coupled: set[int] | None, only: Sequence[int]) -> list[int]:
        """Per variable, the most products a batch takes for it.

        By entry (``coupled`` is ``None``), or by sample except for the ``coupled`` variables,
        checks included.
        """
        costs = [0] * len(self.names)
        for index in range(len(self.sizes)):
            by_sample = coupled is not None and self._by_sample(index, only)
            batch = self._costs(index, coupled if by_sample else None, only)
            if by_sample:
                batch[min(only)] += count(self.sizes[index])
            costs = [max(c, b) for c, b in zip(costs, batch)]
        return costs

    def diagonal(self, only: Sequence[int] | None = None) -> tuple[list[Tensor], list[int]]:  # type: ignore[override]
        """The exact diagonal, flat (one tensor in a list), and each variable's products.

        ``only`` limits it to some variables (by index), the others' entries zero. A
        variable's count is the most products any batch took for it (the checks of a batch
        count for its first variable). A plan of batch 0 (:meth:`plan_diagonal`) is used.
        """
        only = list(range(len(self.names))) if only is None else sorted(only)
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        costs = [0] * len(self.names)
        planned, self.planned = self.planned, None
        kept = planned[0] if planned is not None else None
        for index, graph in self._graphs(lambda index: not (index == 0 and kept is not None)):
            graph = kept if graph is None else graph
            coupled, checks = planned[1:] if planned is not None and index == 0 else (None, 0)
            before = graph.num_products  # type: ignore[union-attr]
            if coupled is None and self._by_sample(index, only):
                coupled = self._coupled(graph, index)  # type: ignore[arg-type]
            checks += graph.num_products - before  # type: ignore[union-attr]
            parts = []
            for v, probe in enumerate(graph.params):  # type: ignore[union-attr]
                start = graph.num_products  # type: ignore[union-attr]
                if v not in only:
                    parts.append(torch.zeros_like(probe))
                elif coupled is not None and v not in coupled:
                    parts.append(_sample_diagonal(graph, v))  # type: ignore[arg-type]
                else:
                    parts.append(graph.own_diagonal(v))  # type: ignore[union-attr]
                used = graph.num_products - start  # type: ignore[union-attr]
                costs[v] = max(costs[v], used + (checks if v == min(only, default=-1) else 0))
            out[self._rows(index)] = self._weight(index, _flat.join(parts))
            if index == 0 and kept is not None:
                kept.release()
        return [out], costs

    def independent_samples(self) -> tuple[bool, int]:
        """Whether the Hessian blocks between different samples are zero in every batch.

        One pass over the data with the checks of :mod:`._structured.independence` per batch
        (stopping at the first coupled batch); the answer is kept. Returns it and the most
        products a batch's checks took.
        """
        if self.independence is not None:
            return self.independence, 0
        checks, independent = 0, self._per_sample()
        if independent:
            for index, graph in self._graphs(lambda index: self.sizes[index] > 1):
                if graph is None:
                    continue
                before = graph.num_products
                independent = not self._coupled(graph, index)
                checks = max(checks, graph.num_products - before)
                if not independent:
                    break
        self.independence = independent
        return independent, checks

    def release(self) -> None:
        if self.planned is not None and self.planned[0] is not None:
            self.planned[0].release()
        super().release()


def _sample_diagonal(graph: GradientGraph, v: int) -> Tensor:
    """The diagonal of ``graph``'s block of probe ``v``, one unit vector per sample entry.

    Each product carries the same unit vector in every sample (the probe's leading
    dimension), which reads all samples' entries at once where the blocks between different
    samples are zero (checked by the caller).
    """
    probe = graph.params[v]
    if graph.grads[v] is None:
        return torch.zeros_like(probe)
    n, q = probe.shape[0], probe[0].numel()

    def cotangents(start: int, stop: int) -> list[Tensor | None]:
        e = probe.new_zeros(stop - start, n, q)
        columns = torch.arange(start, stop, device=probe.device)
        e[torch.arange(stop - start, device=probe.device), :, columns] = 1
        return [
            e.view(stop - start, *probe.shape) if j == v else None for j in range(len(graph.params))
        ]

    out = probe.new_zeros(n, q)
    for start, stop, (rows,) in graph.product_chunks(q, cotangents, [probe]):
        taken = rows.reshape(stop - start, n, q)
        index = torch.arange(stop - start, device=probe.device)
        out[:, start:stop] = taken[index, :, start + index].T
    return out.view(probe.shape)
