"""What to differentiate: a loss closure and its parameters, from a closure or from a model.

The model forms build a closure ``loss_fn(model(inputs), targets)`` and call the closure
forms, so both share one implementation. Model state a call can touch (train/eval mode,
buffers such as BatchNorm running statistics) is restored in a ``finally``.
"""

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torch_secorder._checks import as_params, check_callable, check_inputs, check_module
from torch_secorder._types import LossClosure, ParamSelection
from torch_secorder.core._autograd import GradientGraph
from torch_secorder.core._forward import module_calling
from torch_secorder.core.params import module_tree, selection


@dataclass(frozen=True)
class Objective:
    """A loss closure with the parameters to differentiate it by.

    Attributes:
        fname: Public function name, for messages.
        func: Zero-argument closure returning the scalar loss.
        params: The parameters, validated.
        names: Their names where known (model forms), for messages.
        source: The argument that computes the loss (``"loss_fn"`` for model forms).
        seed: RNG seed of the closure's random draws (model forms: ``0``, the seed of batch
            ``0`` of :meth:`HessianOperator.from_model`, so dropout draws the same masks in
            every function); ``None`` draws from the global RNG's state, which is not
            advanced.
        locate: ``locate(op)`` names the module calling the torch function ``op`` (model
            forms), for errors about operators without a second derivative.
    """

    fname: str
    func: LossClosure
    params: list[Tensor]
    names: list[str] | None = None
    source: str = "func"
    seed: int | None = None
    locate: Callable[[str], str | None] | None = None

    def gradient(self, *, strict: bool = False) -> GradientGraph:
        """Call the closure once and keep its differentiable gradient."""
        return GradientGraph(
            self.func,
            self.params,
            fname=self.fname,
            names=self.names,
            strict=strict,
            seed=self.seed,
            source=self.source,
            locate=self.locate,
            route=False,
        )


def closure_objective(fname: str, func: object, params: object) -> Objective:
    """Validate the closure form ``(func, params)``."""
    check_callable(fname, "func", func)
    return Objective(fname, func, as_params(fname, params))  # type: ignore[arg-type]


@contextlib.contextmanager
def model_objective(
    fname: str,
    model: object,
    loss_fn: object,
    inputs: object,
    targets: object,
    params: ParamSelection,
) -> Iterator[Objective]:
    """Validate the model form and yield its objective; the model's state is restored after."""
    check_module(fname, "model", model)
    tree = module_tree(model)  # type: ignore[arg-type]
    names, tensors = model_params(fname, model, params, tree)
    check_callable(fname, "loss_fn", loss_fn)
    check_inputs(fname, "inputs", inputs)
    modules = [module for _, module in tree]  # one walk for the selection, state and buffers
    func = batch_loss(model, loss_fn, inputs, targets, modules)  # type: ignore[arg-type]
    with preserved_state(model, modules):  # type: ignore[arg-type]
        locate = operator_locator(model, inputs)  # type: ignore[arg-type]
        yield Objective(fname, func, tensors, names, "loss_fn", seed=0, locate=locate)


def model_params(
    fname: str,
    model: object,
    params: ParamSelection,
    tree: list[tuple[str, nn.Module]] | None = None,
) -> tuple[list[str], list[Tensor]]:
    """Select the parameters of a model, with messages naming the public function.

    ``tree``: the model's :func:`~.params.module_tree`, where known (the model then checked).
    """
    if tree is None:
        check_module(fname, "model", model)
        tree = module_tree(model)  # type: ignore[arg-type]
    try:
        selected = selection(model, params, tree)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("select_params:", f"{fname}:", 1)) from None
    names, tensors = list(selected), list(selected.values())
    if not all(p.is_floating_point() for p in tensors):  # (distinct parameters by selection)
        as_params(fname, tensors, names)  # raises, naming the parameter
    return names, tensors


def call_model(model: Callable[..., object], inputs: object) -> object:
    """Call ``model`` on a tensor, a tuple/list of arguments or a dict of keyword arguments."""
    if isinstance(inputs, Tensor):  # (first: a check against an abstract class is not free)
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_loss(
    model: nn.Module,
    loss_fn: Callable[[object, object], Tensor],
    inputs: object,
    targets: object,
    modules: list[nn.Module] | None = None,
) -> LossClosure:
    """The closure ``loss_fn(model(inputs), targets)``, run on copies of the model's buffers.

    Each call runs the forward pass under :func:`private_buffers`, so what the pass does to
    buffers (BatchNorm updating its running statistics in train mode) happens to copies: the
    model's own buffers are never written, and a gradient graph that saved buffers for
    backward stays valid however long it is kept. ``modules``: the model's modules, where
    known for the closure's lifetime.
    """

    def func() -> Tensor:
        with private_buffers(model, modules):
            return loss_fn(call_model(model, inputs), targets)

    return func


def operator_locator(model: nn.Module, inputs: object) -> Callable[[str], str | None]:
    """Return ``locate(op)``, naming the module of ``model`` that calls ``op`` on ``inputs``."""

    def locate(op: str) -> str | None:
        def run() -> None:
            with private_buffers(model):
                call_model(model, inputs)

        return module_calling(model, run, op)

    return locate


class private_buffers:  # noqa: N801 - used as a context manager, as torch.no_grad
    """Give every module a fresh copy of its buffers for the block, and its own back after.

    The buffers themselves are neither written nor replaced (their values and version
    counters stay as they are); a buffer registered in several modules gets one shared copy.
    ``modules``: ``list(model.modules())``, where known. (A class rather than a generator:
    it runs around every forward pass.)
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module] | None = None) -> None:
        self.slots = [
            (module, name, buf)
            for module in (model.modules() if modules is None else modules)
            for name, buf in module._buffers.items()
            if buf is not None
        ]

    def __enter__(self) -> None:
        copies: dict[int, Tensor] = {}
        for module, name, buf in self.slots:
            if id(buf) not in copies:
                copies[id(buf)] = buf.detach().clone()
            module._buffers[name] = copies[id(buf)]

    def __exit__(self, *exc: object) -> None:
        for module, name, buf in self.slots:
            module._buffers[name] = buf


class preserved_state:  # noqa: N801 - used as a context manager, as torch.no_grad
    """Restore every module's train/eval mode, every buffer object, and renormed embeddings.

    Forward passes of the library run on copies of the buffers (:func:`batch_loss`); this
    guards against a forward that switches modes or re-registers buffers, and restores the
    weights an embedding with ``max_norm`` renormalises in place (its forward does, before the
    lookup) where they changed. ``modules``: ``list(model.modules())``, where known.
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module] | None = None) -> None:
        self.modules = list(model.modules()) if modules is None else modules

    def __enter__(self) -> None:
        modules = self.modules
        self.modes = [m.training for m in modules]
        self.buffers = [(m, name, buf) for m in modules for name, buf in m._buffers.items()]
        self.renormed = [
            (m.weight, m.weight.detach().clone())
            for m in modules
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
        ]

    def __exit__(self, *exc: object) -> None:
        for module, name, buf in self.buffers:
            module._buffers[name] = buf
        for weight, saved in self.renormed:
            if not torch.equal(weight, saved):
                with torch.no_grad():
                    weight.copy_(saved)
        for module, training in zip(self.modules, self.modes):
            if module.training != training:  # (setting a module's attribute is not free)
                module.training = training
