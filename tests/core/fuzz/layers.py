"""The plain layers of ordinary networks: Linear, activations, norms and dropout."""

import math

from torch import nn

from tests.core.fuzz.base import BuilderBase, Made, Shape
from tests.core.fuzz.case import ACTIVATIONS, PIECEWISE_LINEAR
from tests.core.fuzz.modules import RMSNORM


class Layers(BuilderBase):
    """Draws Linear layers, activations, normalization and dropout."""

    def _piecewise_linear(self, shape: Shape) -> Made:
        """An activation that is piecewise linear."""
        name = self.draw.choice(PIECEWISE_LINEAR)
        return self._activation(shape, name)

    def _linear_op(self, shape: Shape) -> Made:
        d = self.draw
        width, out, bias = shape[-1], d.int(3, 8), d.coin(0.8)
        made = self._add(
            nn.Linear(width, out, bias=bias),
            (*shape[:-1], out),
            f"Linear({width},{out}{'' if bias else ',nobias'})",
            "Linear",
        )
        self.fresh = True
        return made

    def _activation(self, shape: Shape, name: str | None = None) -> Made:
        d = self.draw
        name = name or d.choice(ACTIVATIONS)
        image = self.family in ("cnn1d", "cnn2d")
        axis, index = (1, 0) if image else (-1, len(shape) - 1)
        size = shape[index]
        inplace = self.fresh and d.coin(0.4)
        text = name
        if name in ("Softmax", "LogSoftmax", "Softmin"):
            module = getattr(nn, name)(dim=axis)
        elif name == "GLU":
            if size % 2:
                return None
            module = nn.GLU(dim=axis)
            shape = (*shape[:index], size // 2, *shape[index + 1 :])
        elif name == "LeakyReLU":
            slope = d.uniform(0.01, 0.3)
            module, text = nn.LeakyReLU(slope, inplace=inplace), f"LeakyReLU({slope:.2f})"
        elif name == "PReLU":
            count = size if image and d.coin(0.5) else 1
            module, text = nn.PReLU(count), f"PReLU({count})"
        elif name == "RReLU":
            module, text = nn.RReLU(0.1, 0.3, inplace=inplace), "RReLU(eval)"
        elif name in ("ELU", "CELU"):
            alpha = d.uniform(0.5, 1.5)
            module, text = getattr(nn, name)(alpha, inplace=inplace), f"{name}({alpha:.2f})"
        elif name == "GELU":
            approximate = d.choice(["none", "tanh"])
            module, text = nn.GELU(approximate), f"GELU({approximate})"
        elif name == "Softplus":
            beta, threshold = d.uniform(0.5, 3), d.uniform(1, 20)
            module, text = nn.Softplus(beta, threshold), f"Softplus({beta:.2f},{threshold:.1f})"
        elif name == "Hardtanh":
            low, high = d.uniform(-2, -0.2), d.uniform(0.2, 2)
            module = nn.Hardtanh(low, high, inplace=inplace)
            text = f"Hardtanh({low:.2f},{high:.2f})"
        elif name in ("Hardshrink", "Softshrink"):
            lambd = d.uniform(0.05, 0.5)
            module, text = getattr(nn, name)(lambd), f"{name}({lambd:.2f})"
        elif name == "Threshold":
            threshold, value = d.uniform(-0.5, 0.5), d.uniform(-1, 1)
            module = nn.Threshold(threshold, value, inplace=inplace)
            text = f"Threshold({threshold:.2f},{value:.2f})"
        elif name in ("ReLU", "ReLU6", "SELU", "SiLU", "Mish", "Hardswish", "Hardsigmoid"):
            # torch.func cannot differentiate hardsigmoid twice (the library routes it)
            self.dense_oracle = self.dense_oracle and name != "Hardsigmoid"
            module = getattr(nn, name)(inplace=inplace)
        else:
            module = getattr(nn, name)()
        if getattr(module, "inplace", False):
            text += "(in-place)"
            self.tags.add("in-place")
        return self._add(module, shape, text, name)

    def _norm(self, shape: Shape) -> Made:
        d = self.draw
        image = self.family in ("cnn1d", "cnn2d")
        vector = len(shape) == 1
        kinds = ["LayerNorm", "RMSNorm"]
        if vector or image:
            kinds += ["BatchNorm", "BatchNorm", "BatchNorm", "GroupNorm"]
        if image:
            kinds += ["InstanceNorm", "LocalResponseNorm"]
        kind = d.choice(kinds)
        channels = shape[0] if image else shape[-1]
        if kind == "BatchNorm":
            dims = 2 if len(shape) == 3 else 1
            affine, train = d.coin(0.85), d.coin(0.5)
            module = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels, affine=affine)
            mode = "train" if train else "eval"
            if train:
                self.train.append(module)
            text = f"BatchNorm{dims}d({channels},{mode}{'' if affine else ',no affine'})"
            return self._add(module, shape, text, f"BatchNorm{dims}d({mode})")
        if kind == "GroupNorm":
            groups = d.choice([g for g in range(1, channels + 1) if channels % g == 0])
            affine = d.coin(0.8)
            self.dense_oracle = self.dense_oracle and not affine
            text = f"GroupNorm({groups},{channels}{'' if affine else ',no affine'})"
            return self._add(nn.GroupNorm(groups, channels, affine=affine), shape, text, kind)
        if kind == "InstanceNorm":
            if math.prod(shape[1:]) < 2:
                return None
            affine, track, train = d.coin(0.5), d.coin(0.5), d.coin(0.5)
            cls = nn.InstanceNorm2d if len(shape) == 3 else nn.InstanceNorm1d
            module = cls(channels, affine=affine, track_running_stats=track)
            if train:
                self.train.append(module)
            self.dense_oracle = self.dense_oracle and not affine
            text = f"{cls.__name__}({channels}{',affine' if affine else ''}"
            text += f"{',running stats' if track else ''},{'train' if train else 'eval'})"
            return self._add(module, shape, text, kind)
        if kind == "LocalResponseNorm":
            size = d.int(2, 3)
            return self._add(nn.LocalResponseNorm(size), shape, f"LocalResponseNorm({size})", kind)
        normalized = list(shape) if image else [shape[-1]]
        if math.prod(normalized) > 40:
            normalized = [shape[-1]]
        affine = d.coin(0.8)
        if kind == "RMSNorm" and RMSNORM is not None:
            module = RMSNORM(normalized, elementwise_affine=affine)
            self.dense_oracle = self.dense_oracle and not affine
        else:
            kind = "LayerNorm"
            module = nn.LayerNorm(normalized, elementwise_affine=affine, bias=d.coin(0.8))
        text = f"{kind}({normalized}{'' if affine else ',no affine'})"
        return self._add(module, shape, text, kind)

    def _dropout(self, shape: Shape) -> Made:
        d = self.draw
        p = d.choice([0.2, 0.5])
        if self.family == "cnn2d" and d.coin(0.5):
            module, text = nn.Dropout2d(p), f"Dropout2d({p},train)"
        elif self.family == "cnn1d" and d.coin(0.5):
            module, text = nn.Dropout1d(p), f"Dropout1d({p},train)"
        else:
            module, text = nn.Dropout(p), f"Dropout({p},train)"
        self.train.append(module)
        self.dropout = True
        return self._add(module, shape, text, "Dropout(train)")
