"""The convolutional families: stems on tiny 1-d and 2-d images, convolutions, pooling,
resampling and padding."""

import math
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import nn

from tests.core.fuzz.base import BuilderBase, Made, Shape
from tests.core.fuzz.modules import Fn


class Images(BuilderBase):
    """Draws the stems and operations of models on images (``cnn2d``) and signals (``cnn1d``)."""

    def _stem_cnn2d(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        channels, height, width = d.int(1, 2), d.int(3, 5), d.int(3, 5)
        self._stem_text = f"image {channels}x{height}x{width}"
        made = None
        while made is None:
            made = self._conv((channels, height, width))
        self._stem_text += f" > {self.parts.pop()}"
        module, shape = made
        return module, shape, lambda n: d.randn(n, channels, height, width)

    def _stem_cnn1d(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        channels, length = d.int(1, 3), d.int(4, 7)
        self._stem_text = f"signal {channels}x{length}"
        made = None
        while made is None:
            made = self._conv((channels, length))
        self._stem_text += f" > {self.parts.pop()}"
        module, shape = made
        return module, shape, lambda n: d.randn(n, channels, length)

    def _conv(self, shape: Shape) -> Made:
        d = self.draw
        dims = len(shape) - 1
        channels, spatial = shape[0], list(shape[1:])
        transposed = d.coin(0.15)
        groups = d.choice([g for g in (1, 1, 2, channels) if channels % g == 0])
        out = groups * d.int(1, max(1, 4 // groups))
        kernel = d.int(1, 3)
        stride = d.choice([1, 1, 2])
        dilation = d.choice([1, 1, 2])
        bias = d.coin(0.8)
        name = ("ConvTranspose" if transposed else "Conv") + f"{dims}d"
        tags = [name] + (["grouped-conv"] if groups > 1 else [])
        tags += ["strided-conv"] if stride > 1 else []
        tags += ["dilated-conv"] if dilation > 1 else []
        if transposed:
            kernel = max(kernel, 2)
            module = getattr(nn, name)(
                channels, out, kernel, stride=stride, groups=groups, bias=bias, dilation=dilation
            )
            size = [(s - 1) * stride + dilation * (kernel - 1) + 1 for s in spatial]
            if math.prod(size) > (30 if dims == 2 else 10):
                return None
            text = f"{name}({channels},{out},k{kernel},s{stride},d{dilation},g{groups})"
            made = self._add(module, (out, *size), text, *tags)
            self.fresh = True
            return made
        padding: int | str = d.choice([0, 1, 1, "same", "valid"])
        if padding == "same" and stride > 1:
            padding = 1
        mode = d.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        reach = dilation * (kernel - 1)
        pads = [reach // 2 + reach % 2] * dims if padding == "same" else []
        pads = pads or [0 if padding == "valid" else padding] * dims  # type: ignore[list-item]
        if mode == "reflect" and any(p >= s for p, s in zip(pads, spatial)):
            mode = "zeros"
        if mode == "circular" and any(p > s for p, s in zip(pads, spatial)):
            mode = "zeros"
        if not any(pads):
            mode = "zeros"
        if padding == "same":
            size = list(spatial)
        else:
            size = [(s + 2 * p - reach - 1) // stride + 1 for s, p in zip(spatial, pads)]
        if min(size) < 1:
            return None
        module = getattr(nn, name)(
            channels,
            out,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=mode,
        )
        if mode != "zeros":
            tags.append(f"conv-padding({mode})")
        text = f"{name}({channels},{out},k{kernel},s{stride},d{dilation},g{groups},p{padding}"
        text += f"{'' if mode == 'zeros' else ',' + mode}{'' if bias else ',nobias'})"
        made = self._add(module, (out, *size), text, *tags)
        self.fresh = True
        return made

    def _pool(self, shape: Shape) -> Made:
        d = self.draw
        dims = len(shape) - 1
        channels, spatial = shape[0], list(shape[1:])
        kind = d.choice(["MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "LPPool"])
        if kind.startswith("Adaptive"):
            size = [min(s, 2) for s in spatial]
            module = getattr(nn, f"{kind}{dims}d")(size if dims > 1 else size[0])
            return self._add(module, (channels, *size), f"{kind}{dims}d({size})", kind)
        if min(spatial) < 2:
            return None
        stride = d.choice([1, 2])
        size = [(s - 2) // stride + 1 for s in spatial]
        if kind == "LPPool":
            norm = d.choice([1, 2])  # odd powers of negative sums have no real root
            module = getattr(nn, f"LPPool{dims}d")(norm, 2, stride=stride)
            return self._add(
                module, (channels, *size), f"LPPool{dims}d(p{norm},k2,s{stride})", kind
            )
        module = getattr(nn, f"{kind}{dims}d")(2, stride=stride)
        return self._add(module, (channels, *size), f"{kind}{dims}d(k2,s{stride})", kind)

    def _resample(self, shape: Shape) -> Made:
        d = self.draw
        dims = len(shape) - 1
        channels, spatial = shape[0], list(shape[1:])
        kinds = {"nearest": 1, "linear": 1, "pad": 2}
        kind = d.weighted({**kinds, "shuffle": 1, "unshuffle": 1} if dims == 2 else kinds)
        if kind in ("nearest", "linear"):
            size = [2 * s for s in spatial]
            if math.prod(size) > (40 if dims == 2 else 14):
                return None
            mode = kind if kind == "nearest" else ("bilinear" if dims == 2 else "linear")
            corners = None if kind == "nearest" else d.coin(0.5)
            module = nn.Upsample(scale_factor=2, mode=mode, align_corners=corners)
            text = f"Upsample(x2,{mode}{',corners' if corners else ''})"
            return self._add(module, (channels, *size), text, f"Upsample({kind})")
        if kind == "shuffle":
            size = [2 * s for s in spatial]
            if math.prod(size) > 36:
                return None
            if channels % 4 == 0:
                module, text, out = nn.PixelShuffle(2), "PixelShuffle(2)", channels // 4
            else:
                module = nn.Sequential(nn.Conv2d(channels, 4, 1), nn.PixelShuffle(2))
                text, out = f"Conv2d({channels},4,k1) > PixelShuffle(2)", 1
            return self._add(module, (out, *size), text, "PixelShuffle", "Conv2d")
        if kind == "unshuffle":
            height, width = spatial
            module = nn.PixelUnshuffle(2)
            text = "PixelUnshuffle(2)"
            if height % 2 or width % 2:
                pad = [0, width % 2, 0, height % 2]
                fn = lambda x: F.pad(x, pad, mode="replicate")  # noqa: E731
                module = nn.Sequential(Fn("pad to even", fn), module)
                text = f"F.pad({pad},replicate) > {text}"
            size = [(s + 1) // 2 for s in spatial]
            if 4 * channels * math.prod(size) > 64:
                return None
            return self._add(module, (4 * channels, *size), text, "PixelUnshuffle")
        mode = d.choice(["constant", "reflect", "replicate", "circular"])
        if mode == "reflect" and min(spatial) < 2:
            mode = "constant"
        size = [s + 2 for s in spatial]
        if math.prod(size) > (49 if dims == 2 else 14):
            return None
        value = d.uniform(-1, 1) if mode == "constant" else None
        fn = lambda x: F.pad(x, [1, 1] * dims, mode=mode, value=value)  # noqa: E731
        return self._add(
            Fn(f"pad({mode})", fn), (channels, *size), f"F.pad(1,{mode})", f"pad({mode})"
        )
