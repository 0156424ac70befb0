"""Tensor operations: along the samples (axis 0), and element-wise or indexing ones."""

from collections.abc import Callable

import torch
from torch import Tensor

from tests.core.fuzz.base import BuilderBase, Made, Shape
from tests.core.fuzz.case import TENSOR_OPS
from tests.core.fuzz.modules import Fn


class TensorOperations(BuilderBase):
    """Draws operations that couple the samples, and element-wise or indexing operations."""

    def _batch_coupling(self, shape: Shape) -> Made:
        """An operation along axis 0 (the samples; positions or time where those are axis 0)."""
        d = self.draw
        kind = d.choice(["x-mean(0)", "x-x[:1]", "roll(batch)", "cumsum(batch)", "permute(batch)"])
        if kind == "x-mean(0)":
            fn, text = (lambda x: x - x.mean(0, keepdim=True)), "x - x.mean(0)"
        elif kind == "x-x[:1]":
            fn, text = (lambda x: x - x[:1]), "x - x[:1]"
        elif kind == "roll(batch)":
            fn, text = (lambda x: x + 0.5 * torch.roll(x, 1, 0)), "x + roll(x, 1, axis 0)/2"
        elif kind == "cumsum(batch)":
            fn, text = (lambda x: x.cumsum(0)), "cumsum(axis 0)"
        else:
            perms = d.permutations()
            fn, text = (lambda x: x + x[perms[x.shape[0]]]), "x + x[fixed permutation]"
        return self._add(Fn(text, fn), shape, text, kind)

    def _tensor_op(self, shape: Shape) -> Made:
        d = self.draw
        image = self.family in ("cnn1d", "cnn2d")
        width = shape[-1]
        kind = d.choice(TENSOR_OPS)
        if len(shape) == 1 and d.coin(0.08):
            kind = "cdist"  # without a second derivative: both paths must raise
        constant = d.randn(width, scale=0.5)
        mask = d.rand(width) < 0.4
        if kind in ("gather", "index_select"):
            out = d.int(1, width + 2)
            index = d.randint(width, out)
            if kind == "gather":
                fn = lambda x: x.gather(-1, index.expand(*x.shape[:-1], out))  # noqa: E731
            else:
                fn = lambda x: x.index_select(-1, index)  # noqa: E731
            return self._add(Fn(f"{kind}({index.tolist()})", fn), (*shape[:-1], out), kind, kind)
        if kind == "topk":
            k = d.int(1, width)
            fn, shape = (lambda x: x.topk(k, -1).values), (*shape[:-1], k)
            return self._add(Fn(f"topk({k})", fn), shape, f"topk({k}).values", kind)
        if kind == "cdist":
            centres = d.randn(d.int(2, 3), width)
            fn = lambda x: torch.cdist(x, centres)  # noqa: E731
            return self._add(Fn("cdist", fn), (centres.shape[0],), "cdist(x, centres)", kind)
        value, low, high = d.uniform(-1, 1), d.uniform(-1.5, 0), d.uniform(0, 1.5)
        texts: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
            "masked_fill": (lambda x: x.masked_fill(mask, value), f"masked_fill({value:.2f})"),
            "where": (lambda x: torch.where(mask, x, torch.tanh(x)), "where(mask, x, tanh(x))"),
            "clamp(scalar)": (lambda x: x.clamp(low, high), f"clamp({low:.2f},{high:.2f})"),
            "clamp(tensor)": (
                lambda x: x.clamp(constant - 0.5, constant + 0.5),
                "clamp(tensor bounds)",
            ),
            "maximum": (lambda x: torch.maximum(x, constant), "maximum(x, c)"),
            "minimum": (lambda x: torch.minimum(x, 0.5 * x.flip(-1)), "minimum(x, flip(x)/2)"),
            "amax": (lambda x: x - x.amax(-1, keepdim=True), "x - amax(x, -1)"),
            "amin": (lambda x: x * x.amin(-1, keepdim=True), "x * amin(x, -1)"),
            "cumsum": (lambda x: x.cumsum(-1), "cumsum(-1)"),
            "sort": (lambda x: x.sort(-1).values, "sort(-1).values"),
            "flip": (lambda x: x.flip(-1), "flip(-1)"),
            "roll": (lambda x: torch.roll(x, 1, -1), "roll(1, -1)"),
        }
        if image and kind in ("amax", "amin") and d.coin(0.5):
            dims = tuple(range(2, len(shape) + 1))
            texts["amax"] = (lambda x: x - x.amax(dims, keepdim=True), "x - amax(spatial)")
        fn, text = texts[kind]
        return self._add(Fn(text, fn), shape, text, kind)
