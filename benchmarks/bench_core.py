"""Benchmark the exact core of torch_secorder against hand-written autograd and torch.func.

Measures, on a tanh MLP and a small CNN (cross-entropy loss):

a. one Hessian-vector product (``hvp``, and ``model_hvp`` from the model) vs one gradient
   and vs the better of two hand-written double backwards (gradient with ``create_graph``,
   then the gradient of its dot with ``v``, or its vector-Jacobian product with ``v`` as
   ``grad_outputs``);
b. ``k`` products (``batched_hvp`` with its default chunks) vs a hand-written loop
   over one retained graph and vs one hand-written ``is_grads_batched`` call;
c. the exact diagonal (``hessian_diagonal``) vs a per-element double-backward loop (one
   backward per element, as torch-secorder 0.0.1 does) and vs ``torch.func`` (vmapped
   forward-over-reverse products with unit vectors); both baselines are timed on a
   stratified subset of the elements and extrapolated linearly, as the table says;
d. the full Hessian (``hessian_matrix``) vs ``torch.func.hessian`` over ``functional_call``;
g. (``--sections g``) what the guarantees of every gradient graph cost one product: the
   hand-written double backward of (a) with the RNG fork, the SDPA backend flags and the walk
   of the forward's autograd nodes added, each alone and all three, against ``hvp``;
o. (``--sections o``) Hessians of a small MLP's and CNN's outputs, per sample and output
   element (``output_hessian_matrix``, ``output_hessian_dict``, with ``diagonal_only``, and
   ``output_sharpness``) vs ``torch.func.hessian`` over ``functional_call`` as hesse calls it,
   timed and with the peak memory of each method; for comparison also
   ``output_hessian_matrix`` with the engine batching products by ``torch.func.vmap`` (its
   choice on GPUs) on the CPU.

Every time is the median over repeats; the methods of one measurement alternate within each
repeat so that load on a shared machine hits them alike; ratios come from the same run. Each
result is checked against its baseline (largest difference relative to the largest entry).

Usage::

    python benchmarks/bench_core.py             # the full run (several minutes)
    python benchmarks/bench_core.py --quick     # a smoke run on tiny models (seconds)
    python benchmarks/bench_core.py --device cuda   # on a GPU

Optional comparisons in the same run (see benchmarks/README.md): torch-secorder 0.0.1's
``exact_hvp`` in (a) and ``hessian_diagonal`` in (c), given the directory of its unpacked
wheel (``--peer-0.0.1 DIR``); and another version of this library, e.g. an earlier commit
exported with ``git archive`` (``--baseline DIR``), in every section.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jvp, vmap

import torch_secorder as ts
import torch_secorder.core._autograd as autograd_engine
from torch_secorder.core._autograd import GradientGraph


# ----------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    params: list[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.params = list(self.model.parameters())

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def loss(self) -> Tensor:
        return F.cross_entropy(self.model(self.inputs), self.targets)

    def flat_loss(self) -> Callable[[Tensor], Tensor]:
        """The loss as a function of one flat parameter vector, for torch.func."""
        names = [name for name, _ in self.model.named_parameters()]
        shapes = [p.shape for p in self.params]
        sizes = [p.numel() for p in self.params]
        buffers = dict(self.model.named_buffers())

        def f(theta: Tensor) -> Tensor:
            tensors = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
            out = functional_call(self.model, {**tensors, **buffers}, (self.inputs,))
            return F.cross_entropy(out, self.targets)

        return f

    def theta(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])


def mlp(width: int, batch: int, dtype: torch.dtype, device: torch.device) -> Workload:
    model = nn.Sequential(
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 10),
    ).to(device, dtype)
    inputs = torch.randn(batch, width, dtype=dtype).to(device)
    return Workload("mlp", model, inputs, torch.randint(0, 10, (batch,)).to(device))


def cnn(channels: int, batch: int, size: int, dtype: torch.dtype, device: torch.device) -> Workload:
    model = nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * channels * 16, 10),
    ).to(device, dtype)
    inputs = torch.randn(batch, 1, size, size, dtype=dtype).to(device)
    return Workload("cnn", model, inputs, torch.randint(0, 10, (batch,)).to(device))


def bn_cnn(dtype: torch.dtype, device: torch.device) -> Workload:
    """A small CNN with eval BatchNorm: 3,978 parameters, 64 RGB images of 16x16."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    ).to(device, dtype)
    model.eval()
    inputs = torch.randn(64, 3, 16, 16, dtype=dtype).to(device)
    return Workload("bn-cnn", model, inputs, torch.randint(0, 10, (64,)).to(device))


class _BasicBlock(nn.Module):
    """A CIFAR ResNet block: two 3x3 convolutions with BatchNorm, in-place ReLU, a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


def resnet(width: int, batch: int, size: int, dtype: torch.dtype, device: torch.device) -> Workload:
    """A CIFAR-style ResNet-8 (three stages of one block), in eval mode."""
    widths = [width, 2 * width, 4 * width]
    model = nn.Sequential(
        nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
        _BasicBlock(widths[0], widths[0], 1),
        _BasicBlock(widths[0], widths[1], 2),
        _BasicBlock(widths[1], widths[2], 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[2], 10),
    ).to(device, dtype)
    for m in model.modules():  # trained-looking statistics, then eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    inputs = torch.randn(batch, 3, size, size, dtype=dtype).to(device)
    return Workload("resnet", model, inputs, torch.randint(0, 10, (batch,)).to(device))


class _EncoderLayer(nn.Module):
    """A pre-norm transformer encoder layer with Linear projections (as timm and HF write them)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (
            f(h).view(b, t, self.heads, -1).transpose(1, 2)
            for f in (self.query, self.key, self.value)
        )
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class _Encoder(nn.Module):
    def __init__(self, features: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.layers = nn.Sequential(*(_EncoderLayer(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.layers(self.embed(x))).mean(1))


def transformer(
    width: int, tokens: int, batch: int, dtype: torch.dtype, device: torch.device
) -> Workload:
    """A 2-layer transformer encoder over ``tokens`` tokens of 16 features, 4 heads."""
    model = _Encoder(16, width, 4, 2).to(device, dtype)
    inputs = torch.randn(batch, tokens, 16, dtype=dtype).to(device)
    return Workload("transformer", model, inputs, torch.randint(0, 10, (batch,)).to(device))


# ----------------------------------------------------------------------------- timing
def synchronized_wall() -> float:
    """Wall time once the GPU has finished the work queued so far."""
    torch.cuda.synchronize()
    return time.perf_counter()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "cuda": synchronized_wall}
clock = CLOCKS["wall"]


def measure(
    methods: dict[str, Callable[[], object]], repeats: int, warmup: bool = True
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Time each method ``repeats`` times (after one warm-up call), alternating the methods.

    The order rotates from repeat to repeat, so no method always runs first or last.

    Returns:
        The times of each method, and the result of its last call.
    """
    names = list(methods)
    last: dict[str, object] = {}
    for name in names if warmup else ():
        last[name] = methods[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            tic = clock()
            last[name] = methods[name]()
            times[name].append(clock() - tic)
    return times, last


def median(times: Sequence[float]) -> float:
    return statistics.median(times)


def spread(times: Sequence[float]) -> float:
    """Relative interquartile range, a noise figure."""
    if len(times) < 4:
        return (max(times) - min(times)) / median(times)
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / median(times)


def rel_diff(a: object, b: object) -> float:
    """Largest absolute difference relative to the largest entry of ``b``."""
    a = a if isinstance(a, Tensor) else torch.cat([t.reshape(-1) for t in a])  # type: ignore[attr-defined]
    b = b if isinstance(b, Tensor) else torch.cat([t.reshape(-1) for t in b])  # type: ignore[attr-defined]
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- output
@dataclass
class Row:
    section: str
    workload: str
    method: str
    seconds: float | None
    spread: float | None
    ratio: float | None = None
    ratio_to: str = ""
    check: float | None = None
    note: str = ""


ROWS: list[Row] = []
DETAIL: list[str] = []


def report(row: Row) -> None:
    ROWS.append(row)
    ratio = "" if row.ratio is None else f"{row.ratio:7.3f}x {row.ratio_to}"
    check = "" if row.check is None else f"diff {row.check:.1e}"
    print(
        f"  {row.workload:4} {row.method:52} {fmt_time(row.seconds):>10} "
        f"{fmt_spread(row.spread):>6}  {ratio:36} {check:14} {row.note}",
        flush=True,
    )


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_spread(spread: float | None) -> str:
    return "" if spread is None else f"{100 * spread:.0f}%"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| | model | method | median | IQR | ratio | check | note |",
        "|---|---|---|---:|---:|---|---|---|",
    ]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.3f}x {row.ratio_to}"
        check = "" if row.check is None else f"{row.check:.0e}"
        lines.append(
            f"| {row.section} | {row.workload} | {row.method} | {fmt_time(row.seconds)} | "
            f"{fmt_spread(row.spread)} | {ratio} | {check} | {row.note} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- libraries
@dataclass
class Impl:
    """A library under test: this checkout, a baseline checkout, or a peer."""

    label: str
    functions: dict[str, Callable[..., object]]
    current: bool = False


FUNCTIONS = [
    "hvp",
    "model_hvp",
    "batched_hvp",
    "hessian_diagonal",
    "hessian_matrix",
    "model_hessian_diagonal",
]
"""The functions compared across versions of the library."""


def current_impl() -> Impl:
    return Impl("torch_secorder", {n: getattr(ts, n) for n in FUNCTIONS}, current=True)


def import_other(path: str) -> object:
    """Import another ``torch_secorder`` from ``path`` without shadowing this one.

    The current modules are set aside while the other is imported, then put back; the other
    package's functions keep their own module globals.
    """
    current = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "torch_secorder"}
    for n in current:
        del sys.modules[n]
    sys.path.insert(0, path)
    try:
        other = importlib.import_module("torch_secorder")
    finally:
        sys.path.remove(path)
        for n in [n for n in sys.modules if n.split(".")[0] == "torch_secorder"]:
            del sys.modules[n]
        sys.modules.update(current)
    return other


def baseline_impl(path: str) -> Impl:
    other = import_other(path)
    functions = {n: getattr(other, n) for n in FUNCTIONS if hasattr(other, n)}
    return Impl(f"baseline {path}", functions)


def peer_impl(path: str) -> Impl:
    old = import_other(path)
    version = getattr(old, "__version__", "?")
    if version != "0.0.1":
        raise SystemExit(f"--peer-0.0.1: {path} holds torch_secorder {version}, not 0.0.1")
    functions = {"hvp": old.exact_hvp, "hessian_diagonal": old.hessian_diagonal}
    return Impl("torch-secorder 0.0.1 (peer)", functions)  # type: ignore[attr-defined]


def method_name(impl: Impl, function: str) -> str:
    return f"{function}, {impl.label}" if not impl.current else f"torch_secorder.{function}"


# ----------------------------------------------------------------------------- (a) one HVP
def bench_hvp(w: Workload, repeats: int, impls: Sequence[Impl]) -> None:
    params, func = w.params, w.loss
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]

    def gradient() -> object:
        return torch.autograd.grad(func(), params)

    def hand() -> list[Tensor]:
        g = torch.autograd.grad(func(), params, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
        return list(torch.autograd.grad(dot, params))

    def hand_vjp() -> list[Tensor]:
        g = torch.autograd.grad(func(), params, create_graph=True)
        return list(torch.autograd.grad(g, params, v))

    hands = ["hand double backward", "hand double backward (grad_outputs)"]
    methods: dict[str, Callable[[], object]] = {
        "gradient": gradient,
        hands[0]: hand,
        hands[1]: hand_vjp,
    }
    loss_fn = nn.CrossEntropyLoss()
    for impl in impls:
        if "hvp" in impl.functions:
            f = impl.functions["hvp"]
            methods[method_name(impl, "hvp")] = lambda f=f: f(func, params, v)
        if "model_hvp" in impl.functions:
            f = impl.functions["model_hvp"]
            methods[method_name(impl, "model_hvp")] = lambda f=f: f(
                w.model, loss_fn, w.inputs, w.targets, v
            )
    times, last = measure(methods, repeats)
    t = {name: median(ts_) for name, ts_ in times.items()}
    report(Row("a", w.name, "gradient", t["gradient"], spread(times["gradient"])))
    hand_name = min(hands, key=t.__getitem__)  # the better of the two
    for name in methods:
        if name == "gradient":
            continue
        current = ("torch_secorder.hvp", "torch_secorder.model_hvp")
        target = " (target <= 1.05)" if name in current else ""
        report(
            Row(
                "a",
                w.name,
                name,
                t[name],
                spread(times[name]),
                t[name] / t[hand_name],
                "better hand" + target,
                None if name in hands else rel_diff(last[name], last[hand_name]),
                f"{t[name] / t['gradient']:.2f}x gradient",
            )
        )


# ----------------------------------------------------------------------------- (g) guarantees
def bench_guarantees(w: Workload, repeats: int) -> None:
    """What the per-graph guarantees cost one product: each added to the hand-written one.

    The forward pass of every gradient graph forks the RNG (no trace on the global RNG), sets
    the SDPA backend flags to the math kernel (the only one with a double backward) and walks
    the autograd nodes the pass made (for operators that need a route, and custom functions
    that may cut a gradient): each is added alone to the better hand-written double backward
    of (a), then all three, against ``hvp``.
    """
    from torch_secorder.core._forward import _SDP_BACKENDS, forward_facts, next_node_number

    params, func = w.params, w.loss
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]

    def product(loss: Tensor) -> list[Tensor]:
        g = torch.autograd.grad(loss, params, create_graph=True)
        return list(torch.autograd.grad(g, params, v))

    def forward(rng: bool, sdp: bool, walk: bool) -> Tensor:
        state = torch.get_rng_state() if rng else None
        changed = (
            [(use, on) for enabled, on, use in _SDP_BACKENDS if enabled() != use] if sdp else []
        )
        for use, on in changed:
            on(use)
        first = next_node_number()
        loss = func()
        for use, on in changed:
            on(not use)
        if state is not None:
            torch.set_rng_state(state)
        if walk:
            forward_facts(loss, first)
        return loss

    methods: dict[str, Callable[[], object]] = {
        "hand double backward": lambda: product(func()),
        "+ RNG fork": lambda: product(forward(True, False, False)),
        "+ SDPA flags": lambda: product(forward(False, True, False)),
        "+ walk of the forward's nodes": lambda: product(forward(False, False, True)),
        "+ all three": lambda: product(forward(True, True, True)),
        "torch_secorder.hvp": lambda: ts.hvp(func, params, v),
    }
    times, last = measure(methods, repeats)
    t = {name: median(ts_) for name, ts_ in times.items()}
    hand = t["hand double backward"]
    for name in methods:
        extra = f"+{(t[name] - hand) * 1e6:.0f} us"
        check = (
            None
            if name == "hand double backward"
            else rel_diff(last[name], last["hand double backward"])
        )
        report(
            Row(
                "g",
                w.name,
                name,
                t[name],
                spread(times[name]),
                t[name] / hand,
                "hand",
                check,
                extra,
            )
        )


# ----------------------------------------------------------------------------- (b) k HVPs
def bench_batched(w: Workload, k: int, repeats: int, impls: Sequence[Impl]) -> None:
    params, func = w.params, w.loss
    gen = torch.Generator().manual_seed(2)
    vs = [torch.randn((k, *p.shape), generator=gen, dtype=p.dtype).to(p.device) for p in params]

    def loop() -> list[Tensor]:
        g = torch.autograd.grad(func(), params, create_graph=True)
        columns = [
            torch.autograd.grad(g, params, [u[j] for u in vs], retain_graph=True) for j in range(k)
        ]
        return [torch.stack(c) for c in zip(*columns)]

    def batched() -> list[Tensor]:
        g = torch.autograd.grad(func(), params, create_graph=True)
        return list(torch.autograd.grad(g, params, vs, is_grads_batched=True))

    hand = ["hand loop (one graph, retain_graph)", "hand is_grads_batched (one call)"]
    methods: dict[str, Callable[[], object]] = {hand[0]: loop, hand[1]: batched}
    for impl in impls:
        if "batched_hvp" in impl.functions:
            f = impl.functions["batched_hvp"]
            methods[method_name(impl, "batched_hvp")] = lambda f=f: f(func, params, vs)
    times, last = measure(methods, repeats)
    t = {name: median(ts_) for name, ts_ in times.items()}
    best = min(t[hand[0]], t[hand[1]])
    for name in methods:
        target = " (target <= 1)" if name.startswith("torch_secorder") else ""
        report(
            Row(
                "b",
                w.name,
                f"{name}, k={k}",
                t[name],
                spread(times[name]),
                t[name] / best,
                "better hand" + target,
                None if name in hand else rel_diff(last[name], last[hand[0]]),
            )
        )


# ----------------------------------------------------------------------------- (c) diagonal
def stratified_rows(params: Sequence[Tensor], count: int) -> list[list[int]]:
    """For each parameter, about ``count * n_i / P`` evenly spaced element indices (>= 1)."""
    total = sum(p.numel() for p in params)
    rows = []
    for p in params:
        m = min(p.numel(), max(1, round(count * p.numel() / total)))
        rows.append(sorted({math.floor(j * p.numel() / m) for j in range(m)}))
    return rows


def per_element_loop(w: Workload, rows: list[list[int]]) -> tuple[float, list[Tensor]]:
    """Time the per-element loop on ``rows``; extrapolate to all elements (linear in count)."""
    params = w.params
    tic = clock()
    g = torch.autograd.grad(w.loss(), params, create_graph=True)
    seconds = clock() - tic
    values = []
    for p, gi, idx in zip(params, g, rows):
        flat = gi.reshape(-1)
        tic = clock()
        entries = [
            torch.autograd.grad(flat[j], p, retain_graph=True)[0].reshape(-1)[j] for j in idx
        ]
        seconds += (clock() - tic) * p.numel() / len(idx)
        values.append(torch.stack(entries))
    return seconds, values


def func_diagonal(w: Workload, rows: list[list[int]], chunk: int) -> tuple[float, list[Tensor]]:
    """Time torch.func unit-vector HVPs (vmapped jvp of grad) on ``rows``; extrapolate."""
    f, theta = w.flat_loss(), w.theta()
    offsets = [0]
    for p in w.params:
        offsets.append(offsets[-1] + p.numel())
    flat_rows = torch.tensor(
        [offsets[i] + j for i, idx in enumerate(rows) for j in idx], device=theta.device
    )

    def hvp_row(u: Tensor) -> Tensor:
        return jvp(grad(f), (theta,), (u,))[1]

    tic = clock()
    basis = torch.zeros(len(flat_rows), theta.numel(), dtype=theta.dtype, device=theta.device)
    basis[torch.arange(len(flat_rows), device=theta.device), flat_rows] = 1
    products = vmap(hvp_row, chunk_size=chunk)(basis)
    entries = products[torch.arange(len(flat_rows), device=theta.device), flat_rows]
    seconds = (clock() - tic) * theta.numel() / len(flat_rows)
    values = list(entries.split([len(idx) for idx in rows]))
    return seconds, values


def backpack_diagonal(w: Workload) -> Callable[[], tuple[float, object]] | None:
    """BackPACK's exact DiagHessian, where it is installed and supports the model."""
    try:
        import backpack
        from backpack.extensions import DiagHessian
    except ImportError:
        return None
    import copy

    model = backpack.extend(copy.deepcopy(w.model))
    loss_fn = backpack.extend(nn.CrossEntropyLoss())

    def run() -> tuple[float, object]:
        tic = clock()
        loss = loss_fn(model(w.inputs), w.targets)
        with backpack.backpack(DiagHessian()):
            loss.backward()
        values = [p.diag_h.detach().clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return clock() - tic, values

    try:
        run()
    except Exception as err:  # noqa: BLE001 - a layer BackPACK does not support
        print(f"  {w.name}: BackPACK DiagHessian fails: {type(err).__name__}: {err}"[:200])
        return None
    return run


def bench_diagonal(
    w: Workload,
    repeats: int,
    subset: int,
    func_chunk: int,
    impls: Sequence[Impl],
    with_func: bool = True,
) -> None:
    params, func = w.params, w.loss
    rows = stratified_rows(params, subset)
    picked = sum(len(r) for r in rows)
    loop_name, func_name = "per-element double-backward loop", "torch.func vmap(jvp(grad))"

    def timed(f: Callable[..., object]) -> Callable[[], tuple[float, object]]:
        def run() -> tuple[float, object]:
            tic = clock()
            values = f(func, params)
            return clock() - tic, values

        return run

    def structured(f: Callable[..., object]) -> Callable[[], tuple[float, object]]:
        def run() -> tuple[float, object]:
            tic = clock()
            values = f(w.model, nn.CrossEntropyLoss(), w.inputs, w.targets)
            return clock() - tic, values

        return run

    methods: dict[str, Callable[[], tuple[float, object]]] = {
        loop_name: lambda: per_element_loop(w, rows),
        func_name: lambda: func_diagonal(w, rows, func_chunk),
    }
    if with_func is False:
        del methods[func_name]
    for impl in impls:
        if "hessian_diagonal" in impl.functions:
            methods[method_name(impl, "hessian_diagonal")] = timed(
                impl.functions["hessian_diagonal"]
            )
    for impl in impls:
        if "model_hessian_diagonal" in impl.functions:
            name = method_name(impl, "model_hessian_diagonal")
            methods[name] = structured(impl.functions["model_hessian_diagonal"])
    structured_name = "torch_secorder.model_hessian_diagonal"
    backpack = backpack_diagonal(w)
    if backpack is not None:
        methods["BackPACK DiagHessian (peer)"] = backpack
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    values: dict[str, object] = {}
    for r in range(repeats + 1):  # round 0 warms up and is not kept
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds, values[name] = methods[name]()
            if r:
                times[name].append(seconds)
    t = {name: median(times[name]) for name in names}
    note = f"extrapolated from {picked} of {w.num_params} elements"
    report(Row("c", w.name, loop_name, t[loop_name], spread(times[loop_name]), note=note))
    for name in names[1:]:
        subset_of_all = name != func_name
        result = values[name]
        if subset_of_all:  # all elements: compare the sampled ones
            result = [d.reshape(-1)[idx] for d, idx in zip(result, rows)]  # type: ignore[attr-defined]
        target = " (target >= 5)" if name == "torch_secorder.hessian_diagonal" else ""
        if name == structured_name:
            target = " (target >= 10)"
        report(
            Row(
                "c",
                w.name,
                name,
                t[name],
                spread(times[name]),
                t[loop_name] / t[name],
                "speed-up over loop" + target,
                rel_diff(result, values[loop_name]),
                "all elements" if subset_of_all else note + f", vmap chunk_size={func_chunk}",
            )
        )


def bench_diagonal_detail(w: Workload, repeats: int, subset: int) -> None:
    """Per parameter: microseconds per diagonal element, per-element loop vs library chunks.

    Shows where the time of (c) goes: the per-product cost of a double backward to one
    parameter, which batching can only amortise, not remove. Library times include one
    forward pass and gradient per call (visible only for the smallest parameters).
    """
    func = w.loss
    rows = stratified_rows(w.params, subset)
    names = [name for name, _ in w.model.named_parameters()]
    variants: dict[str, int | None] = {"chunk 1": 1, "chunk 8": 8, "chunk 32": 32, "auto": None}
    print(f"  {w.name}: microseconds per diagonal element (median of {repeats})")
    header = "| model | parameter | elements | per-element loop |"
    header += "".join(f" library {v} |" for v in variants) + " loop / auto |"
    lines = [header, "|---|---|---:|" + "---:|" * (len(variants) + 2)]
    for name, p, idx in zip(names, w.params, rows):
        g = torch.autograd.grad(func(), [p], create_graph=True)[0].reshape(-1)
        elem_times = []
        for _ in range(repeats):
            tic = clock()
            for j in idx:
                torch.autograd.grad(g[j], p, retain_graph=True)
            elem_times.append((clock() - tic) / len(idx))
        del g
        per_element = median(elem_times)
        lib = {}
        for label, chunk in variants.items():
            times = []
            for _ in range(repeats):
                tic = clock()
                ts.hessian_diagonal(func, [p], chunk_size=chunk)
                times.append((clock() - tic) / p.numel())
            lib[label] = median(times)
        cells = "".join(f" {1e6 * lib[v]:.0f} |" for v in variants)
        line = (
            f"| {w.name} | {name} {tuple(p.shape)} | {p.numel()} | {1e6 * per_element:.0f} |"
            f"{cells} {per_element / lib['auto']:.2f}x |"
        )
        lines.append(line)
        print("  " + line, flush=True)
    DETAIL.append("\n".join(lines))


# ----------------------------------------------------------------------------- (d) Hessian
def bench_matrix(w: Workload, repeats: int, impls: Sequence[Impl]) -> None:
    params, func = w.params, w.loss
    f, theta = w.flat_loss(), w.theta()
    func_name = "torch.func.hessian (functional_call)"
    methods: dict[str, Callable[[], object]] = {func_name: lambda: hessian(f)(theta)}
    for impl in impls:
        if "hessian_matrix" in impl.functions:
            g = impl.functions["hessian_matrix"]
            methods[method_name(impl, "hessian_matrix")] = lambda g=g: g(func, params)
    times, last = measure(methods, repeats, warmup=False)  # seconds per call: no warm-up
    t = {name: median(ts_) for name, ts_ in times.items()}
    report(Row("d", w.name, func_name, t[func_name], spread(times[func_name])))
    for name in list(methods)[1:]:
        target = " (target <= 1)" if name.startswith("torch_secorder") else ""
        report(
            Row(
                "d",
                w.name,
                name,
                t[name],
                spread(times[name]),
                t[name] / t[func_name],
                "torch.func" + target,
                rel_diff(last[name], last[func_name]),
            )
        )


# ----------------------------------------------------------------------------- (o) output Hessians
OUTPUT_METHODS = [
    # (torch.func method, as hesse computes it; torch_secorder method; result compared)
    ("torch.func.hessian, flat (b, out, P, P)", "torch_secorder.output_hessian_matrix"),
    ("torch.func.hessian, dict (hesse)", "torch_secorder.output_hessian_dict"),
    (
        "torch.func.hessian per parameter (hesse diagonal_only)",
        "torch_secorder.output_hessian_dict, diagonal_only",
    ),
    ("eigvalsh of torch.func.hessian", "torch_secorder.output_sharpness"),
]


OUTPUT_VMAP = "torch_secorder.output_hessian_matrix, is_grads_batched batching"
"""For comparison: the engine batching products with is_grads_batched (its former CPU choice)."""


@contextlib.contextmanager
def is_grads_batched_engine() -> Iterator[None]:
    """Let the engine batch products with ``is_grads_batched`` for the block."""
    saved = autograd_engine.ENGINES
    autograd_engine.ENGINES = ("is_grads_batched",)
    try:
        yield
    finally:
        autograd_engine.ENGINES = saved


def output_model(
    kind: str, width: int, batch: int, size: int, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, Tensor]:
    """A small model with 3 outputs per sample and its batch, built from seed 0."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "mlp":
            model = nn.Sequential(
                nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                nn.Linear(width, 3),
            )  # fmt: skip
            inputs = torch.randn(batch, 8, generator=gen)
        else:
            model = nn.Sequential(
                nn.Conv2d(1, width, 3, padding=1), nn.Tanh(),
                nn.Conv2d(width, width, 3, padding=1), nn.Tanh(),
                nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 3),
            )  # fmt: skip
            inputs = torch.randn(batch, 1, size, size, generator=gen)
    return model.to(device, dtype), inputs.to(device, dtype)


def output_methods(model: nn.Module, inputs: Tensor) -> dict[str, Callable[[], object]]:
    """Every method of (o) by name; each returns what its counterpart's result is checked with."""
    named = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in named.values()]
    theta = torch.cat([p.reshape(-1) for p in named.values()])
    count = sum(sizes)

    def flat_output(t: Tensor) -> Tensor:
        pieces = {n: x.view(p.shape) for (n, p), x in zip(named.items(), t.split(sizes))}
        return functional_call(model, pieces, (inputs,))

    def func_flat() -> Tensor:
        return hessian(flat_output)(theta)

    def func_dict() -> list[Tensor]:
        H = hessian(lambda p: functional_call(model, p, (inputs,)))(named)
        return [H[a][b] for a in named for b in named]

    def func_diagonal() -> list[Tensor]:
        blocks = []
        for n in named:  # hesse: one torch.func.hessian per parameter
            H = hessian(lambda p: functional_call(model, p, (inputs,)))({n: named[n]})
            blocks.append(H[n][n])
        return blocks

    def func_sharpness() -> Tensor:
        H = func_flat()
        return torch.linalg.eigvalsh(H.reshape(-1, count, count)).abs().amax(-1)

    def ours_dict(diagonal_only: bool) -> list[Tensor]:
        H = ts.output_hessian_dict(model, inputs, diagonal_only=diagonal_only)
        return [block for row in H.values() for block in row.values()]

    def ours_sharpness() -> Tensor:
        return ts.output_sharpness(model, inputs).sharpness.reshape(-1)

    def ours_vmapped() -> Tensor:
        with is_grads_batched_engine():
            return ts.output_hessian_matrix(model, inputs)

    return {
        OUTPUT_METHODS[0][0]: func_flat,
        OUTPUT_METHODS[0][1]: lambda: ts.output_hessian_matrix(model, inputs),
        OUTPUT_VMAP: ours_vmapped,
        OUTPUT_METHODS[1][0]: func_dict,
        OUTPUT_METHODS[1][1]: lambda: ours_dict(False),
        OUTPUT_METHODS[2][0]: func_diagonal,
        OUTPUT_METHODS[2][1]: lambda: ours_dict(True),
        OUTPUT_METHODS[3][0]: func_sharpness,
        OUTPUT_METHODS[3][1]: ours_sharpness,
    }


def output_peak_memory(spec: tuple, method: str, threads: int) -> float | None:
    """Peak memory of one call of ``method`` (after a warm-up call), in bytes.

    CUDA: the allocator's peak above what was allocated before the call. CPU (Linux only): the
    peak resident size (VmHWM) above the resident size before the call, in a fresh process
    whose allocator returns every block of 64 KiB or more to the system when it is freed
    (``mallopt(M_MMAP_THRESHOLD)``), so memory freed by an earlier call cannot hide a peak.
    """
    device = spec[-1]
    if device.type == "cuda":
        fn = output_methods(*output_model(*spec))[method]
        fn()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated(device) - base)
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_output_peak_in_child, (spec, method, threads))


def _output_peak_in_child(spec: tuple, method: str, threads: int) -> float:
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD, fixed
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    fn = output_methods(*output_model(*spec))[method]
    fn()
    gc.collect()
    base = _proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return float(_proc_status("VmHWM") - base)


def bench_output(spec: tuple, repeats: int, threads: int) -> None:
    """Output Hessians of a small model: time, peak memory and results against torch.func."""
    model, inputs = output_model(*spec)
    name = spec[0]
    count = sum(p.numel() for p in model.parameters())
    print(
        f"{name} (o): {count} parameters, inputs {tuple(inputs.shape)}, "
        f"{inputs.shape[0] * 3} output elements",
        flush=True,
    )
    methods = output_methods(model, inputs)
    times, last = measure(methods, repeats)
    t = {method: median(values) for method, values in times.items()}
    peak = {method: output_peak_memory(spec, method, threads) for method in methods}

    def memory(method: str, baseline: str | None) -> str:
        if peak[method] is None:
            return ""
        size = peak[method] / 2**20
        text = f"peak {size:.1f} MiB" if size >= 0.1 else f"peak {peak[method] / 1024:.0f} KiB"
        if baseline is not None and peak[baseline]:
            text += f" ({peak[method] / peak[baseline]:.2f}x torch.func)"
        return text

    def against(method: str, func_name: str) -> Row:
        return Row(
            "o",
            name,
            method,
            t[method],
            spread(times[method]),
            t[method] / t[func_name],
            "torch.func",
            rel_diff(last[method], last[func_name]),
            memory(method, func_name),
        )

    for func_name, ours_name in OUTPUT_METHODS:
        note = memory(func_name, None)
        report(Row("o", name, func_name, t[func_name], spread(times[func_name]), note=note))
        report(against(ours_name, func_name))
        if func_name == OUTPUT_METHODS[0][0]:
            report(against(OUTPUT_VMAP, func_name))


# ----------------------------------------------------------------------------- (m) memory
def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def bench_memory(dtype: torch.dtype, chunk: int) -> None:
    """Peak memory of one batched chunk vs the estimate behind the default chunk's memory cap.

    Linux only: the peak resident size (VmHWM) is reset through /proc/self/clear_refs. Run
    before anything large, or memory freed earlier but still resident hides the peak.
    """
    deep = nn.Sequential(
        *[nn.Sequential(nn.Linear(128, 128), nn.Tanh()) for _ in range(20)], nn.Linear(128, 10)
    ).to(dtype)
    cases = [
        mlp(256, 1024, dtype, torch.device("cpu")),
        cnn(16, 64, 16, dtype, torch.device("cpu")),
        Workload("deep", deep, torch.randn(512, 128, dtype=dtype), torch.randint(0, 10, (512,))),
    ]
    for w in cases:
        params = w.params
        graph = GradientGraph(w.loss, params, fname="bench")
        vector_bytes = 2 * sum(p.numel() * p.element_size() for p in params)
        estimate = graph.saved_bytes + vector_bytes
        cotangents = [torch.randn(chunk, *p.shape, dtype=dtype) for p in params]
        graph.products(cotangents, params, chunk_size=chunk)  # allocator warm-up
        gc.collect()
        base = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        graph.products(cotangents, params, chunk_size=chunk)
        peak = (_proc_status("VmHWM") - base) / chunk
        graph.release()
        report(
            Row(
                "m",
                f"{w.name}",
                f"chunk of {chunk}: peak bytes per product",
                None,
                None,
                peak / estimate,
                "estimate",
                note=f"{w.num_params} parameters; peak {peak / 2**20:.2f} MiB, "
                f"estimate {estimate / 2**20:.2f} MiB per product",
            )
        )


# ----------------------------------------------------------------------------- main
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} ({len(names)} logical CPUs)"
    return cpu


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one repeat: smoke")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="wall: perf_counter; cpu: process CPU time, steadier on a loaded machine; "
        "auto (default): cpu with one thread, else wall",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (timed by synchronized wall clock)"
    )
    parser.add_argument("--repeats", type=int, default=21, help="repeats of (a) and (b)")
    parser.add_argument("--heavy-repeats", type=int, default=3, help="repeats of (c), (d)")
    parser.add_argument("--k", type=int, nargs="+", default=[32, 128], help="(b) products")
    parser.add_argument("--mlp-width", type=int, default=64)
    parser.add_argument("--mlp-batch", type=int, default=256)
    parser.add_argument("--cnn-channels", type=int, default=8)
    parser.add_argument("--cnn-batch", type=int, default=32)
    parser.add_argument("--cnn-size", type=int, default=12, help="image side")
    parser.add_argument("--diag-subset", type=int, default=512, help="(c) baseline elements")
    parser.add_argument("--func-chunk", type=int, default=64, help="(c) vmap chunk_size")
    parser.add_argument(
        "--sections",
        default="abcd",
        help="which measurements to run (default abcd; m: memory of a chunk vs its estimate; "
        "g: what each guarantee of a gradient graph costs one product; o: output Hessians)",
    )
    parser.add_argument(
        "--diag-detail",
        action="store_true",
        help="(c) per parameter: per-element loop vs library chunk sizes",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["mlp", "cnn"],
        choices=["mlp", "cnn", "bn-cnn", "resnet", "transformer"],
        help="workloads; resnet and transformer serve (c), the diagonal",
    )
    parser.add_argument("--resnet-width", type=int, default=8, help="channels of the first stage")
    parser.add_argument("--resnet-batch", type=int, default=8)
    parser.add_argument("--resnet-size", type=int, default=16, help="image side")
    parser.add_argument("--tf-width", type=int, default=64)
    parser.add_argument("--tf-tokens", type=int, default=8)
    parser.add_argument("--tf-batch", type=int, default=8)
    parser.add_argument(
        "--no-func", action="store_true", help="(c) leave out torch.func (slow on large models)"
    )
    parser.add_argument(
        "--out-width", type=int, default=16, help="(o) MLP width; the CNN has a quarter as channels"
    )
    parser.add_argument("--out-batch", type=int, default=8, help="(o) samples")
    parser.add_argument("--out-size", type=int, default=8, help="(o) CNN image side")
    parser.add_argument("--peer-0.0.1", dest="peer", help="unpacked torch-secorder 0.0.1 wheel")
    parser.add_argument(
        "--baseline", help="a directory holding another torch_secorder source tree to compare"
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.heavy_repeats, args.k = 3, 1, [8]
        args.mlp_width, args.mlp_batch = 12, 32
        args.cnn_channels, args.cnn_batch, args.cnn_size = 2, 4, 6
        args.diag_subset = 32
        args.resnet_width, args.resnet_batch, args.resnet_size = 2, 2, 8
        args.tf_width, args.tf_tokens, args.tf_batch = 8, 4, 2

    global clock
    device = torch.device(args.device)
    if device.type == "cuda":
        args.clock = "cuda"
        if "m" in args.sections:
            parser.error("the memory section (m) measures the process's CPU memory only")
    elif args.clock == "auto":
        args.clock = "cpu" if args.threads == 1 else "wall"
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dtype = getattr(torch, args.dtype)
    impls = [current_impl()]
    if args.baseline:
        impls.append(baseline_impl(args.baseline))
    if args.peer:
        impls.append(peer_impl(args.peer))

    torch.manual_seed(0)
    workloads = {
        "mlp": mlp(args.mlp_width, args.mlp_batch, dtype, device),
        "cnn": cnn(args.cnn_channels, args.cnn_batch, args.cnn_size, dtype, device),
        "resnet": resnet(args.resnet_width, args.resnet_batch, args.resnet_size, dtype, device),
        "transformer": transformer(args.tf_width, args.tf_tokens, args.tf_batch, dtype, device),
        "bn-cnn": bn_cnn(dtype, device),  # last: the others' initial weights stay as they were
    }
    gpu = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    header = (
        f"torch_secorder {ts.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {machine()}, {gpu}{torch.get_num_threads()} torch "
        f"thread(s), {args.dtype}, flush_denormal on, {args.clock} clock"
    )
    print(header)
    for name in args.models:
        w = workloads[name]
        print(f"{name}: {w.num_params} parameters, inputs {tuple(w.inputs.shape)}")
    print(f"command: {' '.join(sys.argv)}", flush=True)

    if "m" in args.sections:  # first: later sections leave freed memory resident
        bench_memory(dtype, 8 if args.quick else 32)
    for name in args.models:
        w = workloads[name]
        if "a" in args.sections:
            bench_hvp(w, args.repeats, impls)
        if "g" in args.sections:
            bench_guarantees(w, args.repeats)
        if "b" in args.sections:
            for k in args.k:
                bench_batched(w, k, args.repeats if k <= 32 else max(3, args.repeats // 3), impls)
        if "c" in args.sections:
            bench_diagonal(
                w, args.heavy_repeats, args.diag_subset, args.func_chunk, impls, not args.no_func
            )
            if args.diag_detail:
                bench_diagonal_detail(w, args.heavy_repeats, args.diag_subset)
        if "d" in args.sections:
            bench_matrix(w, args.heavy_repeats, impls)
        if "o" in args.sections and name in ("mlp", "cnn"):
            width = args.out_width if name == "mlp" else max(1, args.out_width // 4)
            spec = (name, width, args.out_batch, args.out_size, dtype, device)
            bench_output(spec, args.heavy_repeats, args.threads)

    print()
    print(header)
    print(markdown_table(ROWS))
    for table in DETAIL:
        print()
        print(table)
    if args.json:
        with open(args.json, "w") as f:
            rows = [vars(r) for r in ROWS]
            json.dump({"header": header, "rows": rows, "detail": DETAIL}, f, indent=1)


if __name__ == "__main__":
    main()
