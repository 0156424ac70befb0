"""Argument validation shared by all public functions, core and analysis alike.

Every helper receives the public function's name (``fname``) and the argument's name so
that messages read ``<function>: <argument> <what is wrong>; expected <x>, got <y>.``, and
every check runs before the first forward pass or Hessian-vector product. This module needs
nothing but torch and the leaf modules :mod:`torch_secorder._flat` and
:mod:`torch_secorder._data`; the core and the analyses import it, never the other way round.
"""

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder import _flat
from torch_secorder._data import is_batch, rng_kept

# ----------------------------------------------------------------------------- names


def type_name(obj: object) -> str:
    """The name of ``obj``'s type, as messages give it (``got float``)."""
    return type(obj).__name__


def param_label(index: int, names: Sequence[str] | None = None, argname: str = "params") -> str:
    """Name a parameter by its index and, where known, its qualified name."""
    if names is None:
        return f"{argname}[{index}]"
    return f"{argname}[{index}] ({names[index]!r})"


def format_shape(shape: Sequence[int]) -> str:
    """Format a shape as a tuple, ``(4,)`` or ``(3, 2)``."""
    return str(tuple(shape))


def format_bytes(num_bytes: float) -> str:
    """Format a byte count with a binary unit, e.g. ``7.1 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if num_bytes < 1024 or unit == "PiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- plain values


def check_callable(fname: str, argname: str, obj: object) -> None:
    """Raise ``TypeError`` unless ``obj`` is callable."""
    if not callable(obj):
        raise TypeError(f"{fname}: {argname} must be callable; got {type_name(obj)}.")


def check_bool(fname: str, argname: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"{fname}: {argname} must be a bool; got {type_name(value)}.")


def check_tensor(fname: str, argname: str, obj: object) -> None:
    """Raise ``TypeError`` unless ``obj`` is a tensor."""
    if not isinstance(obj, Tensor):
        raise TypeError(f"{fname}: {argname} must be a Tensor; got {type_name(obj)}.")


def _is_integer(value: object) -> bool:
    """An integer scalar (``int``, a NumPy integer), not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A real scalar (``int``, ``float``, NumPy's), not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(
    fname: str, argname: str, value: object, minimum: int | None = None, why: str = ""
) -> int:
    """Raise unless ``value`` is an integer (not a ``bool``), of at least ``minimum`` if given.

    Returns:
        ``value`` as an ``int`` (a NumPy integer becomes one).
    """
    if not _is_integer(value):
        raise TypeError(f"{fname}: {argname} must be an int; got {type_name(value)}.")
    value = int(value)  # type: ignore[call-overload]
    if minimum is not None and value < minimum:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{fname}: {argname} must be at least {minimum}{reason}; got {value}.")
    return value


def check_positive(fname: str, argname: str, value: object) -> float:
    """Raise unless ``value`` is a finite positive real number; return it as a ``float``."""
    if not _is_real(value):
        raise TypeError(f"{fname}: {argname} must be a positive number; got {type_name(value)}.")
    if not (math.isfinite(value) and value > 0):  # type: ignore[arg-type,operator]
        raise ValueError(f"{fname}: {argname} must be a finite positive number; got {value}.")
    return float(value)  # type: ignore[arg-type]


def check_choice(fname: str, argname: str, value: object, choices: Sequence[str]) -> str:
    """Raise unless ``value`` is one of ``choices`` (the message lists them)."""
    listed = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(
            f"{fname}: {argname} must be a str, one of {listed}; got {type_name(value)}."
        )
    if value not in choices:
        raise ValueError(f"{fname}: {argname} must be one of {listed}; got {value!r}.")
    return value


def check_generator(fname: str, generator: object) -> None:
    """Raise unless ``generator`` is ``None`` or a :class:`torch.Generator`."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fname}: generator must be None or a torch.Generator; got {type_name(generator)}."
        )


def check_chunk_size(fname: str, chunk_size: object) -> int | None:
    """Raise unless ``chunk_size`` is ``None`` or a positive integer; return it (an ``int``)."""
    if chunk_size is None:
        return None
    if not _is_integer(chunk_size):
        raise TypeError(
            f"{fname}: chunk_size must be None or a positive int; got {type_name(chunk_size)}."
        )
    if chunk_size < 1:  # type: ignore[operator]
        raise ValueError(f"{fname}: chunk_size must be a positive int; got {chunk_size}.")
    return int(chunk_size)  # type: ignore[call-overload]


def check_max_bytes(fname: str, max_bytes: object, *, optional: bool = False) -> float | None:
    """Raise unless ``max_bytes`` is a positive number (or ``None``, where ``optional``).

    Returns:
        ``max_bytes`` as an ``int`` or a ``float`` (NumPy scalars become them), or ``None``.
    """
    if optional and max_bytes is None:
        return None
    if not _is_real(max_bytes):
        raise TypeError(f"{fname}: max_bytes must be a number; got {type_name(max_bytes)}.")
    if not max_bytes > 0:  # type: ignore[operator]
        raise ValueError(f"{fname}: max_bytes must be positive; got {max_bytes}.")
    return int(max_bytes) if _is_integer(max_bytes) else float(max_bytes)  # type: ignore[arg-type]


def check_estimator(
    fname: str,
    method: object,
    num_matvecs: object,
    generator: object,
    needs: dict[str, tuple[int, str]],
    prefix: str = "",
) -> int:
    """Check an estimator's ``method``, its budget and its generator; return the budget.

    ``needs`` maps every method to the fewest products it can run with and why; ``prefix``
    comes before the argument names (``"trace_"`` for ``trace_method``).
    """
    check_choice(fname, f"{prefix}method", method, tuple(needs))
    minimum, why = needs[method]  # type: ignore[index]
    needed = f"{prefix}method={method!r} needs {why}"
    budget = check_int(fname, f"{prefix}num_matvecs", num_matvecs, minimum, needed)
    check_generator(fname, generator)
    return budget


# ----------------------------------------------------------------------------- parameters


def as_params(
    fname: str, params: object, names: Sequence[str] | None = None, *, argname: str = "params"
) -> list[Tensor]:
    """Materialise ``params`` once as a list and check each entry.

    Raises:
        TypeError: If ``params`` is a single tensor, not iterable, or holds a non-tensor.
        ValueError: If ``params`` is empty, holds a non-floating tensor or the same tensor twice.
    """
    if isinstance(params, Tensor):
        raise TypeError(
            f"{fname}: {argname} must be an iterable of tensors; got a single Tensor. "
            "Wrap it in a list: [param]."
        )
    try:
        params = list(params)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"{fname}: {argname} must be an iterable of tensors; got {type_name(params)}."
        ) from None
    if not params:
        raise ValueError(f"{fname}: {argname} is empty; expected at least one tensor.")
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        if not (isinstance(p, Tensor) and p.is_floating_point() and id(p) not in seen):
            label = param_label(i, names, argname)  # (labels only for messages: not free)
            check_tensor(fname, label, p)
            if not p.is_floating_point():
                raise ValueError(
                    f"{fname}: {label} has dtype {p.dtype}; expected a floating-point tensor."
                )
            raise ValueError(
                f"{fname}: {label} is the same tensor as "
                f"{param_label(seen[id(p)], names, argname)}; pass each parameter once."
            )
        seen[id(p)] = i
    return params


def check_layout(fname: str, what: str, labelled: Sequence[tuple[str, Tensor]], hint: str) -> None:
    """Raise unless the tensors of ``(label, tensor)`` pairs share one dtype and device."""
    _one_layout(fname, f"{what} needs params of one dtype and device", labelled, f"; {hint}")


def flat_layout(fname: str, argname: str, params: Sequence[Tensor]) -> None:
    """Flat vectors need one dtype and one device across ``params``."""
    check_layout(
        fname,
        f"a flat {argname}",
        [(f"params[{i}]", p) for i, p in enumerate(params)],
        f"pass {argname} as a list like params instead.",
    )


def _one_layout(fname: str, need: str, labelled: Sequence[tuple[str, Tensor]], ending: str) -> None:
    first_label, first = labelled[0]
    for label, t in labelled[1:]:
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"{fname}: {need}, but {first_label} is {first.dtype} on {first.device} and "
                f"{label} is {t.dtype} on {t.device}{ending}"
            )


# ----------------------------------------------------------------------------- vectors


def check_vector(
    fname: str,
    argname: str,
    v: object,
    params: Sequence[Tensor],
    names: Sequence[str] | None = None,
    *,
    batched: bool = False,
) -> tuple[list[Tensor], bool]:
    """Check a vector (or a stack of ``k`` vectors) against ``params``.

    A tensor is a flat vector, ``(P,)`` (or ``(k, P)`` when ``batched``); a list or tuple holds
    one tensor per parameter with the parameter's shape (with a leading ``k`` when ``batched``).

    Returns:
        The vector as tensors like params (with the leading ``k`` when ``batched``), and whether
        it was given flat.

    Raises:
        TypeError: If ``v`` is neither a tensor nor a list/tuple of tensors.
        ValueError: On a mismatch in length, shape, dtype or device.
    """
    if not batched and isinstance(v, (list, tuple)) and len(v) == len(params):
        for t, p in zip(v, params):  # (the common case, without the messages' numbers)
            if not (
                isinstance(t, Tensor)
                and t.shape == p.shape
                and t.dtype == p.dtype
                and t.device == p.device
            ):
                break
        else:
            return list(v), False
    numel = sum(p.numel() for p in params)
    flat_shape = f"(k, {numel})" if batched else f"({numel},)"
    if isinstance(v, Tensor):
        flat_layout(fname, argname, params)
        if v.dim() != (2 if batched else 1) or v.shape[-1] != numel:
            raise ValueError(
                f"{fname}: {argname} has shape {format_shape(v.shape)}; expected a flat tensor "
                f"of shape {flat_shape} or a list with one tensor per parameter."
            )
        _match_dtype_device(fname, argname, v, params[0], param_label(0, names))
        return _flat.split(v, params), True
    if not isinstance(v, (list, tuple)):
        raise TypeError(
            f"{fname}: {argname} must be a Tensor of shape {flat_shape} or a list of tensors "
            f"like params; got {type_name(v)}."
        )
    if len(v) != len(params):
        raise ValueError(
            f"{fname}: {argname} has {len(v)} tensors but there are {len(params)} params; "
            f"pass one tensor per parameter or a flat tensor of shape {flat_shape}."
        )
    k = None
    for i, (t, p) in enumerate(zip(v, params)):
        label = param_label(i, names)
        check_tensor(fname, f"{argname}[{i}]", t)
        expected = tuple(p.shape)
        got = tuple(t.shape)
        if batched:
            if t.dim() != p.dim() + 1 or got[1:] != expected:
                raise ValueError(
                    f"{fname}: {argname}[{i}] has shape {format_shape(got)} but {label} has "
                    f"shape {format_shape(expected)}; expected (k, *{format_shape(expected)})."
                )
            if k is None:
                k = got[0]
            elif got[0] != k:
                raise ValueError(
                    f"{fname}: {argname}[{i}] stacks {got[0]} vectors but {argname}[0] stacks "
                    f"{k}; every tensor needs the same leading dimension k."
                )
        elif got != expected:
            raise ValueError(
                f"{fname}: {argname}[{i}] has shape {format_shape(got)} but {label} has shape "
                f"{format_shape(expected)}; pass one tensor per parameter with matching shapes "
                f"or a flat tensor of length {numel}."
            )
        _match_dtype_device(fname, f"{argname}[{i}]", t, p, label)
    return list(v), False


def _match_dtype_device(fname: str, argname: str, t: Tensor, p: Tensor, label: str) -> None:
    if t.dtype != p.dtype:
        raise ValueError(
            f"{fname}: {argname} has dtype {t.dtype} but {label} has dtype {p.dtype}; "
            "expected matching dtypes."
        )
    if t.device != p.device:
        raise ValueError(
            f"{fname}: {argname} is on {t.device} but {label} is on {p.device}; "
            "expected matching devices."
        )


def check_columns(fname: str, argname: str, v: object, dim: int, operator: Any) -> None:
    """Check a ``(P,)`` vector (``dim=1``) or ``(P, k)`` columns for an operator's products.

    ``operator`` gives ``shape``, ``dtype`` and ``device``.
    """
    check_tensor(fname, argname, v)
    t: Tensor = v  # type: ignore[assignment]
    size = operator.shape[0]
    if t.dim() != dim or t.shape[0] != size:
        expected = f"({size},)" if dim == 1 else f"({size}, k)"
        raise ValueError(f"{fname}: {argname} has shape {tuple(t.shape)}; expected {expected}.")
    if t.dtype != operator.dtype or t.device != operator.device:
        raise ValueError(
            f"{fname}: {argname} is {t.dtype} on {t.device}; expected {operator.dtype} on "
            f"{operator.device}, as the operator."
        )


def check_out(fname: str, out: object, V: Tensor, operator: Any) -> None:
    """Check an ``out`` argument for the products with the columns ``V``.

    It must be like ``V`` (shape, dtype, device), each column contiguous (the products are
    written as rows, ``out.T``), and not overlap ``V``'s memory (the columns are read while
    the products are written).
    """
    check_columns(fname, "out", out, 2, operator)
    t: Tensor = out  # type: ignore[assignment]
    if t.shape != V.shape:
        raise ValueError(
            f"{fname}: out has shape {tuple(t.shape)}; expected {tuple(V.shape)}, as V."
        )
    if t.numel() and t.shape[0] > 1 and t.stride(0) != 1:
        raise ValueError(
            f"{fname}: out has strides {t.stride()}; expected contiguous columns (stride 1 "
            "along the first dimension), such as the transpose of a (k, P) tensor."
        )
    if t.numel() and V.numel() and _overlap(t, V):
        raise ValueError(f"{fname}: out overlaps V in memory; expected separate memory.")


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two ``(P, k)`` tensors may share an element: their columns' byte ranges meet.

    Columns of stride 1 are ranges of their own (rows of one matrix, interleaved, do not
    meet); other tensors count as the whole range they span.
    """
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def ranges(t: Tensor) -> list[tuple[int, int]]:
        size = t.element_size()
        if t.stride(0) == 1 or t.shape[0] == 1:
            starts = [t.data_ptr() + c * t.stride(1) * size for c in range(t.shape[1])]
            return [(start, start + t.shape[0] * size) for start in starts]
        extent = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
        return [(t.data_ptr(), t.data_ptr() + (extent + 1) * size)]

    return any(x0 < y1 and y0 < x1 for x0, x1 in ranges(a) for y0, y1 in ranges(b))


# ----------------------------------------------------------------------------- losses and sizes


def check_loss(fname: str, loss: object, source: str = "func") -> Tensor:
    """Check that a closure returned a one-element floating tensor and make it 0-d.

    ``source`` names the argument that computed the loss (``func``, or ``loss_fn`` for the
    model forms).
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"{fname}: {source} must return a Tensor; got {type_name(loss)}.")
    if loss.numel() != 1:
        raise ValueError(
            f"{fname}: {source} must return a scalar loss; got a tensor of shape "
            f"{tuple(loss.shape)}. Reduce it, e.g. with .mean() or .sum()."
        )
    if not loss.is_floating_point():
        raise ValueError(f"{fname}: {source} must return a floating-point loss; got {loss.dtype}.")
    return loss if loss.dim() == 0 else loss.reshape(())


def check_dense_size(
    fname: str,
    what: str,
    numel: int | Sequence[int],
    dtype: torch.dtype | Sequence[torch.dtype],
    max_bytes: float,
    hint: str,
) -> None:
    """Refuse a dense result of ``numel`` entries larger than ``max_bytes``, before any work.

    Several parts of several dtypes (blocks like params): a ``numel`` and a ``dtype`` each.
    """
    numels = [numel] if isinstance(numel, int) else list(numel)
    dtypes = [dtype] if isinstance(dtype, torch.dtype) else list(dtype)
    need = sum(n * torch.empty((), dtype=d).element_size() for n, d in zip(numels, dtypes))
    if need > max_bytes:
        names = dict.fromkeys(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"{fname}: {what} ({', '.join(names)}) needs {format_bytes(need)}, more than "
            f"max_bytes={format_bytes(max_bytes)}; {hint}"
        )


# ----------------------------------------------------------------------------- models and data


def check_module(fname: str, argname: str, model: object) -> None:
    """Raise ``TypeError`` unless ``model`` is a :class:`torch.nn.Module`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fname}: {argname} must be a torch.nn.Module; got {type_name(model)}.")
    if type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    ):
        raise ValueError(
            f"{fname}: {argname} is compiled by torch.compile, whose graphs PyTorch cannot "
            f"differentiate twice; pass the module it compiles, {argname}._orig_mod."
        )


def check_inputs(fname: str, argname: str, inputs: object) -> None:
    """Inputs are a tensor, a tuple or list of positional arguments, or a dict of keywords."""
    if not isinstance(inputs, (Tensor, tuple, list, Mapping)):
        raise TypeError(
            f"{fname}: {argname} must be a Tensor, a tuple of model arguments or a dict of "
            f"keyword arguments; got {type_name(inputs)}."
        )


_RANDOM_SAMPLERS = (
    torch.utils.data.RandomSampler,
    torch.utils.data.SubsetRandomSampler,
    torch.utils.data.WeightedRandomSampler,
)
"""Samplers that draw a new order (or new samples) every time they are iterated."""


def reshuffling_sampler(data: object) -> object | None:
    """The sampler of a ``DataLoader`` that draws another order on every pass, else ``None``."""
    sampler = getattr(getattr(data, "batch_sampler", None), "sampler", None)
    return sampler if isinstance(sampler, _RANDOM_SAMPLERS) else None


def check_data(
    fname: str,
    data: object,
    batch_size_fn: Callable[[Any], int] | None = None,
    *,
    shard: bool = False,
) -> Iterable[Any]:
    """Turn ``data`` into a re-iterable collection of batches and check what is cheap to check.

    A single batch becomes a list of one; every batch of a sequence (the first of another
    iterable) is checked with :func:`check_batch` and :func:`batch_size`. A ``shard`` (one
    process's part of data summed over processes) may be empty.
    """
    if is_batch(data):
        batches: Iterable[Any] = [data]
    elif isinstance(data, Iterable) and not isinstance(data, (Tensor, Mapping, str)):
        with rng_kept():
            once = iter(data) is data  # type: ignore[comparison-overlap]
        if once:
            raise TypeError(
                f"{fname}: data must be re-iterable (each product passes over it); got a "
                f"{type_name(data)} that can be iterated only once. Pass a list of batches "
                "or a DataLoader."
            )
        batches = data
    else:
        raise TypeError(
            f"{fname}: data must be an (inputs, targets) batch or an iterable of such batches; "
            f"got {type_name(data)}."
        )
    sampler = reshuffling_sampler(batches)
    if sampler is not None:
        raise ValueError(
            f"{fname}: data is a DataLoader whose {type_name(sampler)} draws another order "
            "on every pass; every product passes over the data again, and all passes must "
            "see the same batches in the same order. Use shuffle=False (or a fixed sampler)."
        )
    to_check = batches if isinstance(batches, Sequence) else _first(batches)
    if not to_check and not shard:
        raise ValueError(f"{fname}: data is empty; expected at least one (inputs, targets) batch.")
    for index, batch in enumerate(to_check):
        inputs, _ = check_batch(fname, index, batch)
        batch_size(fname, index, inputs, batch_size_fn)
    return batches


def _first(batches: Iterable[Any]) -> list[Any]:
    with rng_kept():
        for batch in batches:
            return [batch]
    return []


def check_batch(fname: str, index: int, batch: object) -> tuple[Any, Any]:
    """Check that batch ``index`` is an ``(inputs, targets)`` pair; return the pair."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"a {type_name(batch)}"
        if isinstance(batch, (tuple, list)):
            got += f" of length {len(batch)}"
        raise TypeError(
            f"{fname}: data batch {index} must be a pair (inputs, targets); got {got}. "
            "Wrap several model inputs in a tuple, ((x1, x2), targets); a single batch is a "
            "pair whose targets are a tensor (one whose targets are a tuple, a dict or None: "
            "in a list, [(inputs, targets)])."
        )
    check_inputs(fname, f"the inputs of data batch {index}", batch[0])
    return batch[0], batch[1]


def batch_size(
    fname: str, index: int, inputs: object, batch_size_fn: Callable[[Any], int] | None = None
) -> int:
    """The samples of batch ``index``: ``batch_size_fn(inputs)`` (a positive int) where given.

    Else the leading dimension of the first input tensor (which must have one).
    """
    if batch_size_fn is not None:
        size = batch_size_fn(inputs)
        if not _is_integer(size) or size < 1:  # type: ignore[operator]
            raise ValueError(
                f"{fname}: batch_size_fn returned {size!r} for data batch {index}; expected "
                "its number of samples, a positive int."
            )
        return int(size)  # type: ignore[call-overload]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    tensors = (
        [inputs] if isinstance(inputs, Tensor) else [t for t in values if isinstance(t, Tensor)]
    )  # type: ignore[union-attr]
    if not tensors or tensors[0].dim() == 0:
        raise ValueError(
            f"{fname}: the inputs of data batch {index} hold no tensor with a batch dimension; "
            "expected the first input tensor's leading dimension to count the samples."
        )
    return tensors[0].shape[0]


# ----------------------------------------------------------------------------- analysis forms

OPERATOR_ATTRIBUTES = ("matmat", "shape", "dtype", "device")
"""What an analysis needs of an operator."""


def is_operator(obj: object) -> bool:
    """Whether ``obj`` looks like an operator (has every attribute of the protocol)."""
    return all(hasattr(obj, name) for name in OPERATOR_ATTRIBUTES)


def check_analysis_form(
    fname: str, func_or_operator: object, params: object
) -> list[Tensor] | None:
    """Check the closure or operator form of an analysis function.

    Returns:
        The params of a closure (one dtype and device), or ``None`` for an operator (whose
        attributes :func:`check_operator` checks).

    Raises:
        TypeError: If ``func_or_operator`` is neither callable nor an operator, or if
            ``params`` is missing for a closure or given with an operator.
        ValueError: If the params mix dtypes or devices.
    """
    if is_operator(func_or_operator):
        if params is not None:
            raise TypeError(
                f"{fname}: params must be None when func_or_operator is an operator; got "
                f"{type_name(params)}. The operator already fixes the parameters."
            )
        return None
    if not callable(func_or_operator):
        raise TypeError(
            f"{fname}: func_or_operator must be a loss closure (with params) or an operator "
            f"with matmat, shape, dtype and device; got {type_name(func_or_operator)}."
        )
    if params is None:
        raise TypeError(
            f"{fname}: params is required with a loss closure; expected an iterable of tensors, "
            "got None."
        )
    tensors = as_params(fname, params)
    labelled = [(f"params[{i}]", p) for i, p in enumerate(tensors)]
    _one_layout(fname, "params must share one dtype and device", labelled, ".")
    return tensors


def check_operator(fname: str, operator: Any) -> tuple[int, torch.dtype, torch.device]:
    """Check an operator's ``matmat``, ``shape``, ``dtype`` and ``device``.

    Returns:
        Its size ``P``, dtype and device.

    Raises:
        TypeError: On malformed attributes.
        ValueError: If the operator is not square, empty or not floating point.
    """
    if not callable(operator.matmat):
        raise TypeError(f"{fname}: func_or_operator.matmat must be callable.")
    shape = operator.shape
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise TypeError(
            f"{fname}: func_or_operator.shape must be a pair of ints; got {shape!r}."
        ) from None
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"{fname}: func_or_operator has shape {shape}; expected a square operator (P, P)."
        )
    if shape[0] < 1:
        raise ValueError(f"{fname}: func_or_operator has shape {shape}; expected P >= 1.")
    dtype = operator.dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"{fname}: func_or_operator.dtype must be a torch.dtype; got {type_name(dtype)}."
        )
    if not dtype.is_floating_point:
        raise ValueError(
            f"{fname}: func_or_operator has dtype {dtype}; expected a floating-point operator."
        )
    try:
        device = torch.device(operator.device)
    except (TypeError, RuntimeError):
        raise TypeError(
            f"{fname}: func_or_operator.device must be a torch.device; got "
            f"{type_name(operator.device)}."
        ) from None
    return shape[0], dtype, device
