r"""The forward pass of a gradient graph: differentiable twice, repeatable, without a trace.

This module owns what happens around every forward pass whose gradient the library
differentiates again, and the errors of operators that cannot be: :func:`forward_context`
enables gradients (also under :func:`torch.no_grad`), makes the parameters require them for
the pass (:func:`requires_grad`), forks the RNG (and seeds it, so dropout draws the same
masks in every pass) and routes operators that PyTorch cannot differentiate twice to
equivalents that it can; :func:`second_derivative_error` names an operator that remains
without a second derivative, and :func:`module_calling` the module that calls it. The routes:

* ``F.hardsigmoid`` (its backward has no derivative) runs as
  :math:`\operatorname{relu6}(x + 3) / 6`, the same function;
* ``F.group_norm`` of a ``channels_last`` input runs on a contiguous copy (PyTorch 2.13's
  CPU double backward of GroupNorm with respect to its bias crashes the process on
  ``channels_last`` inputs);
* ``torch._weight_norm`` along a dimension (``weight_norm`` parametrizations of layers) runs
  as :math:`v\,g / \|v\|` with the norm of :func:`torch.norm_except_dim`, the same function
  (PyTorch 2.13's fused kernel has a wrong, asymmetric second derivative);
* ``scaled_dot_product_attention`` runs on its math kernel (the fused kernels have no double
  backward);
* recurrent layers on CUDA run without cuDNN (``_cudnn_rnn_backward`` has no derivative).

The first three are routed by a :class:`~torch.overrides.TorchFunctionMode`, which is local to
the thread. Its overhead, one Python call per torch call of the forward pass (about 4% of a
small MLP's Hessian-vector product), is paid only where a route is needed: a gradient graph
runs its forward pass without the mode, looks at the autograd nodes that pass made
(:func:`forward_facts`: a hardsigmoid, a cuDNN recurrent layer, a GroupNorm of a
non-contiguous input, a fused weight norm, or an in-place operation on a view, whose node
hides which operation it was) and runs it again under the mode only if one is there; the two passes
then compute the same function, so results never depend on which ran. The other two have
only **global switches** in PyTorch,
process-wide flags (the SDPA backend flags, :data:`_SDP_BACKENDS`, and
``torch.backends.cudnn.enabled``): they are set for the pass (attention) or for the call of a
recurrent layer, and restored after, so another thread running attention or a CUDA RNN at
that moment sees them too.
"""

import contextlib
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode


class forward_context:  # noqa: N801 - used as a context manager, as torch.enable_grad
    """Run a forward pass that can be differentiated twice, leaving no trace.

    Gradients are enabled and ``params`` require them; the RNG of the CPU and of the
    params' CUDA devices (and of ``devices``) is forked, so dropout does not advance the
    global RNG, and seeded with ``seed`` when given, so random draws repeat; attention runs
    on its math kernel (global SDPA backend flags, for the pass); with ``route``, the other
    operators without a double backward are routed as the module docstring says.
    """

    # Written out rather than with torch.random.fork_rng, sdpa_kernel and a generator-based
    # context manager, which cost more than the rest of a small model's gradient graph.

    def __init__(
        self,
        params: Sequence[Tensor],
        seed: int | None = None,
        *,
        devices: Sequence[torch.device] = (),
        route: bool = True,
    ) -> None:
        self.params, self.seed, self.devices, self.route = params, seed, devices, route
        self.cuda: list[int] = []
        self.states: list[Tensor] = []
        self.changed: list[tuple[bool, Callable[[bool], None]]] = []
        self.grads: requires_grad | None = None  # (once entered)
        self.mode: _TwiceDifferentiable | None = None  # (once entered)

    def __enter__(self) -> None:
        self.states = [torch.get_rng_state()]
        if torch.cuda.is_initialized():  # (no tensor is on a CUDA device before that)
            self.cuda = sorted(
                {p.device.index or 0 for p in self.params if p.is_cuda}
                | {d.index or 0 for d in self.devices if d.type == "cuda"}
            )
            self.states += [torch.cuda.get_rng_state(index) for index in self.cuda]
        self.changed = [(use, on) for enabled, on, use in _SDP_BACKENDS if enabled() != use]
        try:
            for use, enable in self.changed:
                enable(use)
            grads = requires_grad(self.params)
            grads.__enter__()
            self.grads = grads
            if self.route:
                mode = _TwiceDifferentiable()
                mode.__enter__()
                self.mode = mode
            if self.seed is not None:
                torch.default_generator.manual_seed(self.seed)
                for index in self.cuda:
                    torch.cuda.default_generators[index].manual_seed(self.seed)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self.mode is not None:
                self.mode.__exit__(None, None, None)
                self.mode = None
            if self.grads is not None:
                self.grads.__exit__()
                self.grads = None
        finally:
            for use, enable in self.changed:
                enable(not use)
            torch.set_rng_state(self.states[0])
            for index, state in zip(self.cuda, self.states[1:]):
                torch.cuda.set_rng_state(state, index)


_SDP_BACKENDS = [
    (torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp, True),
    (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp, False),
    (
        torch.backends.cuda.mem_efficient_sdp_enabled,
        torch.backends.cuda.enable_mem_efficient_sdp,
        False,
    ),
    (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp, False),
]
"""``scaled_dot_product_attention`` backends (global flags, CPU included): getter, setter,
and whether a forward pass to be differentiated twice may use it (only the math kernel has
a double backward)."""


class requires_grad:  # noqa: N801 - used as a context manager, as torch.enable_grad
    """Enable gradients, and ``requires_grad`` on params lacking it, for the block's duration.

    Also inside :func:`torch.no_grad` and :func:`torch.inference_mode` (where a forward pass
    would otherwise build no graph and every curvature would silently be zero). Nothing is
    switched where nothing needs it (the common case costs a check of the flags).
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = params
        self.frozen: list[Tensor] = []
        self.modes: contextlib.ExitStack | None = None

    def __enter__(self) -> None:
        self.frozen = [p for p in self.params if not p.requires_grad]
        inference = torch.is_inference_mode_enabled()  # switching is not free: only when on
        if inference or not torch.is_grad_enabled():
            self.modes = contextlib.ExitStack()
            if inference:
                self.modes.enter_context(torch.inference_mode(False))
            self.modes.enter_context(torch.enable_grad())
        for p in self.frozen:
            p.requires_grad_(True)

    def __exit__(self, *exc: object) -> None:
        for p in self.frozen:
            p.requires_grad_(False)
        if self.modes is not None:
            self.modes.close()
            self.modes = None


def _hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    out = F.relu6(input + 3) / 6
    return input.copy_(out) if inplace else out


def _group_norm(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return F.group_norm(input.contiguous(), *args, **kwargs)


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    return v * (g / torch.norm_except_dim(v, 2, dim))


def _without_cudnn(func: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not any(isinstance(a, Tensor) and a.is_cuda for a in args):
            return func(*args, **kwargs)
        with torch.backends.cudnn.flags(enabled=False):
            return func(*args, **kwargs)

    return run


_ROUTES: dict[Callable[..., Any], Callable[..., Any]] = {
    F.hardsigmoid: _hardsigmoid,
    F.group_norm: _group_norm,
    torch._weight_norm: _weight_norm,
    **{
        getattr(torch._VF, name): _without_cudnn(getattr(torch._VF, name))
        for name in ("lstm", "gru", "rnn_tanh", "rnn_relu")
    },
}
"""Functions without a double backward, and twice-differentiable functions to run instead."""


class _TwiceDifferentiable(TorchFunctionMode):
    """Run the functions of :data:`_ROUTES` as their twice-differentiable equivalents."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _ROUTES.get(func, func)(*args, **(kwargs or {}))


def next_node_number() -> int:
    """The sequence number of the next autograd node made on this thread (-1 where unknown)."""
    peek = getattr(torch._C._autograd, "_get_sequence_nr", None)
    return -1 if peek is None else int(peek())


def forward_facts(loss: Tensor, first: int) -> tuple[bool, bool]:
    """What the forward pass behind ``loss`` ran: ``(needs routes, custom functions)``.

    Walks the autograd nodes numbered ``first`` or higher (those of the pass) back from the
    loss. A hardsigmoid, a cuDNN recurrent layer, a GroupNorm of a non-contiguous input or a
    fused weight norm (what :data:`_ROUTES` changes) means the pass must run again under the
    routing mode, and so does an in-place operation on a view (its ``CopySlices`` node wraps
    the operation's own, which the walk cannot see: an in-place hardsigmoid, say). A
    node that is not one of PyTorch's generated backward nodes (named ``...Backward<n>``, or
    ``AccumulateGrad``) is a custom ``autograd.Function`` (Python or C++) or an error node:
    only behind such a node can a gradient be cut from its second derivatives.
    """
    route = custom = False
    for node in pass_nodes(loss, first):
        kind = _node_kind(type(node))
        if kind == _PLAIN:
            continue
        if kind == _ROUTE:
            route = True
        elif kind == _GROUP_NORM:
            route = route or not node._saved_input.is_contiguous()
        else:
            custom = True
    return route, custom


def pass_nodes(loss: Tensor, first: int) -> list[Any]:
    """The autograd nodes of the forward pass behind ``loss``, each once, from the loss back.

    Those numbered ``first`` or higher (all of them where ``first`` is -1); a leaf's
    ``AccumulateGrad`` ends a path (it is not listed).
    """
    nodes = [] if loss.grad_fn is None else [loss.grad_fn]
    seen = set(nodes)
    for node in nodes:  # (breadth first: the list grows as the walk goes)
        for following, _ in node.next_functions:
            if (
                following is not None
                and type(following) is not _ACCUMULATE
                and following not in seen
                and following._sequence_nr() >= first
            ):
                seen.add(following)
                nodes.append(following)
    return nodes


_PLAIN, _ROUTE, _GROUP_NORM, _CUSTOM = range(4)
_ACCUMULATE = getattr(torch._C._functions, "AccumulateGrad", None)


@functools.cache
def _node_kind(node_type: type) -> int:
    """What an autograd node of this type means to :func:`forward_facts`."""
    name = node_type.__name__
    if issubclass(node_type, BackwardCFunction):  # a Python Function, whatever its name
        return _CUSTOM
    routed = ("HardsigmoidBackward", "CudnnRnnBackward", "WeightNormInterfaceBackward")
    if name.startswith(routed) or name == "CopySlices":
        return _ROUTE
    if name.startswith("NativeGroupNormBackward"):
        return _GROUP_NORM
    if not (name[-1].isdigit() or name == "AccumulateGrad"):
        return _CUSTOM
    return _PLAIN


class SecondDerivativeError(RuntimeError):
    """An operator on the loss's path has no second derivative in PyTorch."""


_NO_DERIVATIVE = re.compile(
    r"derivative for '?(?:aten::)?_?(\w+?)(?:_backward)?'? is not implemented"
)


def second_derivative_error(
    fname: str, err: RuntimeError, locate: Callable[[str], str | None] | None = None
) -> SecondDerivativeError | None:
    """A clear error for ``err`` if it says an operator has no second derivative, else ``None``.

    Args:
        fname: Public function name, for the message.
        err: The error a product raised.
        locate: ``locate(op)`` names the module that calls the operator ``op``, where known.
    """
    match = _NO_DERIVATIVE.search(str(err))
    if match is None:
        return None
    op = match.group(1)
    where = locate(op) if locate is not None else None
    return SecondDerivativeError(
        f"{fname}: PyTorch cannot differentiate the operator {op!r} twice (its backward has no "
        f"derivative){f', called in {where}' if where else ''}, so no Hessian can be computed "
        "through it; write it with twice-differentiable operations (as hardsigmoid(x) = "
        "relu6(x + 3) / 6), or leave it out of the parameters' path."
    )


_MIXED_DTYPES = re.compile(
    r"same dtype|scalar type|type \(\w+\) and \w+ type \(\w+\) should be the same|mixed dtype",
    re.IGNORECASE,
)


def run_forward(fname: str, func: Callable[[], object], dtype: torch.dtype | None) -> object:
    """Call ``func`` (a forward pass and its loss); name a clash of dtypes it raises.

    A ``RuntimeError`` of an operator given tensors of different dtypes (inputs of another
    dtype than the parameters, ``dtype``, most often) becomes a ``ValueError`` naming the
    public function and a fix; any other error is raised as it is.
    """
    try:
        return func()
    except RuntimeError as err:
        if dtype is None or _MIXED_DTYPES.search(str(err)) is None:
            raise
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"{fname}: the forward pass raised {first!r}: the parameters are {dtype}; are the "
            f"inputs (or another tensor it uses) of another dtype? Cast them, e.g. "
            f"inputs.to({dtype}), or the model to theirs."
        ) from err


def module_calling(model: nn.Module, run: Callable[[], object], op: str) -> str | None:
    """The innermost module of ``model`` that calls the torch function ``op`` in ``run()``.

    Runs ``run`` (a forward pass of ``model``) once more under hooks that track the module
    stack and a mode that watches for ``op``; nothing is differentiated.

    Returns:
        ``"module 'name' (Type)"``, or ``None`` when no module calls it.
    """
    names = {module: name for name, module in model.named_modules()}
    stack: list[nn.Module] = []
    found: list[nn.Module] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if stack and getattr(func, "__name__", "").strip("_") in (op, f"{op}_"):
                found.append(stack[-1])
            return func(*args, **(kwargs or {}))

    def enter(module: nn.Module, _: object) -> None:
        stack.append(module)

    def leave(module: nn.Module, _: object, __: object) -> None:
        stack.pop()

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.random.fork_rng(), torch.no_grad(), Watch():
            run()
    except Exception:  # noqa: BLE001 - only a diagnosis: the original error is what counts
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        return None
    name = names[found[0]] or "(root)"
    return f"module {name!r} ({type(found[0]).__name__})"
