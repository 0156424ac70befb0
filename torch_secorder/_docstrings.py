"""Descriptions of arguments that several public functions share, filled into their docstrings.

A docstring line holding only ``{name}`` is replaced by :data:`ARGUMENTS` ``[name]``, indented
as that line, when the module defining the function is imported; ``help`` and the API
reference show the filled docstring. One description per argument keeps the functions that
take it saying the same thing.
"""

import re
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

ARGUMENTS = {
    "model_data": """\
model: The model.
loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
data: One ``(inputs, targets)`` batch or an iterable of batches (e.g. a DataLoader).
params: Parameter selection by names or glob patterns (``None``: all trainable).
groups: ``None`` (whole selection), ``"module"`` (one group per module owning
    selected parameters, by :meth:`~torch.nn.Module.named_modules` name; the
    parameters the model owns itself form the group ``""``, the model's name there),
    ``"parameter"`` (one per parameter), or a dict name -> parameter names/patterns. A parameter
    shared by several modules (tied weights) counts once, under its first name in
    :meth:`~torch.nn.Module.named_parameters` and in the first module owning it;
    patterns match those names.""",
    "model_wrt": """\
wrt: What the Hessian is taken with respect to: ``"params"`` (default), ``"activations"``
    (the outputs of ``modules``) or ``"inputs"`` (the floating-point input tensors), the
    operator of :meth:`HessianOperator.from_model
    <torch_secorder.HessianOperator.from_model>`, block diagonal over batches. ``params``
    applies to ``"params"`` only. For activations and inputs ``groups`` takes ``None``,
    ``"module"`` (activations) or ``"input"`` (inputs), one group per variable, a dict
    name -> module names or patterns (activations), or ``"sample"``: one group per sample
    (keys ``0, 1, ...`` in data order), its block of :math:`N H`, the Hessian of the
    sample's own loss where the samples are independent. Vectors in results (eigenvectors,
    diagonals) come as lists like the group's variables: one tensor per batch and variable,
    per variable for a sample.
modules: Module names of :meth:`~torch.nn.Module.named_modules` or glob patterns, for
    ``wrt="activations"`` (each called once per forward pass, returning one tensor).""",
    "model_run": """\
generator: Source of randomness; ``None`` uses a private generator with a fixed seed
    (reproducible), the global RNG is never touched. With groups, each group draws
    from its own generator derived from it, in group order.
seed: Batch ``b`` runs under RNG seed ``seed + b`` (dropout masks), as for
    :meth:`HessianOperator.from_model <torch_secorder.HessianOperator.from_model>`
    and the core model forms (seed ``0`` for their one batch).
distributed: Sum products over processes; ``None`` does so when
    :mod:`torch.distributed` is initialized.
progress: Show a progress bar over the analysis's products, with the time left (needs
    ``tqdm``).""",
    "closure_or_operator": """\
func_or_operator: A zero-argument loss closure (then ``params`` is required) or an
    operator with ``matmat``, ``shape``, ``dtype`` and ``device`` (such as
    :class:`~torch_secorder.HessianOperator`).
params: Parameters of the closure (any iterable of tensors); ``None`` for an operator.""",
    "max_bytes": """\
max_bytes: Memory the analysis may take for the vectors it holds and one chunk of
    products (see the memory model in ``docs/scaling.rst``); ``None``: a fifth of the
    machine's memory (of a GPU's total memory). It plans within it (a smaller sketch or
    basis, fewer probes at a time) or refuses before any product.""",
    "model_outputs": """\
model: The model, returning one tensor.
inputs: A tensor, a tuple of positional arguments (multi-input models), or a dict of
    keyword arguments.
params: Parameter selection by names or glob patterns (``None``: all trainable ones;
    frozen parameters take part only when named).""",
}
"""Argument descriptions in Google style, by placeholder name."""

_PLACEHOLDER = re.compile(r"^(\s*)\{(\w+)\}$")


def shared_arguments(func: F) -> F:
    """Fill the placeholders of ``func``'s docstring from :data:`ARGUMENTS` (a decorator).

    Raises:
        KeyError: On a placeholder with no description (a typo in the docstring).
    """
    lines = []
    for line in (func.__doc__ or "").splitlines():
        match = _PLACEHOLDER.match(line)
        if match is None:
            lines.append(line)
            continue
        indent, name = match.groups()
        lines.extend(indent + text if text else text for text in ARGUMENTS[name].splitlines())
    func.__doc__ = "\n".join(lines)
    return func
