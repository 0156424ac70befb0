"""The losses of a case: a base loss, activation penalties read from hooks, weight decay."""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.core.fuzz.base import BuilderBase


class Losses(BuilderBase):
    """Draws the loss of a case and the targets it reads."""

    def _loss(
        self, model: nn.Module, classes: int, heads: str
    ) -> tuple[Callable[[Any, Tensor], Tensor], Callable[[int], Tensor], str]:
        d = self.draw
        regression = {"mse-mean": 3, "mse-sum": 1, "huber": 1, "cubic": 1, "log-cosh": 1}
        kinds = {
            **regression,
            "cross-entropy": 3,
            "nll": 1,
            "bce": 1,
            "covariance": 1,
            "info-nce": 1,
        }
        kind = d.weighted(regression if heads == "byol" else kinds)
        self.tags.add(f"loss:{kind}")
        delta, smoothing = d.uniform(0.3, 1.5), d.choice([0.0, 0.0, 0.1])
        base = _base_loss(kind, delta, smoothing)
        decay = d.choice([1e-2, 1e-1]) if d.coin(0.7 if heads != "one" else 0.15) else 0.0
        penalties = list(self.penalties)
        byol = heads == "byol"
        text = kind + (f"(delta={delta:.2f})" if kind == "huber" else "")
        text += f"(smoothing={smoothing})" if kind == "cross-entropy" and smoothing else ""
        text += " against the detached second head" if byol else ""
        for name, coef, _ in penalties:
            text += f" + {coef}*mean({name}^2)"
            self.tags.add("activation-penalty")
        if decay:
            text += f" + {decay}*sum(p^2 for all parameters)"
            self.tags.add("weight-decay")

        def loss_fn(output: Any, targets: Tensor) -> Tensor:
            main = output[0] if isinstance(output, tuple) else output
            y = main.reshape(-1, main.shape[-1])
            if byol:
                targets = output[1].reshape(y.shape)
            value = base(y, targets)
            for _, coef, read in penalties:
                value = value + coef * read().pow(2).mean()
            if decay:
                value = value + decay * sum(p.pow(2).sum() for p in model.parameters())
            return value

        def make_targets(rows: int) -> Tensor:
            if kind in ("cross-entropy", "nll"):
                return d.randint(classes, rows)
            if kind == "bce":
                return d.rand(rows, classes)
            return d.randn(rows, classes)

        return loss_fn, make_targets, text


def _base_loss(kind: str, delta: float, smoothing: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss of ``kind`` between output rows ``y`` (``(R, K)``) and their targets."""
    if kind == "mse-mean":
        return F.mse_loss
    if kind == "mse-sum":
        return lambda y, t: F.mse_loss(y, t, reduction="sum")
    if kind == "huber":
        return lambda y, t: F.huber_loss(y, t, delta=delta)
    if kind == "cubic":
        return lambda y, t: ((y - t) ** 3).mean() + (y - t).pow(2).mean()
    if kind == "log-cosh":
        return lambda y, t: torch.log(torch.cosh(y - t)).mean()
    if kind == "cross-entropy":
        return lambda y, t: F.cross_entropy(y, t, label_smoothing=smoothing)
    if kind == "nll":
        return lambda y, t: F.nll_loss(F.log_softmax(y, -1), t)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits
    if kind == "covariance":

        def covariance(y: Tensor, t: Tensor) -> Tensor:
            centred = y - y.mean(0, keepdim=True)
            cov = centred.T @ centred / y.shape[0]
            return (cov - torch.eye(y.shape[1], dtype=y.dtype)).pow(2).sum() + F.mse_loss(y, t)

        return covariance

    def info_nce(y: Tensor, t: Tensor) -> Tensor:
        logits = F.normalize(y, dim=-1) @ F.normalize(t, dim=-1).T / 0.5
        return F.cross_entropy(logits, torch.arange(y.shape[0]))

    return info_nce
