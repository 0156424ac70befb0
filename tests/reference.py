"""Dense ground truth for the test suite, computed with ``torch.func`` instead of the library.

:func:`hessian` differentiates a pure function of some tensors twice with
``jacrev(jacrev(...))``; :func:`case_hessian` does the same for a zoo case through
``torch.func.functional_call``, passing the differentiated parameters, the other parameters
(as constants) *and copies of the buffers* explicitly, so BatchNorm in train mode updates the
copies and never the model. Everything runs with the global RNG forked (a dropout model sees
the masks the library sees when called from the same RNG state, and the state is not
advanced) and with attention on the math kernel.

Normalization layers: on torch 2.13 (as on 2.14), ``torch.func`` returns wrong, asymmetric
Hessians through ``F.layer_norm`` and ``F.batch_norm`` (train mode) when both the input and the
weight depend on the variables, while plain autograd agrees with finite differences. The
reference therefore swaps both for compositions of elementary operations (:func:`layer_norm`,
:func:`batch_norm`) while it differentiates. ``tests/test_reference.py`` checks those against
the originals and the whole oracle against closed forms and finite differences.

The slicing helpers (:func:`diagonal`, :func:`blocks`, :func:`block`) cut the dense matrix
into the library's result structures, with their own flat-order arithmetic.

Activations and inputs: :func:`split_loss` is a batch's loss as a pure function of
perturbations added to the outputs of named modules (the model split at each module, the part
after it a function of the module's output) or to the floating-point inputs;
:func:`variable_hessian` assembles the Hessian over a data set from it, block diagonal over the
batches with weights :math:`n_b / N`.
"""

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.cases import Built

__all__ = [
    "batch_norm",
    "block_diagonal",
    "split_loss",
    "variable_hessian",
    "block",
    "blocks",
    "case_hessian",
    "case_loss",
    "case_output_hessians",
    "diagonal",
    "finite_difference_hessian",
    "flat",
    "hessian",
    "hessian_gradient",
    "layer_norm",
    "oracle_context",
    "unflat",
]


# ----------------------------------------------------------------------------- flat order


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors, each flattened row-major, into one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector (or the last dimension of a stack) into tensors shaped like ``like``."""
    out, offset = [], 0
    for t in like:
        out.append(vector[..., offset : offset + t.numel()].reshape((*vector.shape[:-1], *t.shape)))
        offset += t.numel()
    return out


def _ranges(params: Sequence[Tensor]) -> list[range]:
    out, offset = [], 0
    for p in params:
        out.append(range(offset, offset + p.numel()))
        offset += p.numel()
    return out


def diagonal(H: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """The diagonal of ``H`` as tensors like ``params``."""
    return unflat(torch.diagonal(H), params)


def blocks(H: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """The diagonal blocks :math:`H_{ii}`, one ``(n_i, n_i)`` matrix per parameter."""
    return [H[r.start : r.stop, r.start : r.stop] for r in _ranges(params)]


def block(H: Tensor, params: Sequence[Tensor], rows: Sequence[int], cols: Sequence[int]) -> Tensor:
    """The block of ``H`` between the parameters with indices ``rows`` and ``cols`` (in order)."""
    ranges = _ranges(params)
    row_index = [i for j in rows for i in ranges[j]]
    col_index = [i for j in cols for i in ranges[j]]
    return H[row_index][:, col_index]


# ----------------------------------------------------------------------------- normalization


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` from elementary operations."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    var = ((input - mean) ** 2).mean(dims, keepdim=True)
    out = (input - mean) / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm`` from elementary operations: ``v g / |v|``, the norm over every
    dimension but ``dim`` (over all for ``dim=-1``)."""
    dims = [d for d in range(v.dim()) if d != dim] if dim != -1 else list(range(v.dim()))
    return v * (g / torch.sqrt((v**2).sum(dims, keepdim=dim != -1)))


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm`` from elementary operations (running statistics are not updated)."""
    dims = [0, *range(2, input.dim())]
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training or running_mean is None or running_var is None:
        mean = input.mean(dims)
        var = ((input - mean.view(shape)) ** 2).mean(dims)
    else:
        mean, var = running_mean, running_var
    out = (input - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


@contextlib.contextmanager
def oracle_context() -> Iterator[None]:
    """Forked RNG, math attention, and the elementary normalization layers.

    (``torch.func`` differentiates PyTorch 2.13's own LayerNorm, BatchNorm and fused weight
    norm twice wrongly.)
    """
    with (
        torch.random.fork_rng(),
        sdpa_kernel([SDPBackend.MATH]),
        mock.patch.object(F, "layer_norm", layer_norm),
        mock.patch.object(F, "batch_norm", batch_norm),
        mock.patch.object(torch, "_weight_norm", weight_norm),
    ):
        yield


# ----------------------------------------------------------------------------- Hessians


def hessian(fn: Callable[..., Tensor], tensors: Sequence[Tensor]) -> Tensor:
    """The dense Hessian of the scalar ``fn(*tensors)`` with respect to all ``tensors``.

    Rows and columns in flat order (the tensors in order, each flattened row-major).
    """
    tensors = [t.detach() for t in tensors]

    def flat_fn(theta: Tensor) -> Tensor:
        return fn(*unflat(theta, tensors)).reshape(())

    with oracle_context():
        return jacrev(jacrev(flat_fn))(flat(tensors))


def double_backward_hessian(func: Callable[[], Tensor], tensors: Iterable[Tensor]) -> Tensor:
    """The dense Hessian of ``func()`` by plain double backward, one row per entry.

    For functions ``torch.func`` differentiates wrongly or cannot trace (routed operators,
    in-place renormalisation, recurrent layers); rows and columns in flat order.
    """
    tensors = list(tensors)
    g = flat(torch.autograd.grad(func(), tensors, create_graph=True))
    rows = [torch.autograd.grad(g[i], tensors, retain_graph=True) for i in range(len(g))]
    return torch.stack([flat(row) for row in rows])


def hessian_gradient(
    fn: Callable[..., Tensor], tensors: Sequence[Tensor], scalar: Callable[[Tensor], Tensor]
) -> Tensor:
    r"""Third derivatives: the gradient :math:`\nabla_\theta s(H(\theta))`, flat.

    ``scalar`` maps the dense Hessian to a scalar, e.g. ``lambda H: w @ H @ v`` for the
    gradient of :math:`w^\top H v`.
    """
    tensors = [t.detach() for t in tensors]

    def flat_fn(theta: Tensor) -> Tensor:
        return fn(*unflat(theta, tensors)).reshape(())

    with oracle_context():
        return torch.func.grad(lambda t: scalar(jacrev(jacrev(flat_fn))(t)))(flat(tensors))


def case_loss(built: Built, names: Sequence[str] | None = None) -> Callable[..., Tensor]:
    """The case's loss as a pure function of the parameters named ``names``.

    The other parameters enter as constants, the buffers as fresh copies on every call.
    Defaults to the case's trainable parameters.
    """
    names = list(built.names if names is None else names)
    model = built.model
    constants = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    args = built.inputs if isinstance(built.inputs, tuple) else (built.inputs,)

    def fn(*tensors: Tensor) -> Tensor:
        params = {**constants, **dict(zip(names, tensors))}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        return built.loss_fn(functional_call(model, (params, buffers), args), built.targets)

    return fn


_CACHE: dict[tuple[str, tuple[str, ...], torch.dtype], Tensor] = {}


def case_hessian(built: Built, names: Sequence[str] | None = None) -> Tensor:
    """The dense Hessian of a case's loss w.r.t. the parameters ``names`` (default: trainable).

    Cached per case, selection and dtype (cases are deterministic), returning a fresh copy;
    a stochastic case is recomputed every time, with the masks of the current global RNG state.
    """
    names = tuple(built.names if names is None else names)
    if built.case.stochastic:
        return hessian(case_loss(built, names), built.select(names))
    key = (built.case.id, names, built.params[0].dtype)
    if key not in _CACHE:
        _CACHE[key] = hessian(case_loss(built, names), built.select(names))
    return _CACHE[key].clone()


def case_output_hessians(
    built: Built, names: Sequence[str] | None = None
) -> tuple[Tensor, tuple[int, ...]]:
    """The Hessians of every element of a case's model output, and the output's shape.

    The flat output is differentiated twice with ``jacrev(jacrev(...))`` w.r.t. the parameters
    ``names`` (default: trainable) through ``functional_call``, the other parameters as
    constants, fresh buffer copies, and the forward pass under RNG seed 0 (the masks of the
    library's model forms).

    Returns:
        The ``(M, P, P)`` Hessians of the ``M`` output elements (row-major), and the shape.
    """
    names = list(built.names if names is None else names)
    model = built.model
    tensors = [p.detach() for p in built.select(names)]
    constants = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    args = built.inputs if isinstance(built.inputs, tuple) else (built.inputs,)
    shape: list[tuple[int, ...]] = []

    def f(theta: Tensor) -> Tensor:
        params = {**constants, **dict(zip(names, unflat(theta, tensors)))}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        out = functional_call(model, (params, buffers), args)
        shape.append(tuple(out.shape))
        return out.reshape(-1)

    with oracle_context():
        torch.manual_seed(0)
        H = jacrev(jacrev(f))(flat(tensors))
    return H, shape[0]


def finite_difference_hessian(
    fn: Callable[..., Tensor],
    tensors: Sequence[Tensor],
    rows: Sequence[int] | None = None,
    eps: float = 1e-3,
) -> Tensor:
    r"""Rows of the Hessian from central differences of first-order autograd gradients.

    Row :math:`r` is :math:`(g(\theta + h e_r) - g(\theta - h e_r)) / 2h`, Richardson-
    extrapolated from the steps :math:`h` and :math:`h/2` (truncation error :math:`O(h^4)`),
    independent of ``torch.func`` and of double backward. Every evaluation runs with the global
    RNG forked and reset to the state at the call, so a dropout model keeps its masks.

    Args:
        fn: Pure function of ``tensors`` returning a scalar.
        tensors: The point.
        rows: Flat indices of the rows to compute (default: all).
        eps: The step :math:`h`.

    Returns:
        A ``(len(rows), P)`` tensor.
    """
    tensors = [t.detach() for t in tensors]
    theta = flat(tensors)
    rows = range(theta.numel()) if rows is None else rows
    state = torch.get_rng_state()

    def grad(point: Tensor) -> Tensor:
        point = point.clone().requires_grad_(True)
        with torch.random.fork_rng(), sdpa_kernel([SDPBackend.MATH]):
            torch.set_rng_state(state)
            (g,) = torch.autograd.grad(fn(*unflat(point, tensors)), point)
        return g

    def central(step: float) -> Tensor:
        out = []
        for r in rows:
            e = torch.zeros_like(theta)
            e[r] = step
            out.append((grad(theta + e) - grad(theta - e)) / (2 * step))
        return torch.stack(out)

    return (4 * central(eps / 2) - central(eps)) / 3


# ----------------------------------------------------------------------------- activations


def split_loss(
    model: torch.nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: object,
    targets: Tensor,
    modules: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[Callable[..., Tensor], list[Tensor]]:
    """A batch's loss as a pure function of perturbations of module outputs or inputs.

    With ``modules`` (names of ``named_modules``; ``""`` the model), a forward hook adds the
    ``i``-th argument to the output of module ``i`` (the model split at that module: the rest
    of the pass computes from the perturbed output); without, the arguments are added to the
    floating-point tensors of ``inputs`` (a tensor or a tuple). Every call runs
    ``functional_call`` on fresh buffer copies with the global RNG seeded to ``seed``.

    Returns:
        The function and the point (zeros shaped like the perturbed tensors).
    """
    named = dict(model.named_modules())
    params = {n: p.detach() for n, p in model.named_parameters()}
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    floating = [i for i, a in enumerate(args) if a.is_floating_point()]

    def run(perturbations: Sequence[Tensor]) -> Tensor:
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        hooks = []
        call = args
        if modules is None:
            added = dict(zip(floating, perturbations))
            call = tuple(a + added[i] if i in added else a for i, a in enumerate(args))
        else:
            for name, e in zip(modules, perturbations):
                hook = named[name].register_forward_hook(lambda m, a, out, e=e: out + e)
                hooks.append(hook)
        try:
            torch.manual_seed(seed)
            return loss_fn(functional_call(model, (params, buffers), call), targets)
        finally:
            for hook in hooks:
                hook.remove()

    if modules is None:
        point = [torch.zeros_like(args[i]) for i in floating]
    else:
        found: dict[str, Tensor] = {}
        hooks = [
            named[name].register_forward_hook(
                lambda m, a, out, name=name: found.setdefault(name, out.detach())
            )
            for name in modules
        ]
        try:
            with torch.random.fork_rng(), torch.no_grad():
                run([])
        finally:
            for hook in hooks:
                hook.remove()
        point = [torch.zeros_like(found[name]) for name in modules]
    return (lambda *perturbations: run(perturbations)), point


def block_diagonal(blocks: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """The block-diagonal matrix of ``weights[b] * blocks[b]``."""
    return torch.block_diag(*[w * B for w, B in zip(weights, blocks)])


def variable_hessian(
    model: torch.nn.Module,
    loss_fn: Callable[..., Tensor],
    batches: Sequence[tuple[object, Tensor]],
    modules: Sequence[str] | None = None,
    seed: int = 0,
) -> Tensor:
    r"""The Hessian of the mean loss over ``batches`` w.r.t. activations (or inputs).

    Batch ``b``'s variables are its own (block diagonal over batches), weighted by
    :math:`n_b / N`; batch ``b`` runs under RNG seed ``seed + b``. Rows in flat order: batch
    by batch, the perturbed tensors of :func:`split_loss` in order, each row-major.
    """
    sizes = [(x[0] if isinstance(x, tuple) else x).shape[0] for x, _ in batches]
    blocks = []
    for b, (x, y) in enumerate(batches):
        fn, point = split_loss(model, loss_fn, x, y, modules, seed + b)
        blocks.append(hessian(fn, point))
    return block_diagonal(blocks, [n / sum(sizes) for n in sizes])
