"""Assembling a case: stem, body of random operations, head, loss, data and selection."""

import copy
import fnmatch
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tests.core.fuzz.base import F64, Draw, Made, Shape
from tests.core.fuzz.case import FuzzCase
from tests.core.fuzz.images import Images
from tests.core.fuzz.layers import Layers
from tests.core.fuzz.losses import Losses
from tests.core.fuzz.modules import RMSNORM, Concat, Fn, FuzzNet, TiedTranspose
from tests.core.fuzz.operations import TensorOperations
from tests.core.fuzz.sequences import Sequences
from tests.core.fuzz.structures import Structures

MAX_PARAMETERS = 400
"""Most parameters of a model (larger draws are drawn again), so one model takes milliseconds."""


def build_case(seed: int) -> FuzzCase:
    """The case of ``seed``: a random model, loss, data and selection (see the module)."""
    draw = Draw(seed)
    for _ in range(20):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            builder = Builder(draw)
            case = builder.build(seed)
        if sum(p.numel() for p in case.model.parameters()) <= MAX_PARAMETERS:
            return case
    raise AssertionError(f"seed {seed}: no model of at most {MAX_PARAMETERS} parameters drawn")


class Builder(Layers, TensorOperations, Structures, Images, Sequences, Losses):
    """Draws one case; the operation builders share its draw, tags and description."""

    # ------------------------------------------------------------------------- assembly

    def build(self, seed: int) -> FuzzCase:
        d = self.draw
        self.family = d.weighted(
            {"mlp": 6, "cnn2d": 4, "cnn1d": 2, "tokens": 3, "unbatched": 1.5, "rnn": 2, "seq": 1.5}
        )
        stem, shape, make_inputs = getattr(self, f"_stem_{self.family}")()
        body: list[nn.Module] = []
        for _ in range(d.int(1, 7)):
            made = self._operation(shape)
            if made is not None:
                module, shape = made
                body.append(module)
        head, rows, classes = self._head(shape)
        heads = d.weighted({"one": 8, "two": 1, "byol": 1})
        second = None
        if heads != "one":
            second = copy.deepcopy(head)  # the same layers, drawn afresh
            for module in second.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
            self.tags.add("two-heads" if heads == "two" else "byol")
        model = FuzzNet(stem, body, head, second)
        model.detach_second = heads == "byol"
        model.to(F64)
        self._initialize(model)
        model.eval()
        for module in self.train:
            module.train()
        loss_fn, make_targets, loss_text = self._loss(model, classes, heads)
        if d.coin(0.1) and len(list(model.parameters())) > 1:  # one stays trainable
            frozen = d.choice(name for name, _ in model.named_parameters())
            model.get_parameter(frozen).requires_grad_(False)
            self.parts.append(f"frozen {frozen}")
            self.tags.add("frozen-parameter")
        n = d.weighted({1: 2, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1, 9: 1})
        inputs = make_inputs(n)
        targets = make_targets(rows(n))
        sizes = [d.int(1, 5) for _ in range(d.int(1, 3))] + ([1] if d.coin(0.5) else [])
        batches = []
        for size in sizes:
            x = make_inputs(size)
            batches.append((x, make_targets(rows(size))))
        selection = self._selection(model)
        # under torch.func, recurrent layers and MultiheadAttention change the masks of a
        # train-mode dropout (already the gradient differs from plain autograd's, torch 2.13)
        dense_oracle = self.dense_oracle and not (self.dropout and self.sequential)
        head_text = {"one": "", "two": ", unused second head", "byol": ", detached BYOL target"}
        description = (
            f"seed {seed}: {self.family}, batch {n} | {self._stem_text} > "
            f"{' > '.join(self.parts) or '(no body)'} > head {self._head_text}"
            f"{head_text[heads]} | loss {loss_text} | params={selection!r}"
        )
        return FuzzCase(
            seed=seed,
            model=model,
            loss_fn=loss_fn,
            inputs=inputs,
            targets=targets,
            params=selection,
            batches=batches,
            description=description,
            tags=self.tags,
            dense_oracle=dense_oracle,
            global_hooks=self.global_hooks,
        )

    def _initialize(self, model: nn.Module) -> None:
        """Random affine parameters and running statistics of norms; small layers made small."""
        d = self.draw
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._NormBase):
                    if module.affine:
                        module.weight.copy_(1 + d.randn(*module.weight.shape, scale=0.3))
                        module.bias.copy_(d.randn(*module.bias.shape, scale=0.3))
                    if module.running_mean is not None:
                        module.running_mean.copy_(d.randn(*module.running_mean.shape, scale=0.3))
                        module.running_var.copy_(0.5 + d.rand(*module.running_var.shape))
                elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, RMSNORM)):
                    if getattr(module, "weight", None) is not None:
                        module.weight.copy_(1 + d.randn(*module.weight.shape, scale=0.3))
                    if getattr(module, "bias", None) is not None:
                        module.bias.copy_(d.randn(*module.bias.shape, scale=0.3))
                elif isinstance(module, TiedTranspose):
                    module.bias.copy_(d.randn(*module.bias.shape, scale=0.3))
            for rescale in self.small:
                rescale()

    def _selection(self, model: nn.Module) -> str | list[str] | None:
        d = self.draw
        names = [name for name, _ in model.named_parameters()]
        kind = d.weighted({"all": 5, "name": 1.5, "glob": 1.5, "list": 3})
        if kind == "name":
            return d.choice(names)
        if kind == "glob":
            prefixes = sorted({name.rsplit(".", 1)[0] + ".*" for name in names})
            patterns = ["*.weight", "*.bias", "*weight*", *prefixes]
            return d.choice(p for p in patterns if fnmatch.filter(names, p))
        if kind == "list":
            chosen = d.rng.sample(names, d.int(1, min(4, len(names))))
            if d.coin(0.3):
                chosen.append(
                    d.choice(
                        p for p in ("*.weight", "*.bias", "*weight*") if fnmatch.filter(names, p)
                    )
                )
            return chosen
        return None

    # ------------------------------------------------------------------------- stems

    def _stem_mlp(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        width, hidden = d.int(2, 6), d.int(3, 8)
        if d.coin(0.15):
            other = d.int(1, 3)
            stem = Concat(nn.Linear(width + other, hidden))
            self._stem_text = f"cat(x{width}, z{other}) > Linear({width + other},{hidden})"
            self.tags.add("two-inputs")
            return stem, (hidden,), lambda n: (d.randn(n, width), d.randn(n, other))
        self._stem_text = f"Linear({width},{hidden})"
        self.fresh = True
        return nn.Linear(width, hidden), (hidden,), lambda n: d.randn(n, width)

    # ------------------------------------------------------------------------- heads

    def _head(self, shape: Shape) -> tuple[nn.Module, Callable[[int], int], int]:
        """The output layer, the number of output rows for ``n`` samples, and the classes."""
        d = self.draw
        k = d.int(2, 4)
        width = shape[-1]
        family = self.family
        text = f"Linear({width},{k})"
        if family in ("cnn1d", "cnn2d"):
            channels, spatial = shape[0], math.prod(shape[1:])
            if channels * spatial <= 32 and d.coin(0.6):
                head = nn.Sequential(nn.Flatten(), nn.Linear(channels * spatial, k))
                text = f"flatten > Linear({channels * spatial},{k})"
            else:
                pool = nn.AdaptiveAvgPool2d(1) if len(shape) == 3 else nn.AdaptiveAvgPool1d(1)
                head = nn.Sequential(pool, nn.Flatten(), nn.Linear(channels, k))
                text = f"global average > Linear({channels},{k})"
            rows = lambda n: n  # noqa: E731
        elif family in ("tokens", "rnn"):
            length = shape[0]
            pick = d.choice(["mean", "last", "all"] + (["tied"] if family == "tokens" else []))
            if pick == "tied" and width == self.embedding.embedding_dim:
                k = self.vocabulary
                head = Fn("x @ embedding.weight.T", lambda x: x @ self.embedding.weight.t())
                text = "tied to the embedding"
                self.tags.add("tied-transpose")
                rows = lambda n: n * length  # noqa: E731
            elif pick == "all" or pick == "tied":
                head, rows = nn.Linear(width, k), lambda n: n * length
                text = f"Linear({width},{k}) per token"
            else:
                reduce = (lambda x: x.mean(1)) if pick == "mean" else (lambda x: x[:, -1])
                head = nn.Sequential(Fn(pick, reduce), nn.Linear(width, k))
                text = f"{pick} token > Linear({width},{k})"
                rows = lambda n: n  # noqa: E731
        elif family == "seq":
            length = self.length
            if d.coin(0.5):
                head = nn.Sequential(Fn("x[-1]", lambda x: x[-1]), nn.Linear(width, k))
                text = f"last step > Linear({width},{k})"
                rows = lambda n: n  # noqa: E731
            else:
                head, rows = nn.Linear(width, k), lambda n: n * length
                text = f"Linear({width},{k}) per step"
        else:
            head, rows = nn.Linear(width, k), lambda n: n
        self._head_text = text
        return head, rows, k

    # ------------------------------------------------------------------------- operations

    def _operation(self, shape: Shape) -> Made:
        """One random operation applicable to ``shape`` (``None`` when the draw does not fit).

        Most are the plain operations of ordinary networks (layers, activations, norms,
        pooling), on which the structured rules apply; the rest may be anything.
        """
        d = self.draw
        image = self.family in ("cnn1d", "cnn2d")
        tokens = len(shape) == 2 and not image and shape[0] is not None
        if d.coin(0.45):
            plain: dict[Callable[[Shape], Made], float] = {
                self._linear_op: 0.5 if image else 3,
                self._piecewise_linear: 3,
                self._activation: 1.5,
                self._norm: 1,
                self._dropout: 0.4,
            }
            if image:
                plain.update({self._conv: 4, self._pool: 2})
            return d.weighted(plain)(shape)
        table: dict[Callable[[Shape], Made], float] = {
            self._activation: 3,
            self._linear_op: 2,
            self._norm: 2,
            self._batch_coupling: 1.5,
            self._tensor_op: 4,
            self._structure: 2,
            self._hooked: 1.5,
            self._dropout: 0.5,
            self._subclass: 0.7,
        }
        if image:
            table.update({self._conv: 3, self._pool: 2, self._resample: 5, self._linear_op: 0.5})
            table.update({self._tensor_op: 1.5, self._hooked: 1, self._subclass: 0.7})
        if tokens or self.family == "seq":
            table.update({self._attention: 3, self._token_op: 3})
        if tokens:
            table[self._rnn_op] = 0.5
        return d.weighted(table)(shape)
