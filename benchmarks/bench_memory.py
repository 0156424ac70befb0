"""Peak memory of the analyses at their defaults on torchvision's ResNet-18 and ConvNeXt-tiny.

The networks are written here, layer for layer as torchvision builds them (torchvision is not
a dependency): ``resnet18()`` (1000 classes, 11,689,512 parameters; the ResNet-18 of
``bench_resnet18.py``) and ``convnext_tiny(num_classes=10)`` (27,827,818 parameters;
stochastic depth off, as in eval mode), float32, eval mode, initialised under seed 0. One
batch of 8 random 3x32x32 images with random labels (seed 1), cross-entropy loss, one
torch thread. Each stage runs in a fresh process: ``model_hessian_trace``,
``model_top_eigenvalues`` and ``model_spectral_density`` with their defaults (the memory
budget ``max_bytes`` too: a fifth of the machine's memory). Printed per stage: the method
the trace chose, products, seconds, the process's peak resident memory (``ru_maxrss``) and
its resident memory before the analysis (model and data loaded).

Usage::

    python benchmarks/bench_memory.py                       # both networks: about 5 minutes
    python benchmarks/bench_memory.py --models resnet18 --stages trace

Not collected by pytest.
"""

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import bench_resnet18  # noqa: E402

MODELS = ("resnet18", "convnext_tiny")
STAGES = ("trace", "top eigenvalue", "spectral density")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, H, W)`` tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, LayerNorm, an inverted MLP, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_scale * self.block(x) + x


class ConvNeXtTiny(nn.Module):
    """torchvision's ``convnext_tiny``: stages of 3, 3, 9, 3 blocks of widths 96-768."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        depths, dims = (3, 3, 9, 3), (96, 192, 384, 768)
        stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        layers: list[nn.Module] = [stem]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            layers.append(nn.Sequential(*[CNBlock(dim) for _ in range(depth)]))
            if i + 1 < len(dims):
                down = nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2))
                layers.append(down)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    if name == "resnet18":
        model, classes = bench_resnet18.ResNet18(num_classes=1000), 1000
    else:
        model, classes = ConvNeXtTiny(num_classes=10), 10
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, classes, (8,), generator=g))
    return model.eval(), batch


def child(name: str, stage: str) -> None:
    import torch_secorder as ts

    torch.set_num_threads(1)
    model, batch = build(name)
    loss_fn = nn.CrossEntropyLoss()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tic = time.perf_counter()
    if stage == "trace":
        result = ts.model_hessian_trace(model, loss_fn, batch)
        what = f"{result.method}, {float(result.value):.4g}"
    elif stage == "top eigenvalue":
        result = ts.model_top_eigenvalues(model, loss_fn, batch)
        what = f"{float(result.eigenvalues[0]):.6g}"
    else:
        result = ts.model_spectral_density(model, loss_fn, batch)
        what = f"nodes in [{float(result.nodes.min()):.4g}, {float(result.nodes.max()):.4g}]"
    seconds = time.perf_counter() - tic
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    params = sum(p.numel() for p in model.parameters())
    print(
        f"| {name} ({params:,}) | {stage} | {what} | {result.num_matvecs} | {seconds:.1f} s | "
        f"{peak:.2f} GiB | {before:.2f} GiB |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    print("| network (parameters) | analysis | result | products | time | peak RSS | before |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.models:
        for stage in args.stages:
            command = [sys.executable, __file__, "--child", name, stage]
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
