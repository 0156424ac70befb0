r"""What an optimizer's next step can tolerate: its stability threshold and its preconditioner.

A step of gradient descent with learning rate :math:`\eta` on a quadratic with Hessian
:math:`H` is stable only while :math:`\lambda_{\max}(H) < 2/\eta`; trained networks rise to
that line (progressive sharpening) and hover there (the edge of stability; Cohen et al.
2021). Other optimizers have their own lines, found the same way, as the largest eigenvalue
:math:`\lambda` for which the optimizer's linear recurrence on :math:`f(x) = \frac\lambda2 x^2`
stays bounded:

* **SGD** (PyTorch's ``SGD``): :math:`2/\eta`; with heavy-ball momentum :math:`\beta` and
  dampening :math:`d` (the update ``b = beta b + (1 - d) g``, ``x -= eta b``),
  :math:`(2 + 2\beta)/(\eta (1 - d))`; with Nesterov momentum (``nesterov=True``),
  :math:`(2 + 2\beta)/(\eta (1 + 2\beta))`, as Cohen et al. (2021, appendix on momentum)
  give them.
* **Adam** and **AdamW**: the update is :math:`x \leftarrow x - \eta P^{-1} m` with the
  first moment :math:`m` (an exponential average with :math:`\beta_1`) and the diagonal
  preconditioner

  .. math:: P = (1 - \beta_1^t)\, \operatorname{diag}\bigl(\sqrt{\hat v} + \epsilon\bigr),
            \qquad \hat v = \frac{v}{1 - \beta_2^t},

  after :math:`t` steps, with :math:`v` the second-moment average (``max_exp_avg_sq`` with
  ``amsgrad=True``). With :math:`P` frozen this is gradient descent with exponential-average
  momentum on :math:`P^{-1}H`, stable while :math:`\lambda_{\max}(P^{-1}H) < (2 + 2\beta_1) /
  (\eta (1 - \beta_1))`, which is :math:`38/\eta` for :math:`\beta_1 = 0.9` (Cohen et al.
  2022). The factor :math:`1 - \beta_1^t` is the first moment's bias correction, as the
  paper writes :math:`P`; it is within 1% of 1 after 44 steps at :math:`\beta_1 = 0.9`.
* **RMSprop**: :math:`P = \operatorname{diag}(\sqrt{v} + \epsilon)` (with ``centered=True``,
  :math:`v - \bar g^2` in place of :math:`v`), threshold :math:`2/\eta`, or
  :math:`(2 + 2\mu)/\eta` with heavy-ball momentum :math:`\mu`.
* **Adagrad**: :math:`P = \operatorname{diag}(\sqrt{s} + \epsilon)` with :math:`s` the sum of
  squared gradients, threshold :math:`2/\eta_t` with the decayed rate
  :math:`\eta_t = \eta / (1 + t\,\delta)` of the next step (``lr_decay`` :math:`\delta`).

:math:`\lambda_{\max}(P^{-1}H)` is computed as the top eigenvalue of the symmetric
:math:`P^{-1/2} H P^{-1/2}`, which has the same eigenvalues. The preconditioner is the one
the optimizer's last step used, read from its state without changing it, and
:math:`\eta` is its current learning rate (``param_groups[i]["lr"]``, as a scheduler left
it). A parameter the optimizer holds no state for (it has had no gradient yet) takes no step:
its rows of :math:`P^{-1}` are zero. Weight decay is not part of the loss whose Hessian is
monitored; coupled weight decay :math:`w` (``SGD``, ``Adam``, ``RMSprop``, ``Adagrad``) adds
:math:`w` to every eigenvalue of the Hessian the optimizer follows.

References:
    Cohen, J. M., Kaur, S., Li, Y., Kolter, J. Z. and Talwalkar, A. (2021). Gradient descent on
    neural networks typically occurs at the edge of stability. ICLR 2021. arXiv:2103.00065.

    Cohen, J. M., Ghorbani, B., Krishnan, S., Agarwal, N., Medapati, S., Badura, M., Suo, D.,
    Cardoze, D., Nado, Z., Dahl, G. E. and Gilmer, J. (2022). Adaptive gradient methods at the
    edge of stability. arXiv:2207.14484.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torch_secorder._checks import type_name

SUPPORTED = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")
"""Optimizers whose stability threshold (and preconditioner) the monitor knows."""

ADAPTIVE = ("Adam", "AdamW", "RMSprop", "Adagrad")
"""The optimizers with a diagonal preconditioner."""

HYPERPARAMETERS = {
    "SGD": ("lr", "momentum", "dampening", "nesterov"),
    "Adam": ("lr", "betas", "eps", "amsgrad"),
    "AdamW": ("lr", "betas", "eps", "amsgrad"),
    "RMSprop": ("lr", "alpha", "eps", "momentum", "centered"),
    "Adagrad": ("lr", "lr_decay", "eps"),
}
"""The hyperparameters that enter the threshold or the preconditioner, which every parameter
group holding monitored parameters must share."""


@dataclass(frozen=True)
class Stability:
    """The stability threshold of an optimizer's next step, and its preconditioner.

    Attributes:
        threshold: The largest stable eigenvalue of :math:`P^{-1}H` (of :math:`H` for SGD).
        scale: :math:`P^{-1/2}` as a flat vector over the monitored parameters, or ``None``
            for SGD (:math:`P = I`) and for an adaptive optimizer that has not stepped yet.
    """

    threshold: float
    scale: Tensor | None


def kind(optimizer: torch.optim.Optimizer) -> str:
    """The name of the supported optimizer class ``optimizer`` is an instance of."""
    for name in SUPPORTED[::-1]:  # AdamW before Adam: a subclass in some versions
        if isinstance(optimizer, getattr(torch.optim, name)):
            return name
    raise AssertionError("checked by check_optimizer")


def check_optimizer(
    fname: str, optimizer: object, params: Sequence[Tensor], names: Sequence[str]
) -> None:
    """Check that ``optimizer`` is supported and fits the monitored parameters.

    It must hold every monitored parameter, and the groups holding them must share the
    hyperparameters of the threshold.

    Raises:
        TypeError: If ``optimizer`` is not a supported :class:`torch.optim.Optimizer`.
        ValueError: If a monitored parameter is not in the optimizer, or the groups holding
            them differ in a hyperparameter of the threshold.
    """
    listed = ", ".join(f"torch.optim.{name}" for name in SUPPORTED)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{fname}: optimizer must be None or a torch.optim.Optimizer ({listed}); got "
            f"{type_name(optimizer)}."
        )
    if not any(isinstance(optimizer, getattr(torch.optim, name)) for name in SUPPORTED):
        raise TypeError(
            f"{fname}: optimizer must be one of {listed}, whose stability threshold is known; "
            f"got {type_name(optimizer)}. Pass optimizer=None to record the eigenvalues "
            "without a threshold."
        )
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    for index, (name, p) in enumerate(zip(names, params)):
        if id(p) not in group_of:
            raise ValueError(
                f"{fname}: params[{index}] ({name!r}) is not optimized by the optimizer; "
                "expected every monitored parameter in its param_groups. Select the optimized "
                "parameters with params=, or pass optimizer=None."
            )
    _shared(fname, optimizer, params, names)


def _shared(
    fname: str, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], names: Sequence[str]
) -> dict[str, Any]:
    """The hyperparameters of the groups holding ``params``, which must agree."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    keys = HYPERPARAMETERS[kind(optimizer)]
    first = group_of[id(params[0])]
    for name, p in zip(names, params):
        group = group_of[id(p)]
        for key in keys:
            a, b = _plain(first.get(key)), _plain(group.get(key))
            if a != b:
                raise ValueError(
                    f"{fname}: the optimizer's parameter groups of {names[0]!r} and {name!r} "
                    f"differ in {key} ({a!r} and {b!r}); expected one {key} for all monitored "
                    "parameters, as the stability threshold has one. Monitor one group with "
                    "params=."
                )
    return {key: _plain(first.get(key)) for key in keys}


def _plain(value: object) -> object:
    """A hyperparameter as a Python value (a learning rate may be a 0-d tensor)."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else tuple(value.tolist())
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def stability(
    fname: str, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], names: Sequence[str]
) -> Stability:
    """The threshold and preconditioner of ``optimizer``'s next step over ``params``.

    Raises:
        ValueError: If the groups holding ``params`` differ in a hyperparameter of the
            threshold (a scheduler may have made them differ since the monitor was built), or
            the learning rate is negative (a rate of 0 has an infinite threshold).
    """
    name = kind(optimizer)
    hyper = _shared(fname, optimizer, params, names)
    lr = float(hyper["lr"])
    if not lr >= 0:
        raise ValueError(
            f"{fname}: the optimizer's learning rate must not be negative for a stability "
            f"threshold; got lr={lr}."
        )

    def per_lr(value: float, factor: float = 1.0) -> float:
        """``value / (lr * factor)``; infinite for a step of size 0 (a schedule's end)."""
        step = lr * factor
        return value / step if step > 0 else math.inf

    if name == "SGD":
        beta = float(hyper["momentum"])
        if hyper["nesterov"]:
            return Stability(per_lr((2 + 2 * beta) / (1 + 2 * beta)), None)
        dampening = float(hyper["dampening"]) if beta else 0.0
        return Stability(per_lr(2 + 2 * beta, 1 - dampening), None)
    state = [optimizer.state.get(p, {}) for p in params]
    if name in ("Adam", "AdamW"):
        beta1, beta2 = (float(b) for b in hyper["betas"])
        threshold = per_lr(2 + 2 * beta1, 1 - beta1)
        diagonals = [
            _adam(s, beta1, beta2, float(hyper["eps"]), bool(hyper["amsgrad"])) for s in state
        ]
    elif name == "RMSprop":
        mu = float(hyper["momentum"])
        threshold = per_lr(2 + 2 * mu)
        diagonals = [_rmsprop(s, float(hyper["eps"]), bool(hyper["centered"])) for s in state]
    else:  # Adagrad
        steps = [float(s["step"]) for s in state if "step" in s]
        decay = float(hyper["lr_decay"])
        threshold = per_lr(2 * (1 + (max(steps) if steps else 0.0) * decay))
        diagonals = [_adagrad(s, float(hyper["eps"])) for s in state]
    return Stability(threshold, _scale(diagonals, params))


def _adam(
    state: dict[str, Any], beta1: float, beta2: float, eps: float, amsgrad: bool
) -> Tensor | None:
    if "step" not in state:
        return None
    t = float(state["step"])
    v = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
    return (1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + eps)


def _rmsprop(state: dict[str, Any], eps: float, centered: bool) -> Tensor | None:
    if "square_avg" not in state:
        return None
    v = state["square_avg"]
    if centered:
        v = v - state["grad_avg"] ** 2
    return v.sqrt() + eps


def _adagrad(state: dict[str, Any], eps: float) -> Tensor | None:
    if "sum" not in state or float(state.get("step", 0)) == 0:
        return None
    return state["sum"].sqrt() + eps


def _scale(diagonals: list[Tensor | None], params: Sequence[Tensor]) -> Tensor | None:
    """:math:`P^{-1/2}` as a flat vector, zero for parameters without state (``None``: all)."""
    if all(d is None for d in diagonals):
        return None
    pieces = [
        torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        if d is None
        else d.detach().to(p.dtype).reshape(-1).rsqrt()
        for d, p in zip(diagonals, params)
    ]
    return torch.cat(pieces)


class PreconditionedOperator:
    r"""The symmetric :math:`S H S` for a diagonal :math:`S = P^{-1/2}`, as an operator.

    Its eigenvalues are those of :math:`P^{-1} H` (where :math:`S` has no zero).

    Args:
        operator: The operator :math:`H` (``matmat``, ``shape``, ``dtype``, ``device``).
        scale: :math:`S` as a flat ``(P,)`` vector.
    """

    def __init__(self, operator: Any, scale: Tensor) -> None:
        self.operator = operator
        self.scale = scale.to(operator.dtype)
        self.shape = operator.shape
        self.dtype = operator.dtype
        self.device = operator.device

    def matmat(self, V: Tensor) -> Tensor:
        """Multiply ``(P, k)`` columns with :math:`S H S`."""
        s = self.scale[:, None]
        return s * self.operator.matmat(s * V)
