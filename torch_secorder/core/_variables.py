r"""What a Hessian over activations or inputs differentiates by: modules, inputs, probes.

``wrt`` chooses the variables (:data:`WRT`): the parameters, the outputs of modules chosen by
name or glob pattern (:func:`select_modules`), or the floating-point tensors of a batch's
inputs (:func:`input_slots`). :class:`Probes` adds a zero probe to each chosen module's output
by a forward hook (or, without probes, records the outputs of a first pass);
:func:`with_probes` adds them to inputs. The products are those of :mod:`._activations`.
"""

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from torch_secorder._checks import check_choice, type_name
from torch_secorder.core._structured.graph import ProbedOutput, consumers

if TYPE_CHECKING:
    from torch_secorder.core.operator import HessianOperator

WRT = ("params", "activations", "inputs")
"""What a model's Hessian may be taken with respect to."""


@dataclass(frozen=True)
class Variables:
    """What a model form differentiates by when it is not the parameters.

    Attributes:
        wrt: ``"activations"`` or ``"inputs"``.
        modules: The module selection (activations), as given.
        operator: An operator already built for them, reused by the analysis.
    """

    wrt: str
    modules: object = None
    operator: "HessianOperator | None" = None


def variables_of(fname: str, params: object, wrt: object, modules: object) -> Variables | None:
    """Check ``wrt`` with ``params`` and ``modules``; ``None`` for the parameters.

    Raises:
        TypeError: If ``wrt`` is not a string or ``modules`` not a name or list of names.
        ValueError: If ``wrt`` is unknown, ``params`` is given for activations or inputs,
            ``modules`` is missing for activations or given otherwise.
    """
    check_choice(fname, "wrt", wrt, WRT)
    if wrt != "activations" and modules is not None:
        raise ValueError(
            f"{fname}: modules selects the modules whose outputs to differentiate by, for "
            f"wrt='activations'; got modules={modules!r} with wrt={wrt!r}."
        )
    if wrt == "params":
        return None
    if params is not None:
        hint = ", and choose modules with modules=" if wrt == "activations" else ""
        raise ValueError(
            f"{fname}: params selects parameters, which wrt={wrt!r} does not differentiate by; "
            f"got params={params!r}. Leave params=None{hint}."
        )
    if wrt == "activations":
        _patterns(fname, modules)
    return Variables(wrt, modules)  # type: ignore[arg-type]


def _patterns(fname: str, modules: object) -> list[str]:
    if modules is None:
        raise ValueError(
            f"{fname}: wrt='activations' needs modules=, the names (or glob patterns) of the "
            "modules whose outputs to differentiate by; got None."
        )
    patterns = [modules] if isinstance(modules, str) else modules
    if not isinstance(patterns, (list, tuple)):
        raise TypeError(
            f"{fname}: modules must be a module name or glob pattern, or a list of them; got "
            f"{type_name(modules)}."
        )
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise TypeError(
                f"{fname}: modules[{i}] must be a module name or glob pattern (str); got "
                f"{type_name(pattern)}."
            )
    if not patterns:
        raise ValueError(f"{fname}: modules is an empty list; expected module names or patterns.")
    return list(patterns)


def select_modules(fname: str, model: nn.Module, modules: object) -> list[tuple[str, nn.Module]]:
    """The modules named or matched by ``modules``, in the model's order.

    Names are those of :meth:`~torch.nn.Module.named_modules`; patterns follow
    :mod:`fnmatch` and never match the model itself, which only ``""`` selects.

    Raises:
        ValueError: If an entry matches no module.
    """
    patterns = _patterns(fname, modules)
    named = dict(model.named_modules())
    chosen: set[str] = set()
    for pattern in patterns:
        matches = [
            name
            for name in named
            if name == pattern or (name and fnmatch.fnmatchcase(name, pattern))
        ]
        if not matches:
            listed = [name for name in named if name]
            available = ", ".join(listed[:8]) + (", ..." if len(listed) > 8 else "")
            raise ValueError(
                f"{fname}: modules entry {pattern!r} matches no module of the model; its "
                f"modules are: {available or 'none'}."
            )
        chosen.update(matches)
    return [(name, module) for name, module in named.items() if name in chosen]


class Probes:
    """Forward hooks on the chosen modules: record their outputs, or add a probe to each.

    With ``probes`` (one per module), the first call of each module returns its output plus
    the probe, if the output is a tensor of the probe's shape, dtype and device; anything else
    is recorded in :attr:`mismatch`. Without, the hooks only count calls and record outputs.
    Adding a probe makes a new tensor for the rest of the pass; :meth:`altered` finds the
    modules whose output, held elsewhere, was modified in place later, through the new
    tensor (the holder would no longer see the modification) or through the holder (the rest
    of the pass would not), as :class:`~torch_secorder.core._structured.engine._Probes` does.
    """

    def __init__(self, modules: list[tuple[str, nn.Module]], probes: list[Tensor] | None) -> None:
        self.modules, self.probes = modules, probes
        self.calls = [0] * len(modules)
        self.outputs: list[object] = [None] * len(modules)
        self.mismatch: int | None = None
        self.watched: list[tuple[ProbedOutput, int]] = []
        self.nodes: list[tuple[object, object, int]] = []  # (output's node, probed one, module)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "Probes":
        for i, (_, module) in enumerate(self.modules):
            self.handles.append(module.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, i: int) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: object, output: object) -> Tensor | None:
            self.calls[i] += 1
            if self.calls[i] > 1:
                return None
            if self.probes is None:
                self.outputs[i] = output
                return None
            probe = self.probes[i]
            if (
                not isinstance(output, Tensor)
                or output.shape != probe.shape
                or output.dtype != probe.dtype
                or output.device != probe.device
            ):
                self.mismatch = i if self.mismatch is None else self.mismatch
                return None
            summed = output + probe
            if output.grad_fn is not None and all(output is not a for a in _tensors(args)):
                self.nodes.append((output.grad_fn, summed.grad_fn, i))
            self.watched.append((ProbedOutput(output, summed), i))
            return summed

        return hook

    def read_elsewhere(self, loss: Tensor) -> list[int]:
        """The modules whose output (a new tensor) the loss also reads other than probed.

        A forward hook that ran before the probe's, or the module's caller keeping a reference
        it got another way, holds the output without the probe: what reads it there does not
        see a perturbation of the output.
        """
        users = consumers(loss.grad_fn)
        return [
            i
            for output, probed, i in self.nodes
            if any(u is not probed for u in users.get(output, ()))
        ]

    def altered(self) -> list[int]:
        """The modules whose probed output was modified in place while held elsewhere."""
        return [i for probed, i in self.watched if probed.altered()]


def _tensors(args: object) -> list[Tensor]:
    """The tensors among a module's positional arguments."""
    values = args if isinstance(args, tuple | list) else (args,)
    return [a for a in values if isinstance(a, Tensor)]


def input_slots(inputs: object) -> list[tuple[str, object]]:
    """``(label, key)`` of each floating-point tensor of a batch's inputs (key ``None``: all)."""
    if isinstance(inputs, Tensor):
        return [("inputs", None)] if inputs.is_floating_point() else []
    items = inputs.items() if isinstance(inputs, Mapping) else enumerate(inputs)  # type: ignore[arg-type]
    return [
        (f"inputs[{key!r}]", key)
        for key, value in items
        if isinstance(value, Tensor) and value.is_floating_point()
    ]


def input_values(inputs: object, slots: list[tuple[str, object]]) -> list[Tensor]:
    if slots and slots[0][1] is None:
        return [inputs]  # type: ignore[list-item]
    return [inputs[key] for _, key in slots]  # type: ignore[index]


def with_probes(inputs: object, slots: list[tuple[str, object]], probes: list[Tensor]) -> object:
    """The inputs with each floating-point tensor replaced by itself plus its probe."""
    if slots and slots[0][1] is None:
        return inputs + probes[0]  # type: ignore[operator]
    added = {key: probe for (_, key), probe in zip(slots, probes)}
    if isinstance(inputs, Mapping):
        return {key: value + added[key] if key in added else value for key, value in inputs.items()}
    values = [value + added[i] if i in added else value for i, value in enumerate(inputs)]  # type: ignore[arg-type]
    return type(inputs)(values) if isinstance(inputs, list) else tuple(values)
