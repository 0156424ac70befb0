r"""Parameter utilities: select a model's parameters by name, flatten and unflatten vectors.

A vector *like params* is a list with one tensor per parameter, of that parameter's shape.
Its *flat* form is one 1-D tensor of length :math:`P = \sum_i` ``params[i].numel()``, the
parameters in order, each flattened row-major (the order of
:func:`torch.nn.utils.parameters_to_vector`).
"""

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor, nn

from torch_secorder import _flat
from torch_secorder._checks import as_params, check_module, check_tensor, type_name
from torch_secorder._types import ParamSelection

__all__ = ["flatten", "select_params", "unflatten"]


def select_params(model: nn.Module, params: ParamSelection = None) -> dict[str, nn.Parameter]:
    """Select parameters of a model by name or glob pattern.

    Names are those of :meth:`torch.nn.Module.named_parameters` (a parameter shared by several
    modules appears once, under its first name). Patterns follow :mod:`fnmatch` (``*`` also
    matches dots), so ``"*.weight"`` selects every weight and ``"encoder.*"`` a sub-module.

    Args:
        model: The model whose parameters to select.
        params: ``None`` for all parameters with ``requires_grad=True``; a name or pattern; or a
            list of names and patterns (any iterable: a tuple, a generator). Every entry must
            match at least one parameter. An explicit selection may include frozen parameters.

    Returns:
        The selected parameters by name, in the model's order.

    Raises:
        TypeError: If ``model`` is not a module or ``params`` not a string or list of strings.
        ValueError: If an entry matches no parameter (saying so when it names the second name
            of a shared parameter, as a decoder tied to an embedding), or nothing is selected.

    Example:
        >>> import torch
        >>> from torch_secorder import select_params
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        >>> list(select_params(model, "*.weight"))
        ['0.weight', '1.weight']
        >>> list(select_params(model, ["1.*", "0.bias"]))
        ['0.bias', '1.weight', '1.bias']
    """
    check_module("select_params", "model", model)
    return selection(model, params, module_tree(model))


def selection(
    model: nn.Module, params: ParamSelection, tree: list[tuple[str, nn.Module]]
) -> dict[str, nn.Parameter]:
    """:func:`select_params` of a checked module, given its :func:`module_tree`."""
    named = _named_parameters(model, tree)
    if params is None:
        selected = {name: p for name, p in named.items() if p.requires_grad}
        if not selected:
            raise ValueError(
                "select_params: the model has no parameters with requires_grad=True; "
                "select parameters by name with params=."
            )
        return selected
    if not isinstance(params, str | Iterable) or isinstance(params, Tensor | nn.Module):
        raise TypeError(
            "select_params: params must be None, a name or glob pattern, or a list of them; "
            f"got {type(params).__name__}."
        )
    patterns = [params] if isinstance(params, str) else list(params)
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise TypeError(
                f"select_params: params[{i}] must be a name or glob pattern (str); "
                f"got {type(pattern).__name__}."
            )
    if not patterns:
        raise ValueError("select_params: params is an empty list; expected names or patterns.")
    chosen: set[str] = set()
    for pattern in patterns:
        matches = [name for name in named if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            tied = shared_names(model, pattern)
            if tied:
                name, first = tied[0]
                raise ValueError(
                    f"select_params: params entry {pattern!r} names {name!r}, a parameter shared "
                    f"with {first!r} (tied weights), which is selected under its first name; "
                    f"pass {first!r}."
                )
            available = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
            raise ValueError(
                f"select_params: params entry {pattern!r} matches no parameter of the model; "
                f"its parameters are: {available or 'none'}."
            )
        chosen.update(matches)
    return {name: p for name, p in named.items() if name in chosen}


def module_tree(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules())``: each module once, under its first qualified name, in order.

    Walked with a list rather than through ``named_modules``'s nested generators; a model with
    a module whose class defines its own ``named_modules`` is asked for it.
    """
    tree: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        if type(module).named_modules is not nn.Module.named_modules:
            return list(model.named_modules())
        if id(module) in seen:
            continue
        seen.add(id(module))
        tree.append((prefix, module))
        stack.extend(
            (f"{prefix}.{name}" if prefix else name, child)
            for name, child in reversed(module._modules.items())
            if child is not None
        )
    return tree


def _named_parameters(model: nn.Module, tree: list[tuple[str, nn.Module]]) -> dict[str, Tensor]:
    """``dict(model.named_parameters())``, read off the model's :func:`module_tree`."""
    if type(model).named_parameters is not nn.Module.named_parameters:
        return dict(model.named_parameters())
    named: dict[str, Tensor] = {}
    seen: set[int] = set()
    for prefix, module in tree:
        for key, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                named[f"{prefix}.{key}" if prefix else key] = p
    return named


def shared_names(model: nn.Module, pattern: str) -> list[tuple[str, str]]:
    """``(name, first name)`` of the shared parameters whose other names match ``pattern``."""
    first = {id(p): name for name, p in model.named_parameters()}
    return [
        (name, first[id(p)])
        for name, p in model.named_parameters(remove_duplicate=False)
        if first[id(p)] != name and fnmatch.fnmatchcase(name, pattern)
    ]


def flatten(tensors: Iterable[Tensor], *, batched: bool = False) -> Tensor:
    """Concatenate tensors like params into one flat vector.

    Args:
        tensors: One tensor per parameter, in parameter order (any iterable:
            ``model.parameters()`` too); with ``batched=True`` each has a leading dimension
            ``k`` (the same for all).
        batched: Keep the leading dimension: the result is ``(k, P)`` instead of ``(P,)``.

    Returns:
        The flat vector of shape ``(P,)``, or ``(k, P)`` when ``batched``.

    Raises:
        TypeError: If ``tensors`` is a single tensor or not an iterable of tensors.
        ValueError: If ``tensors`` is empty or, with ``batched``, the leading dimensions differ.

    Example:
        >>> import torch
        >>> from torch_secorder import flatten
        >>> flatten([torch.ones(2, 2), torch.zeros(1)])
        tensor([1., 1., 1., 1., 0.])
    """
    fname = "flatten"
    if isinstance(tensors, (Tensor, str, Mapping)) or not isinstance(tensors, Iterable):
        raise TypeError(
            f"{fname}: tensors must be an iterable of tensors (one per parameter); got "
            f"{type_name(tensors)}."
        )
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{fname}: tensors is empty; expected at least one tensor.")
    for i, t in enumerate(tensors):
        check_tensor(fname, f"tensors[{i}]", t)
    if batched:
        k = tensors[0].shape[0] if tensors[0].dim() else None
        for i, t in enumerate(tensors):
            if not t.dim():
                raise ValueError(
                    f"{fname}: tensors[{i}] is 0-d; with batched=True every tensor needs a "
                    "leading dimension k (a parameter's 0-d vectors stacked have shape (k,))."
                )
            if t.shape[0] != k:
                raise ValueError(
                    f"{fname}: tensors[{i}] has shape {tuple(t.shape)} but tensors[0] has shape "
                    f"{tuple(tensors[0].shape)}; with batched=True every tensor needs the same "
                    "leading dimension k."
                )
    return _flat.join(tensors, batched=batched)


def unflatten(vector: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors like params (views of ``vector``).

    Args:
        vector: A flat vector of shape ``(P,)``, or a stack of ``k`` of them, ``(k, P)``.
        params: The parameters giving the shapes (any iterable of tensors).

    Returns:
        A list with one tensor per parameter: ``params[i].shape``, or ``(k, *params[i].shape)``
        for a stack.

    Raises:
        TypeError: If ``vector`` is not a tensor or ``params`` not an iterable of tensors.
        ValueError: If the shape of ``vector`` does not fit ``params``.

    Example:
        >>> import torch
        >>> from torch_secorder import unflatten
        >>> [t.shape for t in unflatten(torch.arange(5.0), [torch.ones(2, 2), torch.ones(1)])]
        [torch.Size([2, 2]), torch.Size([1])]
    """
    fname = "unflatten"
    check_tensor(fname, "vector", vector)
    params = as_params(fname, params)
    numel = sum(p.numel() for p in params)
    if vector.dim() not in (1, 2) or vector.shape[-1] != numel:
        raise ValueError(
            f"{fname}: vector has shape {tuple(vector.shape)}; expected ({numel},) or "
            f"(k, {numel}) for params with {numel} elements in total."
        )
    return _flat.split(vector, params)
