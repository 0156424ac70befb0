"""Structure: residuals, a module called twice, tied weights, weight_norm, parametrizations,
hooks and caches, and layer subclasses that are nearly their base layer."""

from typing import Any

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from tests.core.fuzz.base import BuilderBase, Made, Shape
from tests.core.fuzz.modules import (
    Cache,
    CachingLinear,
    ExpConv1d,
    ExpConv2d,
    ExpLinear,
    Fn,
    Residual,
    SelfBilinear,
    SiluBatchNorm1d,
    Symmetric,
    TanhWeight,
    TiedShared,
    TiedTranspose,
    Twice,
)


class Structures(BuilderBase):
    """Draws structural modules, hooked or cached layers, and near-linear layer subclasses."""

    def _structure(self, shape: Shape) -> Made:
        d = self.draw
        width = shape[-1]
        image = self.family in ("cnn1d", "cnn2d")
        kind = d.choice(
            ["residual", "module-twice", "tied-transpose", "tied-shared", "weight_norm"]
            + ["parametrize", "Bilinear"]
        )
        act_name = d.choice(["Tanh", "ReLU", "GELU", "Softplus", "SiLU", "Sigmoid"])
        act = getattr(nn, act_name)()
        if kind == "residual":
            if image and d.coin(0.7):
                channels = shape[0]
                mode = d.choice(["zeros", "reflect", "replicate", "circular"])
                cls = nn.Conv2d if len(shape) == 3 else nn.Conv1d
                conv = cls(channels, channels, 3, padding=1, padding_mode=mode)
                inner, text = nn.Sequential(conv, act), f"x + {act_name}(Conv3x3(pad {mode}))"
                if mode != "zeros" and min(shape[1:]) < 2:
                    return None
            elif d.coin(0.3):
                inner, text = act, f"x + {act_name}(x)"
            else:
                inner, text = nn.Sequential(nn.Linear(width, width), act), f"x + {act_name}(Linear)"
            return self._add(Residual(inner), shape, text, "residual")
        if kind == "module-twice":
            text = f"Linear({width},{width}) called twice around {act_name}"
            return self._add(Twice(nn.Linear(width, width), act), shape, text, kind)
        if kind == "tied-transpose":
            hidden = d.int(2, 5)
            text = f"Linear({width},{hidden}) > {act_name} > its weight transposed"
            return self._add(TiedTranspose(width, hidden, act), shape, text, kind)
        if kind == "tied-shared":
            text = f"two Linear({width},{width}) sharing one weight, {act_name} between"
            return self._add(TiedShared(width, act), shape, text, kind)
        if kind == "Bilinear":
            out = d.int(2, 4)
            return self._add(
                SelfBilinear(width, out), (*shape[:-1], out), f"Bilinear(x, x)->{out}", kind
            )
        out = width if kind == "parametrize" and d.coin(0.5) else d.int(2, 6)
        linear = nn.Linear(width, out)
        if kind == "weight_norm":
            return self._add(
                weight_norm(linear), (*shape[:-1], out), f"weight_norm(Linear({width},{out}))", kind
            )
        rule = Symmetric() if out == width else TanhWeight()
        parametrize.register_parametrization(linear, "weight", rule)
        text = f"Linear({width},{out}) with {type(rule).__name__} weight"
        return self._add(linear, (*shape[:-1], out), text, kind)

    def _hooked(self, shape: Shape) -> Made:
        """A layer with a hook: storing its output for the loss, or changing it."""
        d = self.draw
        width = shape[-1]
        kind = d.weighted(
            {
                "hook(store)": 3,
                "hook(scale)": 1,
                "pre-hook(scale)": 1,
                "global-hook(store)": 2,
                "global-hook(scale)": 1,
                "cache(self)": 2,
                "cache(wrapper)": 1,
            }
        )
        key = f"act{len(self.penalties)}"
        if self.family in ("cnn1d", "cnn2d") and kind != "cache(self)" and d.coin(0.7):
            out = d.int(1, 4)
            cls = nn.Conv2d if len(shape) == 3 else nn.Conv1d
            layer: nn.Module = cls(shape[0], out, 1)
            name, shape = f"{cls.__name__}({shape[0]},{out},k1)", (out, *shape[1:])
        else:
            out = d.int(2, 6)
            layer = (CachingLinear if kind == "cache(self)" else nn.Linear)(width, out)
            name, shape = f"Linear({width},{out})", (*shape[:-1], out)
        module = layer
        scale, coef = d.uniform(0.5, 2), d.choice([0.1, 0.5])
        tap = self.tap
        if kind == "hook(store)":
            layer.register_forward_hook(lambda m, args, output: tap.__setitem__(key, output))
            self.penalties.append((f"hooked output of {name}", coef, lambda: tap[key]))
        elif kind == "hook(scale)":
            layer.register_forward_hook(lambda m, args, output: output * scale)
        elif kind == "pre-hook(scale)":
            layer.register_forward_pre_hook(lambda m, args: (args[0] * scale,))
        elif kind == "global-hook(store)":

            def store(m: nn.Module, args: Any, output: Any) -> None:
                if m is layer:
                    tap[key] = output

            self.global_hooks.append(store)
            self.penalties.append((f"globally hooked output of {name}", coef, lambda: tap[key]))
        elif kind == "global-hook(scale)":

            def rescale(m: nn.Module, args: Any, output: Any) -> Any:
                return output * scale if m is layer else None

            self.global_hooks.append(rescale)
        elif kind == "cache(self)":
            self.penalties.append((f"self-cached output of {name}", coef, lambda: layer.cache))
        else:
            module = Cache(layer)
            self.penalties.append((f"cached output of {name}", coef, lambda: module.cache))
        text = f"{name} with {kind}" + (f" x{scale:.2f}" if "scale" in kind else "")
        made = self._add(module, shape, text, kind, name.split("(")[0])
        self.fresh = True
        return made

    def _subclass(self, shape: Shape) -> Made:
        """A layer subclass that is nearly, but not exactly, its base layer on tiny values."""
        d = self.draw
        width = shape[-1]
        if len(shape) == 1 and d.coin(0.5):
            norm = SiluBatchNorm1d(width)

            def tiny() -> None:
                norm.weight.mul_(1e-4)
                norm.bias.mul_(1e-8)
                norm.running_mean.mul_(1e-4)

            self.small.append(tiny)
            body = nn.Sequential(
                Fn("x * 1e-4", lambda x: x * 1e-4), norm, Fn("x * 1e4", lambda x: x * 1e4)
            )
            text = f"1e-4 * x > SiluBatchNorm1d({width},eval, 1e-4 weights) > 1e4 * x"
            return self._add(body, shape, text, "SiluBatchNorm1d", "BatchNorm1d(eval)")
        if self.family in ("cnn1d", "cnn2d") and d.coin(0.6):
            channels, out = shape[0], d.int(1, 4)
            conv = (ExpConv2d if len(shape) == 3 else ExpConv1d)(channels, out, 1)
            self.small.append(lambda: conv.weight.mul_(1e-4))
            text = f"{type(conv).__name__}({channels},{out},k1, 1e-4 weights)"
            return self._add(conv, (out, *shape[1:]), text, "ExpConv")
        out = d.int(2, 5)
        layer = ExpLinear(width, out)
        self.small.append(lambda: layer.weight.mul_(1e-4))
        text = f"ExpLinear({width},{out}, 1e-4 weights)"
        return self._add(layer, (*shape[:-1], out), text, "ExpLinear")
