r"""The one wrapper around :func:`torch.autograd.grad` that every public function uses.

A :class:`GradientGraph` calls the loss closure once and keeps the differentiable gradient
:math:`g = \nabla_\theta f(\theta)`. A *product* with cotangents :math:`u` (one tensor per
parameter) with respect to tensors :math:`x` is the vector-Jacobian product

.. math:: \Big(\sum_i u_i^\top \frac{\partial g_i}{\partial x_j}\Big)_j ,

which for :math:`x = \theta` is :math:`(H u)_j` because the Hessian is symmetric. Many
products reuse the graph (``retain_graph=True``); stacks of cotangents run batched in chunks
whose size is a fixed rule of the device and of memory (:mod:`._chunks`), so the same call
always computes the same numbers. A chunk is batched by :func:`torch.func.vmap`
around the :func:`torch.autograd.grad` call; the legacy vmap behind ``is_grads_batched=True``
lacks batching rules for common backward kernels (``tanh_backward``, ``gelu_backward``,
``_log_softmax_backward_data``, convolution and BatchNorm backward) and runs them once per
vector. A graph whose batched products fail for a reason of batching moves on to the next
engine of :data:`ENGINES`, then to a loop of single products; other errors (out of memory,
tensors modified in place, operators without a second derivative) are raised. Results never
touch ``.grad``.
"""

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from torch_secorder._checks import check_loss, param_label
from torch_secorder._types import LossClosure
from torch_secorder.core import _chunks
from torch_secorder.core._forward import (
    SecondDerivativeError,
    forward_context,
    forward_facts,
    next_node_number,
    pass_nodes,
    requires_grad,
    run_forward,
    second_derivative_error,
)

Cotangents = list[Tensor | None]
"""One cotangent per gradient tensor; ``None`` where it is zero."""

ENGINES = ("vmap", "is_grads_batched")
"""How chunks of products are batched, in the order a graph tries them: ``torch.func.vmap``
around ``torch.autograd.grad``, then ``is_grads_batched=True``; after both, a loop."""


class GradientGraph:
    r"""The differentiable gradient of one call of a loss closure, reused by many products.

    Args:
        func: Zero-argument closure returning the scalar loss.
        params: Parameters :math:`\theta` (validated by the caller).
        fname: Public function name for messages.
        names: Parameter names for messages, where known.
        strict: Raise if the loss does not depend on one of ``params``.
        extra: Further tensors that products may differentiate with respect to (they are
            made to require gradients like ``params``).
        seed: Seed for the random draws of the closure (e.g. dropout), in a forked RNG.
        source: The argument that computes the loss, for messages (``"loss_fn"`` for models).
        locate: ``locate(op)`` names the module calling the torch function ``op``, for the
            message when ``op`` turns out to have no second derivative (model forms).
        probes: Zero tensors the closure adds to intermediate results (layer outputs), to be
            differentiated like parameters: their gradients follow the params' (the graph's
            :attr:`params` list both); ``strict`` does not apply to them. Read after the
            closure's call, so the forward pass may append the probes it makes.
        route: Run the forward pass under the routing mode of :mod:`._forward` from the start;
            ``False`` runs it without, and again under the mode only where
            :func:`~._forward.forward_facts` finds an operator to route (the closure is then
            called twice: only for closures without side effects of their own).
        constant_warning: Warn where the loss has no autograd graph (every curvature zero: a
            loss computed under :func:`torch.no_grad` or detached, usually by mistake);
            ``False`` for functions that may well be constant (an output element).

    Attributes:
        loss: The loss value (detached).
        routed: Whether the forward pass ran under the routing mode.
        params: The parameters.
        grads: :math:`\partial f/\partial\theta_i` with its graph, or ``None`` where it is
            constant (zero curvature: the parameter is unused or enters linearly).
        saved_bytes: Bytes the graph of the gradient saved for backward (forward and gradient
            nodes), measured on first access; a memory estimate per product.
        num_products: Products computed so far (each unit of a chunk counts one).
        on_products: Called with the size of every chunk of products (a progress bar's
            ``update``), or ``None``.
        engine: How chunks of products are batched (one of :data:`ENGINES`, or ``None`` for a
            loop): the first until a batched product fails for a reason of batching, then
            the next.
    """

    def __init__(
        self,
        func: LossClosure,
        params: list[Tensor],
        *,
        fname: str,
        names: Sequence[str] | None = None,
        strict: bool = False,
        extra: Sequence[Tensor] = (),
        seed: int | None = None,
        source: str = "func",
        locate: Callable[[str], str | None] | None = None,
        probes: Sequence[Tensor] = (),
        route: bool = True,
        constant_warning: bool = True,
    ) -> None:
        self.fname = fname
        self.locate = locate
        others = [t for t in extra if all(t is not p for p in params)]
        self.engine: str | None = ENGINES[0]
        self._recent: list[Tensor] = []
        self._measured: tuple[int, bool] | None = None
        self.num_products = 0
        self.on_products: Callable[[int], object] | None = None
        # the forward pass without the routing mode, again under it where it needs a route
        first = -1 if route else next_node_number()  # (-1: route from the start)
        dtype = params[0].dtype if params else None
        with forward_context([*params, *others], seed, route=first < 0):
            loss = check_loss(fname, run_forward(fname, func, dtype), source)
        self.routed, custom = True, True  # (where the pass's nodes are not known apart)
        if first >= 0:
            self.routed, custom = forward_facts(loss, first)
        if first >= 0 and self.routed:
            with forward_context([*params, *others], seed):
                loss = check_loss(fname, run_forward(fname, func, dtype), source)
        self.params = [*params, *probes]  # probes the forward pass made are known now
        self.differentiable = [*self.params, *others]
        with requires_grad(self.differentiable):  # outside the forward's function mode
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            else:
                grads = (None,) * len(self.params)
                if constant_warning and not strict:  # (strict raises, naming a parameter)
                    warnings.warn(
                        f"{fname}: the loss has no autograd graph, so every curvature is zero: "
                        "it depends on none of the parameters (was it computed under "
                        "torch.no_grad(), or detached?).",
                        RuntimeWarning,
                        stacklevel=4,
                    )
        self.grads: list[Tensor | None] = []
        for i, g in enumerate(grads):
            if g is not None and g.is_sparse:
                raise ValueError(
                    f"{fname}: the gradient of {param_label(i, names)} is sparse (an "
                    "embedding with sparse=True?); second derivatives need dense gradients: use "
                    "sparse=False."
                )
            self.grads.append(g if g is not None and g.requires_grad else None)
        if strict:  # (after the sparse check, which strict=False would not help)
            for i, g in enumerate(grads[: len(params)]):
                if g is None:
                    raise ValueError(
                        f"{fname}: the loss does not depend on {param_label(i, names)}; "
                        "pass strict=False to treat it as having zero curvature."
                    )
        if custom:  # (only a custom autograd.Function can cut a gradient)
            # on the CPU the backward runs on this thread, so its nodes come after the loss's
            cpu = all(not t.is_cuda for t in self.params) and loss.grad_fn is not None
            after = loss.grad_fn._sequence_nr() if cpu else -1  # type: ignore[union-attr]
            behind = _behind_once_differentiable(loss, params, first)
            _report_cuts(fname, grads[: len(params)], names, strict, after, behind)
        self.loss = loss.detach()

    def __enter__(self) -> "GradientGraph":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Drop the gradient and with it the graph's memory."""
        self.grads = [None] * len(self.params)
        self._recent = []

    def vjp(
        self,
        cotangents: Cotangents,
        inputs: Sequence[Tensor],
        *,
        batched: bool = False,
        create_graph: bool = False,
        retain_graph: bool = True,
    ) -> list[Tensor]:
        r"""Compute :math:`\sum_i u_i^\top \partial g_i / \partial x_j` for each input.

        Args:
            cotangents: :math:`u_i` like params (``None`` for zero), each with a leading ``k``
                when ``batched``.
            inputs: Tensors :math:`x_j` to differentiate with respect to.
            batched: Treat the leading dimension of the cotangents as ``k`` separate products.
            create_graph: Keep the graph of the result.
            retain_graph: Keep the gradient graph for further products; a last product may
                free it as it goes (``False``), which is a little faster.

        Returns:
            One tensor per input (zeros where it does not enter), with the leading ``k`` when
            ``batched``.
        """
        outputs, grad_outputs = [], []
        for g, u in zip(self.grads, cotangents):
            if g is not None and u is not None:
                outputs.append(g)
                grad_outputs.append(u)
        lead = next((u.shape[:1] for u in cotangents if u is not None), ()) if batched else ()
        results: Sequence[Tensor | None] = [None] * len(inputs)
        if outputs:
            ready = not torch.is_inference_mode_enabled() and (
                torch.is_grad_enabled() or not create_graph
            )
            ready = ready and all(t.requires_grad for t in self.differentiable)
            # entering requires_grad is not free next to a small product: only if needed
            retain = retain_graph or create_graph
            with contextlib.nullcontext() if ready else requires_grad(self.differentiable):
                try:
                    if batched and self.engine == "vmap":
                        results = _vmapped_grad(outputs, inputs, grad_outputs, retain, create_graph)
                    else:
                        results = torch.autograd.grad(
                            outputs,
                            inputs,
                            grad_outputs=grad_outputs,
                            retain_graph=retain,
                            create_graph=create_graph,
                            allow_unused=True,
                            is_grads_batched=batched,
                        )
                except RuntimeError as err:
                    clear = second_derivative_error(self.fname, err, self.locate)
                    if clear is None:
                        raise
                    raise clear from err
        return [
            r if r is not None else x.new_zeros((*lead, *x.shape)) for r, x in zip(results, inputs)
        ]

    def products(
        self,
        cotangents: list[Tensor],
        inputs: Sequence[Tensor],
        *,
        chunk_size: int | None = None,
        out: list[Tensor] | None = None,
    ) -> list[Tensor]:
        """Products with ``k`` stacked cotangents (leading dimension ``k``), in chunks.

        Args:
            cotangents: One ``(k, *p.shape)`` tensor per parameter.
            inputs: Tensors to differentiate with respect to.
            chunk_size: Products per batched call (``None``: the rule of :mod:`._chunks`).
            out: One ``(k, *x.shape)`` tensor per input to write the products into (views of
                one flat buffer, say), else they are returned in memory of their own.

        Returns:
            One ``(k, *x.shape)`` tensor per input ``x`` (``out``, where given).
        """
        count = cotangents[0].shape[0]
        chunks = self.product_chunks(
            count,
            lambda start, stop: [u[start:stop] for u in cotangents],
            inputs,
            chunk_size=chunk_size,
        )
        for start, stop, products in chunks:
            if out is None:
                if stop - start == count:
                    return products
                # each chunk's products are copied out at once (see _chunk's loop)
                out = [r.new_empty((count, *r.shape[1:])) for r in products]
            for rows, part in zip(out, products):
                rows[start:stop] = part
            # Kept until the next chunk's products exist, as a loop that returns them would:
            # freed at once, they let glibc hand the top of the heap back to the system after
            # every product, and the next product faulted those pages in again (ResNet-20,
            # batch 128: 40,000 page faults, 5% of the product's time).
            self._recent = products
        return [] if out is None else out

    def product_chunks(
        self,
        count: int,
        cotangents: Callable[[int, int], Cotangents],
        inputs: Sequence[Tensor],
        *,
        chunk_size: int | None = None,
        create_graph: bool = False,
    ) -> Iterator[tuple[int, int, list[Tensor]]]:
        """Run ``count`` products in chunks, yielding ``(start, stop, products)`` per chunk.

        Args:
            count: Number of products.
            cotangents: ``cotangents(start, stop)`` returns the stacked cotangents of products
                ``start`` to ``stop - 1`` (each with leading dimension ``stop - start``).
            inputs: Tensors to differentiate with respect to.
            chunk_size: Products per batched call; ``1`` loops; ``None`` applies the rule
                of :func:`._chunks.chunk_size`.
            create_graph: Keep the graph of the results.

        Yields:
            ``(start, stop, products)`` with one tensor per input, leading dimension
            ``stop - start``.
        """
        size = chunk_size or _chunks.chunk_size(self, count, inputs)
        for start in range(0, count, size):
            stop = min(start + size, count)
            yield (
                start,
                stop,
                self._chunk(cotangents(start, stop), inputs, stop - start, create_graph),
            )

    def dense(self, inputs: Sequence[Tensor], *, chunk_size: int | None = None) -> Tensor:
        r"""The matrix :math:`\partial g / \partial x`, one row per entry of the flat gradient.

        Returns:
            A ``(P, P_x)`` tensor from :math:`P` unit-vector products; with ``inputs`` the
            params this is the Hessian.
        """
        num_rows = sum(p.numel() for p in self.params)
        out = self.params[0].new_zeros(num_rows, sum(x.numel() for x in inputs))
        chunks = self.product_chunks(
            num_rows,
            lambda start, stop: unit_cotangents(self.params, start, stop),
            inputs,
            chunk_size=chunk_size,
        )
        for start, stop, products in chunks:
            out[start:stop] = torch.cat([r.reshape(stop - start, -1) for r in products], dim=1)
        return out

    def own_block_rows(
        self, index: int, *, chunk_size: int | None = None, create_graph: bool = False
    ) -> Iterator[tuple[int, Tensor]]:
        r"""Yield ``(start, rows)``: rows of :math:`H_{ii}`, the block of ``params[index]``.

        ``rows`` is ``(c, n)`` with :math:`n` = ``params[index].numel()``, the rows ``start``
        to ``start + c - 1``, from batched products with unit vectors. Nothing is yielded when
        the parameter's gradient is constant (its block is zero).
        """
        p = self.params[index]
        if self.grads[index] is None:
            return
        offset = sum(q.numel() for q in self.params[:index])
        chunks = self.product_chunks(
            p.numel(),
            lambda start, stop: unit_cotangents(self.params, offset + start, offset + stop),
            [p],
            chunk_size=chunk_size,
            create_graph=create_graph,
        )
        for start, stop, (rows,) in chunks:
            yield start, rows.reshape(stop - start, p.numel())

    def own_diagonal(
        self, index: int, *, chunk_size: int | None = None, create_graph: bool = False
    ) -> Tensor:
        r"""The diagonal of :math:`H_{ii}`, the block of ``params[index]``, shaped like it."""
        p = self.params[index]
        rows = self.own_block_rows(index, chunk_size=chunk_size, create_graph=create_graph)
        parts = [block.diagonal(offset=start) for start, block in rows]
        return torch.cat(parts).view(p.shape) if parts else torch.zeros_like(p)

    def _chunk(
        self, cotangents: Cotangents, inputs: Sequence[Tensor], size: int, create_graph: bool
    ) -> list[Tensor]:
        self.num_products += size
        if self.on_products is not None:
            self.on_products(size)
        while size > 1 and self.engine is not None:
            try:
                return self.vjp(cotangents, inputs, batched=True, create_graph=create_graph)
            except RuntimeError as err:
                if not _unbatchable(err):
                    raise
                following = ENGINES.index(self.engine) + 1
                self.engine = ENGINES[following] if following < len(ENGINES) else None

        def column(j: int) -> list[Tensor]:
            cut = [None if u is None else u[j] for u in cotangents]
            return self.vjp(cut, inputs, create_graph=create_graph)

        if size == 1:
            return [r.unsqueeze(0) for r in column(0)]
        if create_graph:
            return [torch.stack(parts) for parts in zip(*map(column, range(size)))]
        # A loop writes each product into memory taken before it: small results kept between
        # the large transient allocations of the backward passes would keep the allocator from
        # reusing their memory (on glibc, resident memory grew by tens of MB per product).
        out = [x.new_empty((size, *x.shape)) for x in inputs]
        for j in range(size):
            for rows, product in zip(out, column(j)):
                rows[j] = product
        return out

    @property
    def saved_bytes(self) -> int:
        """Bytes the graph of the gradient saved for backward, measured on first access."""
        if self._measured is None:
            self._measured = _chunks.measure(self.grads)
        return self._measured[0]

    @property
    def convolves(self) -> bool:
        """Whether the graph of the gradient has a convolution, seen on first access."""
        if self._measured is None:
            self._measured = _chunks.measure(self.grads)
        return self._measured[1]


def _report_cuts(
    fname: str,
    grads: Sequence[Tensor | None],
    names: Sequence[str] | None,
    strict: bool,
    after: int = -1,
    behind: Sequence[int] = (),
) -> None:
    """Raise (``strict``) or warn for parameters whose gradient cannot be differentiated again.

    A backward marked ``@once_differentiable`` (common in custom ``autograd.Function``
    layers) returns its gradient through an error node whose inputs are detached: the
    gradient is right, but differentiating it again finds no path to the parameters and
    would read the missing second derivatives as zero curvature. Nodes numbered ``after`` or
    lower (the forward pass's, when the backward ran on this thread) are not searched.
    ``behind``: the positions of parameters behind such a Function in the forward pass
    (:func:`_behind_once_differentiable`), whose own second derivative is then missing where
    no error node marks the cut: warned about, also with ``strict`` (it is zero, and the
    curvature right, where the Function is linear).
    """
    cut = _cut_gradients(grads, after)
    if cut:
        labels = ", ".join(param_label(i, names) for i in cut)
        message = (
            f"{fname}: the gradient of {labels} passes through a backward that cannot be "
            "differentiated (an autograd.Function whose backward is marked "
            "@once_differentiable, or a DelayedError), so its second derivatives are missing "
            "and would read as zero curvature; write that backward with differentiable torch "
            "operations"
        )
        if strict:
            raise ValueError(message + ".")
        warnings.warn(message + ", or pass strict=True to make this an error.", RuntimeWarning, 4)
    maybe = sorted(set(behind) - set(cut))
    if maybe:
        labels = ", ".join(param_label(i, names) for i in maybe)
        warnings.warn(
            f"{fname}: the gradient of {labels} passes through the backward of an "
            "autograd.Function marked @once_differentiable: that Function's own second "
            "derivative is missing (read as zero, right only where the Function is linear); "
            "write its backward with differentiable torch operations.",
            RuntimeWarning,
            4,
        )


def _behind_once_differentiable(loss: Tensor, params: Sequence[Tensor], first: int) -> list[int]:
    """The positions of the ``params`` behind a once-differentiable Function in ``loss``'s pass.

    A custom ``autograd.Function`` whose backward is marked ``@once_differentiable``: such a
    backward runs without a graph, and where its cotangent is a constant (the Function
    computes the loss, or a term summed into it) no error node marks the cut: the gradients
    behind it hold no second derivative through it and would read as zero curvature. The
    forward pass's nodes are those numbered ``first`` or higher (all of them where ``first``
    is -1).
    """
    marked = [
        node
        for node in pass_nodes(loss, first)
        if _once_differentiable(getattr(type(node), "_forward_cls", None))
    ]
    leaves: set[int] = set()
    stack, seen = list(marked), set(marked)
    while stack:  # (every node behind a marked one, whatever pass made it)
        node = stack.pop()
        for following, _ in node.next_functions:  # type: ignore[union-attr]
            if following is not None and following not in seen:
                seen.add(following)
                variable = getattr(following, "variable", None)  # (an AccumulateGrad's leaf)
                if variable is not None:
                    leaves.add(id(variable))
                else:
                    stack.append(following)
    return [i for i, p in enumerate(params) if id(p) in leaves]


def _once_differentiable(function: object) -> bool:
    """Whether a Python ``autograd.Function`` (a node's ``_forward_cls``) is once-differentiable.

    Its ``backward`` (or ``vjp``) marked ``@once_differentiable``, under any decorators that
    keep ``__wrapped__`` (``torch.amp.custom_bwd``).
    """
    for name in ("backward", "vjp"):
        method = getattr(function, name, None)
        while method is not None:
            if getattr(method, "__code__", None) is _ONCE_DIFFERENTIABLE:
                return True
            method = getattr(method, "__wrapped__", None)
    return False


_ONCE_DIFFERENTIABLE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__
"""The code of every backward that ``@once_differentiable`` wraps (one closure's code)."""


def _cut_gradients(grads: Sequence[Tensor | None], after: int = -1) -> list[int]:
    """The positions of the gradients whose graph holds an error node (a cut second derivative).

    One walk over the graph of all gradients finds whether there is such a node at all (the
    common answer, no, costs about a microsecond per node); only then is each gradient's
    graph walked on its own.
    """
    roots = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    if not _holds_error(roots, after):
        return []
    return [
        i
        for i, g in enumerate(grads)
        if g is not None and g.grad_fn is not None and _holds_error([g.grad_fn], after)
    ]


def _holds_error(roots: list[object], after: int = -1) -> bool:
    """Whether the graph behind ``roots`` holds an error node numbered above ``after``."""
    stack, seen = list(roots), set(roots)
    while stack:
        node = stack.pop()
        if type(node).__name__ in _ERROR_NODES:
            return True
        if after >= 0 and node._sequence_nr() <= after:  # type: ignore[attr-defined]
            continue  # a node of the forward pass: no error node behind it
        for following, _ in node.next_functions:  # type: ignore[attr-defined]
            if following is not None and following not in seen:
                seen.add(following)
                stack.append(following)
    return False


_ERROR_NODES = frozenset(["Error", "DelayedError"])
"""Node types PyTorch puts where a derivative cannot be taken again."""


def _vmapped_grad(
    outputs: list[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: list[Tensor],
    retain_graph: bool,
    create_graph: bool,
) -> tuple[Tensor, ...]:
    """Batch :func:`torch.autograd.grad` over the cotangents' leading dimension with vmap.

    Returns zeros where an input does not enter.
    """

    def single(*cotangents: Tensor) -> tuple[Tensor, ...]:
        results = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=cotangents,
            retain_graph=retain_graph,
            create_graph=create_graph,
            allow_unused=True,
        )
        return tuple(torch.zeros_like(x) if r is None else r for r, x in zip(results, inputs))

    with warnings.catch_warnings():
        # an operator without a vmap batching rule runs once per vector, correctly; the
        # warning that says so is for PyTorch developers, not for users of this library
        warnings.filterwarnings("ignore", message="There is a performance drop because we have")
        return torch.func.vmap(single)(*grad_outputs)


def _unbatchable(err: RuntimeError) -> bool:
    """Whether a batched product failed for a reason of batching (then a loop may work).

    Running out of memory, a tensor modified in place, a freed graph and an operator without
    a second derivative fail a single product as well: those are raised.
    """
    message = str(err)
    return not (
        isinstance(err, torch.OutOfMemoryError)
        or "out of memory" in message
        or "modified by an inplace operation" in message
        or "backward through the graph a second time" in message
        or isinstance(err, SecondDerivativeError)
    )


def unit_cotangents(params: Sequence[Tensor], start: int, stop: int) -> Cotangents:
    """Unit vectors :math:`e_r`, ``start <= r < stop``, in the flat space of ``params``.

    Returns:
        Cotangents like params with leading dimension ``stop - start``; ``None`` for the
        parameters the rows do not touch.
    """
    rows: Cotangents = []
    offset = 0
    for p in params:
        if start < offset + p.numel() and offset < stop:
            e = p.new_zeros(stop - start, p.numel())
            # row r is e_(start + r): column start + r - offset, a diagonal of e
            e.diagonal(start - offset).fill_(1)
            rows.append(e.view(stop - start, *p.shape))
        else:
            rows.append(None)
        offset += p.numel()
    return rows
