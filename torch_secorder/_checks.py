"""Argument validation shared by all public functions.

Every helper receives the public function's name (``fname``) and the argument's name so
that messages read ``<function>: <argument> <what is wrong>; expected <x>, got <y>.``
"""

from collections.abc import Sequence

import torch
from torch import Tensor


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


def _type_name(obj: object) -> str:
    return type(obj).__name__


def check_callable(fname: str, argname: str, obj: object) -> None:
    """Raise ``TypeError`` unless ``obj`` is callable."""
    if not callable(obj):
        raise TypeError(f"{fname}: {argname} must be callable; got {_type_name(obj)}.")


def check_bool(fname: str, argname: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"{fname}: {argname} must be a bool; got {_type_name(value)}.")


def check_chunk_size(fname: str, chunk_size: object) -> None:
    """Raise unless ``chunk_size`` is ``None`` or a positive ``int``."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"{fname}: chunk_size must be None or a positive int; got {_type_name(chunk_size)}."
        )
    if chunk_size < 1:
        raise ValueError(f"{fname}: chunk_size must be a positive int; got {chunk_size}.")


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
            f"{fname}: {argname} must be an iterable of tensors; got {_type_name(params)}."
        ) from None
    if not params:
        raise ValueError(f"{fname}: {argname} is empty; expected at least one tensor.")
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        label = param_label(i, names, argname)
        if not isinstance(p, Tensor):
            raise TypeError(f"{fname}: {label} must be a Tensor; got {_type_name(p)}.")
        if not p.is_floating_point():
            raise ValueError(
                f"{fname}: {label} has dtype {p.dtype}; expected a floating-point tensor."
            )
        if id(p) in seen:
            raise ValueError(
                f"{fname}: {label} is the same tensor as "
                f"{param_label(seen[id(p)], names, argname)}; pass each parameter once."
            )
        seen[id(p)] = i
    return params


def check_layout(fname: str, what: str, labelled: Sequence[tuple[str, Tensor]], hint: str) -> None:
    """Raise unless the tensors of ``(label, tensor)`` pairs share one dtype and device."""
    first_label, first = labelled[0]
    for label, t in labelled[1:]:
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"{fname}: {what} needs params of one dtype and device, but {first_label} is "
                f"{first.dtype} on {first.device} and {label} is {t.dtype} on {t.device}; {hint}"
            )


def flat_layout(fname: str, argname: str, params: Sequence[Tensor]) -> None:
    """Flat vectors need one dtype and one device across ``params``."""
    check_layout(
        fname,
        f"a flat {argname}",
        [(f"params[{i}]", p) for i, p in enumerate(params)],
        f"pass {argname} as a list like params instead.",
    )


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
    numel = sum(p.numel() for p in params)
    lead = "(k, " if batched else "("
    flat_shape = f"{lead}{numel})" if batched else f"({numel},)"
    if isinstance(v, Tensor):
        flat_layout(fname, argname, params)
        if v.dim() != (2 if batched else 1) or v.shape[-1] != numel:
            raise ValueError(
                f"{fname}: {argname} has shape {format_shape(v.shape)}; expected a flat tensor "
                f"of shape {flat_shape} or a list with one tensor per parameter."
            )
        _match_dtype_device(fname, argname, v, params[0], param_label(0, names))
        from torch_secorder.core.params import unflatten

        return unflatten(v, params), True
    if not isinstance(v, (list, tuple)):
        raise TypeError(
            f"{fname}: {argname} must be a Tensor of shape {flat_shape} or a list of tensors "
            f"like params; got {_type_name(v)}."
        )
    if len(v) != len(params):
        raise ValueError(
            f"{fname}: {argname} has {len(v)} tensors but there are {len(params)} params; "
            f"pass one tensor per parameter or a flat tensor of shape {flat_shape}."
        )
    k = None
    for i, (t, p) in enumerate(zip(v, params)):
        label = param_label(i, names)
        if not isinstance(t, Tensor):
            raise TypeError(f"{fname}: {argname}[{i}] must be a Tensor; got {_type_name(t)}.")
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


def check_max_bytes(fname: str, max_bytes: object) -> None:
    """Raise unless ``max_bytes`` is a positive number."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, float)):
        raise TypeError(f"{fname}: max_bytes must be a number; got {_type_name(max_bytes)}.")
    if not max_bytes > 0:
        raise ValueError(f"{fname}: max_bytes must be positive; got {max_bytes}.")


def check_dense_size(
    fname: str, what: str, numel: int, dtype: torch.dtype, max_bytes: float, hint: str
) -> None:
    """Refuse a dense result of ``numel`` entries larger than ``max_bytes``, before any work."""
    need = numel * torch.empty((), dtype=dtype).element_size()
    if need > max_bytes:
        dtype_name = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"{fname}: {what} ({dtype_name}) needs {format_bytes(need)}, more than "
            f"max_bytes={format_bytes(max_bytes)}; {hint}"
        )
