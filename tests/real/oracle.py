"""The oracle of the real-architecture tier: plain double backward, written here.

Nothing here uses the library or ``torch.func`` (whose derivative transforms are wrong through
``F.layer_norm`` and train-mode ``F.batch_norm``). Every forward pass runs on a deep copy of
the model, so the model under test is never touched, in the library's convention for the
random numbers it draws: batch ``b`` of a data set under seed ``b`` in a forked RNG (the one
batch of a core model form is batch ``0``), attention on the math kernel.

``F.hardsigmoid`` has no double backward in PyTorch; while the oracle runs the model it is
replaced by its exact elementwise form :math:`\\operatorname{clamp}(x + 3, 0, 6) / 6`
(:func:`hardsigmoid`; ``test_oracle.py`` checks it against the original), so the oracle also
holds for the MobileNet.

* :func:`hessian`: the dense Hessian of the mean loss over a data set with respect to named
  parameters, :math:`\\frac1N \\sum_b n_b H_b`, one ``torch.autograd.grad`` per row of the
  differentiable gradient.
* :func:`hvp`: a Hessian-vector product over a data set by double backward, for whole-model
  results (eigen-residuals, products with all parameters).
* :func:`gradient`: the gradient at shifted parameters, for finite differences of the oracle.
* :func:`arch_hessian`: an architecture's subset Hessian on its one batch or its data set,
  from per-batch Hessians cached for the session (:func:`batch_hessian`).
* :func:`variable_hessian`: the Hessian of the mean loss over a data set with respect to
  perturbations added to the outputs of named modules (or to the floating-point inputs),
  block diagonal over the batches with weights :math:`n_b / N`, by double backward; where
  the forward pass draws random numbers (dropout) it holds the masks of the library's seeds,
  which ``torch.func`` does not reproduce through ``nn.LSTM`` and attention.
"""

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.real.models import Arch, build

__all__ = [
    "arch_hessian",
    "batch_hessian",
    "flat",
    "forward_context",
    "gradient",
    "hardsigmoid",
    "hessian",
    "hvp",
    "names_of",
    "random_like",
    "unflat",
    "variable_hessian",
]

Batch = tuple[Tensor | tuple[Tensor, ...], Tensor]
"""``(inputs, targets)``; a tuple of inputs is the model's positional arguments."""
LossFn = Callable[[Tensor, Tensor], Tensor]


def hardsigmoid(x: Tensor, inplace: bool = False) -> Tensor:
    """``F.hardsigmoid`` as a composition with a double backward (values and derivatives agree
    everywhere except at the kinks ``x = -3, 3``)."""
    if inplace:
        raise NotImplementedError("the oracle's hardsigmoid is out of place")
    return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


@contextlib.contextmanager
def forward_context(seed: int) -> Iterator[None]:
    """Seed ``seed`` in a forked RNG, math attention, a twice-differentiable hardsigmoid."""
    with (
        torch.random.fork_rng(),
        sdpa_kernel(SDPBackend.MATH),
        mock.patch.object(F, "hardsigmoid", hardsigmoid),
        torch.enable_grad(),
    ):
        torch.manual_seed(seed)
        yield


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors, each flattened row-major."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped like ``like``."""
    out, offset = [], 0
    for t in like:
        out.append(vector[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()
    assert offset == vector.numel()
    return out


def names_of(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    """``names``, or the names of all trainable parameters in model order."""
    if names is not None:
        return list(names)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def random_like(model: nn.Module, names: Sequence[str] | None, seed: int) -> list[Tensor]:
    """A random vector like the named parameters, from its own generator."""
    g = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    return [
        torch.randn(named[n].shape, generator=g, dtype=named[n].dtype)
        for n in names_of(model, names)
    ]


def _batch_size(batch: Batch) -> int:
    inputs = batch[0]
    return (inputs[0] if isinstance(inputs, tuple) else inputs).shape[0]


def _loss_and_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    seed: int,
    names: Sequence[str] | None,
    *,
    create_graph: bool,
    shift: Sequence[Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of a fresh copy of ``model`` (shifted by ``shift``) and the gradient."""
    twin = copy.deepcopy(model)
    named = dict(twin.named_parameters())
    params = [named[n] for n in names_of(model, names)]
    if shift is not None:
        with torch.no_grad():
            for p, s in zip(params, shift):
                p.add_(s)
    inputs, targets = batch
    with forward_context(seed):
        outputs = twin(*inputs) if isinstance(inputs, tuple) else twin(inputs)
        loss = loss_fn(outputs, targets)
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return params, grads


def hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    names: Sequence[str] | None,
    seeds: Sequence[int] | None = None,
) -> Tensor:
    """Dense Hessian of the mean loss over ``batches`` (batch ``b`` under seed ``seeds[b]``,
    by default ``b``)."""
    total = None
    count = 0
    seeds = range(len(batches)) if seeds is None else seeds
    for batch, seed in zip(batches, seeds, strict=True):
        params, grads = _loss_and_gradient(model, loss_fn, batch, seed, names, create_graph=True)
        g = flat(grads)
        rows = []
        for i in range(g.numel()):
            if not g.requires_grad:
                rows.append(torch.zeros_like(g))
                continue
            row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
            rows.append(
                flat([torch.zeros_like(p) if r is None else r for p, r in zip(params, row)])
            )
        H_b = torch.stack(rows)
        n_b = _batch_size(batch)
        total = n_b * H_b if total is None else total + n_b * H_b
        count += n_b
    return total / count


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    v: Sequence[Tensor],
    names: Sequence[str] | None = None,
) -> list[Tensor]:
    """:math:`Hv` of the mean loss over ``batches`` with respect to the named parameters."""
    total = None
    count = 0
    for b, batch in enumerate(batches):
        params, grads = _loss_and_gradient(model, loss_fn, batch, b, names, create_graph=True)
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        products = [torch.zeros_like(p) for p in params]
        if live:
            parts = torch.autograd.grad(
                [grads[i] for i in live], params, [v[i] for i in live], allow_unused=True
            )
            products = [torch.zeros_like(p) if r is None else r for p, r in zip(params, parts)]
        n_b = _batch_size(batch)
        scaled = [n_b * r for r in products]
        total = scaled if total is None else [t + s for t, s in zip(total, scaled)]
        count += n_b
    return [t / count for t in total]


def gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    names: Sequence[str] | None,
    shift: Sequence[Tensor] | None = None,
) -> Tensor:
    """Flat gradient of the mean loss over ``batches`` at the named parameters plus ``shift``."""
    total = None
    count = 0
    for b, batch in enumerate(batches):
        _, grads = _loss_and_gradient(
            model, loss_fn, batch, b, names, create_graph=False, shift=shift
        )
        n_b = _batch_size(batch)
        total = n_b * flat(grads) if total is None else total + n_b * flat(grads)
        count += n_b
    return total / count


@functools.cache
def batch_hessian(name: str, mode: str, index: int) -> Tensor:
    """The oracle Hessian of an architecture's subset on batch ``index`` of its data set."""
    arch: Arch = build(name, mode)
    return hessian(arch.model, arch.loss_fn, [arch.batches[index]], arch.subset, seeds=[index])


def arch_hessian(name: str, mode: str, kind: str) -> Tensor:
    """The oracle Hessian of an architecture's subset: ``kind`` ``"batch"`` (the one batch,
    the data set's first, seed 0) or ``"batches"`` (the mean over the data set)."""
    arch: Arch = build(name, mode)
    if kind == "batch":
        return batch_hessian(name, mode, 0)
    sizes = [inputs.shape[0] for inputs, _ in arch.batches]
    total = sum(n * batch_hessian(name, mode, b) for b, n in enumerate(sizes))
    return total / sum(sizes)


def _variable_batch_hessian(
    model: nn.Module, loss_fn: LossFn, batch: Batch, modules: Sequence[str] | None, seed: int
) -> Tensor:
    """One batch's Hessian w.r.t. zero perturbations of module outputs (or floating inputs)."""
    twin = copy.deepcopy(model)
    named = dict(twin.named_modules())
    inputs, targets = batch
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    added: dict[str, Tensor] = {}

    def adder(name: str) -> Callable[..., Tensor]:
        def add(module: nn.Module, _: object, out: Tensor) -> Tensor:
            added[name] = torch.zeros_like(out, requires_grad=True)
            return out + added[name]

        return add

    hooks = [named[name].register_forward_hook(adder(name)) for name in modules or []]
    with forward_context(seed):
        if modules is None:
            perturbations = [torch.zeros_like(a, requires_grad=True) for a in args]
            args = tuple(a + e for a, e in zip(args, perturbations))
        loss = loss_fn(twin(*args), targets)
        for hook in hooks:
            hook.remove()
        if modules is not None:
            perturbations = [added[name] for name in modules]
        grads = torch.autograd.grad(loss, perturbations, create_graph=True, allow_unused=True)
        g = flat([torch.zeros_like(e) if d is None else d for e, d in zip(perturbations, grads)])
        rows = []
        for i in range(g.numel()):
            if not g.requires_grad:
                rows.append(torch.zeros_like(g))
                continue
            row = torch.autograd.grad(g[i], perturbations, retain_graph=True, allow_unused=True)
            rows.append(
                flat([torch.zeros_like(e) if r is None else r for e, r in zip(perturbations, row)])
            )
    return torch.stack(rows).detach()


def variable_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    modules: Sequence[str] | None = None,
) -> Tensor:
    """The mean loss's Hessian over ``batches`` w.r.t. perturbations of the outputs of
    ``modules`` (of the inputs, all floating-point, for ``None``), batch ``b`` under seed
    ``b``: block diagonal over the batches, each block weighted by :math:`n_b / N`."""
    sizes = [_batch_size(batch) for batch in batches]
    blocks = [
        _variable_batch_hessian(model, loss_fn, batch, modules, b) * n / sum(sizes)
        for b, (batch, n) in enumerate(zip(batches, sizes))
    ]
    return torch.block_diag(*blocks)
