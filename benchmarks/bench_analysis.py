"""Benchmark the analyses (top eigenvalues, trace, spectral density) against peer libraries.

Workloads: tanh MLPs trained on the package's three-spirals data (cross-entropy, the mean
loss over a data set of a few batches), a small one in float64 (ground truth from the dense
Hessian and ``torch.linalg.eigvalsh``) and a larger one in float32 (ground truth from a
float64 copy: our Lanczos with ``tol=1e-10``, cross-checked by SciPy's ``eigsh``, and the
exact trace from the exact diagonal). Every library gets its own Hessian operator over the
same batches, wrapped so that every Hessian-vector product it asks for is counted.

Sections (``--sections``, default ``oetd``):

o. the cost of one product with each library's operator, and its ratio to one gradient;
e. top-1 and top-5 eigenvalues to ``--target`` relative error (default 1e-3): each method's
   tolerance or iteration knob is swept from loose to tight, every setting run over
   ``--seeds`` seeds, and the cheapest setting whose worst seed reaches the target is
   reported (products and CPU time, medians over the seeds); the methods' defaults too;
t. trace error against products at equal budgets (relative RMS error over the seeds);
d. spectral density at equal probes and Lanczos steps (CPU time, and on the small
   workload the Wasserstein-1 distance of the quadrature nodes and weights to the
   true spectrum).

Peers (optional; a missing one is skipped): curvlinops-for-pytorch (``HessianLinearOperator``
with ``scipy.sparse.linalg.eigsh``, its Hutchinson, Hutch++ and XTrace, its Lanczos
spectrum), hessian-eigenthings (its Lanczos, deflated power iteration, Hutchinson, Hutch++,
spectral density) and PyHessian 0.1 (power iteration, Hutchinson, density). See
benchmarks/README.md for how to install them next to torch without replacing it.

Usage::

    python benchmarks/bench_analysis.py --quick      # a smoke run on tiny models (a minute)
    python benchmarks/bench_analysis.py              # the full run (an hour on one core)
"""

from __future__ import annotations

import os
import sys


def _threads_from_argv(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "1"


# BLAS pools (NumPy/SciPy, torch's OpenMP) must be sized before they start.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, _threads_from_argv(sys.argv))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pyhessian_compat import eig_shim  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import torch_secorder as ts  # noqa: E402
from torch_secorder._demo import spirals  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["cpu"]


# ----------------------------------------------------------------------------- peers
def optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as error:  # a peer that fails to import is skipped, with the reason
        print(f"peer {module} unavailable: {type(error).__name__}: {error}")
        return None


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


curvlinops = optional("curvlinops")
he = optional("hessian_eigenthings")
pyhessian = optional("pyhessian")
from scipy.sparse.linalg import eigsh  # noqa: E402


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """PyHessian creates its vectors in the default dtype: make it the model's."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# ----------------------------------------------------------------------------- counting
class Counter:
    """Hessian-vector products asked of one library's operator."""

    def __init__(self) -> None:
        self.count = 0


class CountingOperator:
    """Our operator protocol (``matmat``, ``shape``, ``dtype``, ``device``), counted."""

    def __init__(self, operator: Any, counter: Counter) -> None:
        self.operator, self.counter = operator, counter
        self.shape, self.dtype, self.device = operator.shape, operator.dtype, operator.device

    def matmat(self, V: Tensor) -> Tensor:
        self.counter.count += V.shape[1]
        return self.operator.matmat(V)


def count_curvlinops(operator: Any, counter: Counter) -> Any:
    """Count the columns reaching ``_matmat`` (every ``@``, also through ``to_scipy``)."""
    inner = operator._matmat

    def matmat(X: list[Tensor]) -> list[Tensor]:
        counter.count += X[0].shape[-1]
        return inner(X)

    operator._matmat = matmat
    return operator


def count_matvec(operator: Any, counter: Counter) -> Any:
    """Count ``matvec`` calls (hessian-eigenthings' operators take one vector at a time)."""
    inner = operator.matvec

    def matvec(v: Tensor) -> Tensor:
        counter.count += 1
        return inner(v)

    operator.matvec = matvec
    return operator


def count_pyhessian(hessian: Any, counter: Counter) -> Any:
    """Count PyHessian's products over the data (one per ``dataloader_hv_product``)."""
    inner = hessian.dataloader_hv_product

    def product(v: list[Tensor]) -> Any:
        counter.count += 1
        return inner(v)

    hessian.dataloader_hv_product = product
    return hessian


# ----------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    model: nn.Module
    data: list[tuple[Tensor, Tensor]]
    dtype: torch.dtype
    truth: dict[str, Any]
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    operators: dict[str, tuple[Any, Counter]] = field(default_factory=dict)

    note: str = ""

    @property
    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def describe(self) -> str:
        batches = f"{len(self.data)} batches of {self.data[0][0].shape[0]}"
        return f"{self.name}: {self.note}, {self.num_params} params, {self.dtype}, {batches}"

    def build_operators(self) -> None:
        ops: dict[str, tuple[Any, Counter]] = {}
        c = Counter()
        ours = ts.HessianOperator.from_model(self.model, self.loss_fn, self.data)
        ops["torch_secorder"] = (CountingOperator(ours, c), c)
        if curvlinops is not None:
            c = Counter()
            op = curvlinops.HessianLinearOperator(
                self.model, self.loss_fn, self.params, self.data, check_deterministic=False
            )
            ops["curvlinops"] = (count_curvlinops(op, c), c)
        if he is not None:
            c = Counter()

            def batch_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
                return self.loss_fn(model(batch[0]), batch[1])

            op = he.HessianOperator(self.model, self.data, batch_loss)
            ops["hessian-eigenthings"] = (count_matvec(op, c), c)
        if pyhessian is not None:
            c = Counter()
            mode = self.model.training
            with default_dtype(self.dtype):
                op = pyhessian.hessian(self.model, self.loss_fn, dataloader=self.data, cuda=False)
            self.model.train(mode)  # PyHessian switches the model to eval mode
            ops["PyHessian"] = (count_pyhessian(op, c), c)
        self.operators = ops

    def op(self, library: str) -> Any:
        return self.operators[library][0]

    def clean(self) -> None:
        """PyHessian leaves differentiable ``.grad`` fields behind: drop them."""
        for p in self.params:
            p.grad = None


def mlp(width: int, depth: int, dtype: torch.dtype, inputs: int = 2) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    size = inputs
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.Tanh()]
        size = width
    return nn.Sequential(*layers, nn.Linear(size, 3)).to(dtype)


def train(model: nn.Module, x: Tensor, y: Tensor, loss_fn: nn.Module, epochs: int) -> float:
    """Full-batch Adam; returns the training accuracy (argmax against labels or one-hots)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    for p in model.parameters():
        p.grad = None
    labels = y if y.ndim == 1 else y.argmax(dim=1)
    with torch.no_grad():
        return (model(x).argmax(dim=1) == labels).double().mean().item()


def checksum(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().double().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Spec:
    """A workload: a tanh MLP trained on three spirals, the Hessian of its mean loss."""

    width: int
    depth: int
    dtype: torch.dtype
    samples: int
    batches: int
    epochs: int
    mse: bool = False  # mean squared error on one-hot targets instead of cross-entropy
    last_weight_only: bool = False  # the Hessian of the last layer's weight only
    inputs: int = 2  # 2: the spirals; more: Gaussian inputs with random labels

    def note(self) -> str:
        layers = "-".join([str(self.inputs), *[str(self.width)] * self.depth, "3"])
        data = "spirals" if self.inputs == 2 else "Gaussian inputs, random labels"
        trained = f"trained {self.epochs} epochs" if self.epochs else "untrained"
        if not self.mse:
            return f"tanh MLP {layers}, {data}, cross-entropy, {trained}"
        note = f"tanh MLP {layers}, {data}, MSE on one-hot targets, {trained}"
        if self.last_weight_only:
            note += "; Hessian of the last weight only, I_3 (x) B: every eigenvalue 3 times"
        return note


def make_workload(name: str, spec: Spec, cache: Path | None) -> Workload:
    if spec.inputs == 2:
        x, labels = spirals(spec.samples, seed=0, dtype=spec.dtype)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(spec.samples, spec.inputs, generator=g, dtype=spec.dtype)
        labels = torch.randint(0, 3, (spec.samples,), generator=g)
    y = nn.functional.one_hot(labels, 3).to(spec.dtype) if spec.mse else labels
    loss_fn = nn.MSELoss() if spec.mse else nn.CrossEntropyLoss()
    model = mlp(spec.width, spec.depth, spec.dtype, spec.inputs)
    accuracy = train(model, x, y, loss_fn, spec.epochs)
    if spec.last_weight_only:
        last = [name for name, _ in model.named_parameters()][-2]
        for param_name, p in model.named_parameters():
            p.requires_grad_(param_name == last)
    size = spec.samples // spec.batches
    data = list(zip(x.split(size), y.split(size)))
    key = f"{name}-{spec}-{checksum(model)}"
    key = f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    truth = load_truth(cache, key)
    if truth is None:
        tic = time.perf_counter()
        truth = compute_truth(model, data, spec.dtype, loss_fn)
        truth["seconds"] = time.perf_counter() - tic
        save_truth(cache, key, truth)
    truth["accuracy"] = accuracy if spec.epochs else math.nan
    return Workload(name, model, data, spec.dtype, truth, loss_fn, note=spec.note())


def load_truth(cache: Path | None, key: str) -> dict[str, Any] | None:
    if cache is None or not (cache / f"{key}.json").exists():
        return None
    return json.loads((cache / f"{key}.json").read_text())


def save_truth(cache: Path | None, key: str, truth: dict[str, Any]) -> None:
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{key}.json").write_text(json.dumps(truth))


def compute_truth(
    model: nn.Module, data: list, dtype: torch.dtype, loss_fn: nn.Module
) -> dict[str, Any]:
    """Top eigenvalues, trace (and the whole spectrum in float64) of the data-set Hessian.

    The batches have equal sizes, so the data-set Hessian is that of the mean loss over the
    concatenated data. float64 models: the dense Hessian and ``eigvalsh``. float32 models: a
    float64 copy, Lanczos with ``tol=1e-10`` cross-checked by ``eigsh``, the exact diagonal.
    """
    exact = model if dtype == torch.float64 else _float64_copy(model)
    x = torch.cat([b[0] for b in data]).double()
    y = torch.cat([b[1] for b in data])
    y = y.double() if y.is_floating_point() else y
    params = [p for p in exact.parameters() if p.requires_grad]

    def loss() -> Tensor:
        return loss_fn(exact(x), y)

    if dtype == torch.float64:
        H = ts.hessian_matrix(loss, params)
        spectrum = torch.linalg.eigvalsh((H + H.T) / 2)
        return {
            "top": spectrum.flip(0)[:8].tolist(),
            "trace": float(H.trace()),
            "spectrum": spectrum.tolist(),
            "method": "dense Hessian, eigvalsh",
        }
    with ts.HessianOperator(loss, params) as H:
        result = ts.top_eigenvalues(H, k=8, tol=1e-10, max_matvecs=3000)
        check = eigsh(H.to_scipy(), k=8, which="LA", tol=1e-10, return_eigenvectors=False)
    top = result.eigenvalues
    check = torch.from_numpy(np.sort(check)[::-1].copy())
    agreement = float(((top - check).abs() / top.abs()).max())
    diagonal = ts.hessian_diagonal(loss, params)
    return {
        "top": top.tolist(),
        "trace": float(sum(d.sum() for d in diagonal)),
        "spectrum": None,
        "method": (
            "float64 copy: Lanczos tol=1e-10 (eigsh tol=1e-10 agrees to "
            f"{agreement:.0e} relative), exact diagonal"
        ),
    }


def _float64_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


# ----------------------------------------------------------------------------- timing
def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed(w: Workload, library: str, fn: Callable[[], Any]) -> tuple[Any, int, float]:
    """Run ``fn`` once: its result, the products it asked of ``library``'s operator, CPU s."""
    counter = w.operators[library][1]
    counter.count = 0
    tic = clock()
    try:
        out = fn()
    finally:
        seconds = clock() - tic
        w.clean()
    return out, counter.count, seconds


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


OUTPUT: list[str] = []
RECORDS: list[dict[str, Any]] = []


def emit(text: str = "") -> None:
    print(text, flush=True)
    OUTPUT.append(text)


# ----------------------------------------------------------------------------- (o) products
def bench_products(w: Workload, repeats: int, columns: int) -> None:
    """Seconds per product of each library's operator, single and ``columns`` at once."""
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(w.num_params, columns, generator=gen, dtype=w.dtype)
    params = w.params

    def gradient() -> None:
        for x, y in w.data:
            torch.autograd.grad(w.loss_fn(w.model(x), y), params)

    def pyhessian_product() -> None:
        v = ts.unflatten(V[:, 0], params)
        with default_dtype(w.dtype):
            w.op("PyHessian").dataloader_hv_product(v)
        w.clean()

    single: dict[str, Callable[[], Any]] = {"gradient over the data": gradient}
    batched: dict[str, Callable[[], Any]] = {}
    single["torch_secorder matvec"] = lambda: w.op("torch_secorder").operator.matvec(V[:, 0])
    batched["torch_secorder matmat"] = lambda: w.op("torch_secorder").operator.matmat(V)
    if "curvlinops" in w.operators:
        single["curvlinops @ vector"] = lambda: w.op("curvlinops") @ V[:, 0]
        batched["curvlinops @ matrix"] = lambda: w.op("curvlinops") @ V
    if "hessian-eigenthings" in w.operators:
        single["hessian-eigenthings matvec"] = lambda: w.op("hessian-eigenthings").matvec(V[:, 0])
    if "PyHessian" in w.operators:
        single["PyHessian dataloader_hv_product"] = pyhessian_product
    methods = {**single, **batched}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()  # warm-up (and the chunk planner's trials)
    names = list(methods)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            tic = clock()
            methods[name]()
            times[name].append(clock() - tic)
    t = {name: median(v) for name, v in times.items()}
    rows = []
    for name in names:
        per = t[name] / (columns if name in batched else 1)
        ratio = per / t["gradient over the data"]
        what = f"{columns} columns" if name in batched else "1 vector"
        rows.append([w.name, name, what, fmt_time(per), f"{ratio:.2f}x"])
        RECORDS.append({"section": "o", "workload": w.name, "method": name, "seconds": per})
    emit(table(["workload", "operation", "input", "CPU time per product", "/ gradient"], rows))


# ----------------------------------------------------------------------------- (e) eigen
@dataclass
class EigenMethod:
    name: str
    library: str
    knob: str
    settings: Sequence[float]
    run: Callable[[Workload, int, float, int], Sequence[float]]
    defaults: tuple[str, Callable[[Workload, int, int], Sequence[float]]] | None = None


def quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


SEARCH = Counter()
"""Products our Lanczos spends searching for further copies of converged eigenvalues."""


@contextlib.contextmanager
def count_search():
    """Attribute our Lanczos' products to the multiplicity search (a private generator).

    ``thick_restart_lanczos`` runs ``_restarted_lanczos`` once for the wanted pairs, then in
    their orthogonal complement (``locked`` given) until no more wanted pair turns up.
    """
    module = importlib.import_module("torch_secorder.analysis._lanczos")
    inner = getattr(module, "_restarted_lanczos", None)
    if inner is None:  # another version of the library: no split
        yield
        return

    def restarted(n, k, max_matvecs, locked, *rest):  # noqa: ANN001, ANN202
        result = yield from inner(n, k, max_matvecs, locked, *rest)
        if locked is not None:
            SEARCH.count += result[1]
        return result

    module._restarted_lanczos = restarted
    try:
        yield
    finally:
        module._restarted_lanczos = inner


def ours_lanczos(w: Workload, k: int, tol: float, seed: int) -> Sequence[float]:
    gen = torch.Generator().manual_seed(seed)
    op = w.op("torch_secorder")
    with count_search():
        r = quiet(
            lambda: ts.top_eigenvalues(op, k=k, tol=tol, max_matvecs=100 * k + 2000, generator=gen)
        )
    return r.eigenvalues.tolist()


def ours_power(w: Workload, k: int, tol: float, seed: int, cap: int | None) -> Sequence[float]:
    gen = torch.Generator().manual_seed(seed)
    op = w.op("torch_secorder")
    budget = None if cap is None else cap * (k + 1)
    r = quiet(
        lambda: ts.top_eigenvalues(
            op, k=k, method="power", tol=tol, max_matvecs=budget, generator=gen
        )
    )
    return r.eigenvalues.tolist()


def curvlinops_eigsh(w: Workload, k: int, tol: float, seed: int) -> Sequence[float]:
    A = w.op("curvlinops").to_scipy()
    v0 = np.random.default_rng(seed).standard_normal(w.num_params)
    values = eigsh(A, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return sorted(values.tolist(), reverse=True)


def he_lanczos(w: Workload, k: int, max_iter: float, seed: int) -> Sequence[float]:
    r = he.lanczos(w.op("hessian-eigenthings"), k=k, max_iter=int(max_iter), which="LA", seed=seed)
    return sorted(r.eigenvalues.tolist(), reverse=True)


def he_power(w: Workload, k: int, tol: float, seed: int, cap: int) -> Sequence[float]:
    op = w.op("hessian-eigenthings")
    r = he.deflated_power_iteration(op, k=k, max_iter=cap, tol=tol, seed=seed)
    return sorted(r.eigenvalues.tolist(), reverse=True)


def pyhessian_power(w: Workload, k: int, tol: float, seed: int, cap: int) -> Sequence[float]:
    torch.manual_seed(seed)  # PyHessian draws from the global RNG
    with default_dtype(w.dtype):
        values, _ = w.op("PyHessian").eigenvalues(maxIter=cap, tol=tol, top_n=k)
    return sorted(values, reverse=True)


def eigen_methods(cap: int) -> list[EigenMethod]:
    tight = [0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 5e-3, 3e-3, 2e-3, 1e-3, 5e-4, 3e-4, 1e-4]
    tight += [3e-5, 1e-5, 1e-6, 1e-8]
    power = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 1e-8, 1e-9]
    steps = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 18, 20, 22, 24, 26, 28, 30, 33, 36]
    steps += [40, 44, 48, 52, 58, 64, 72, 80, 90, 100, 120, 150, 200]
    methods = [
        EigenMethod(
            "torch_secorder lanczos",
            "torch_secorder",
            "tol",
            tight,
            ours_lanczos,
            ("tol=1e-4 (default)", lambda w, k, s: ours_lanczos(w, k, 1e-4, s)),
        ),
        EigenMethod(
            "torch_secorder power",
            "torch_secorder",
            "tol",
            power,
            lambda w, k, tol, s: ours_power(w, k, tol, s, cap),
            (
                "tol=1e-3, 100 per pair (PyHessian's defaults)",
                lambda w, k, s: ours_power(w, k, 1e-3, s, None),
            ),
        ),
    ]
    if curvlinops is not None:
        methods.append(
            EigenMethod(
                "curvlinops + scipy eigsh",
                "curvlinops",
                "tol",
                [*tight, 0.0],
                curvlinops_eigsh,
                ("tol=0 (machine precision)", lambda w, k, s: curvlinops_eigsh(w, k, 0.0, s)),
            )
        )
    if he is not None:
        methods.append(
            EigenMethod(
                "hessian-eigenthings lanczos",
                "hessian-eigenthings",
                "max_iter",
                steps,
                he_lanczos,
                ("max_iter=2k", lambda w, k, s: he_lanczos(w, k, max(2 * k, 2), s)),
            )
        )
        methods.append(
            EigenMethod(
                "hessian-eigenthings power",
                "hessian-eigenthings",
                "tol",
                power,
                lambda w, k, tol, s: he_power(w, k, tol, s, cap),
                (
                    "tol=1e-4, max_iter=100",
                    lambda w, k, s: he_power(w, k, 1e-4, s, 100),
                ),
            )
        )
    if pyhessian is not None:
        methods.append(
            EigenMethod(
                "PyHessian power",
                "PyHessian",
                "tol",
                power,
                lambda w, k, tol, s: pyhessian_power(w, k, tol, s, cap),
                ("tol=1e-3, maxIter=100", lambda w, k, s: pyhessian_power(w, k, 1e-3, s, 100)),
            )
        )
    return methods


def eigen_error(values: Sequence[float], truth: Sequence[float], k: int) -> float:
    if len(values) < k:
        return math.inf
    return max(abs(values[i] - truth[i]) / abs(truth[i]) for i in range(k))


@dataclass
class Trial:
    products: list[int]
    seconds: list[float]
    errors: list[float]
    search: list[int] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return max(self.errors)


def trial(
    w: Workload, library: str, k: int, seeds: int, fn: Callable[[int], Sequence[float]]
) -> Trial:
    result = Trial([], [], [])
    for seed in range(seeds):
        SEARCH.count = 0
        values, products, seconds = timed(w, library, lambda seed=seed: fn(seed))
        result.search.append(SEARCH.count)
        result.products.append(products)
        result.seconds.append(seconds)
        result.errors.append(eigen_error(values, w.truth["top"], k))
    return result


def products_cell(t: Trial) -> str:
    low, high = min(t.products), max(t.products)
    spread = f" ({low}-{high})" if low != high else ""
    search = f", search {median(t.search):g}" if any(t.search) else ""
    return f"{median(t.products):g}{spread}{search}"


def interleaved(
    w: Workload,
    jobs: dict[str, tuple[str, Callable[[int], Sequence[float]]]],
    k: int,
    seeds: int,
) -> dict[str, Trial]:
    """Run every job once per seed, rotating their order from seed to seed (fair timing)."""
    names = list(jobs)
    trials = {name: Trial([], [], []) for name in names}
    for seed in range(seeds):
        for name in names[seed % len(names) :] + names[: seed % len(names)]:
            library, fn = jobs[name]
            SEARCH.count = 0
            values, products, seconds = timed(w, library, lambda fn=fn, seed=seed: fn(seed))
            trials[name].search.append(SEARCH.count)
            trials[name].products.append(products)
            trials[name].seconds.append(seconds)
            trials[name].errors.append(eigen_error(values, w.truth["top"], k))
    return trials


def sweep(w: Workload, m: EigenMethod, k: int, seeds: int, target: float) -> list[tuple]:
    """Settings from loose to tight until the worst seed reaches ``target``."""
    tried = []
    for setting in m.settings:
        if m.knob == "max_iter" and (setting < k or setting > w.num_params):
            continue
        t = trial(w, m.library, k, seeds, lambda s, v=setting: m.run(w, k, v, s))
        tried.append((setting, t))
        RECORDS.append(
            {
                "section": "e-sweep",
                "workload": w.name,
                "k": k,
                "method": m.name,
                m.knob: setting,
                "products": t.products,
                "seconds": t.seconds,
                "errors": t.errors,
                "search": t.search,
            }
        )
        print(
            f"    {m.name:30} {m.knob}={setting:<8g} products {products_cell(t):>14} "
            f"worst error {t.worst:.1e}",
            flush=True,
        )
        if t.worst <= target:
            break
    return tried


def bench_eigen(
    w: Workload, ks: Sequence[int], seeds: int, target: float, cap: int, only: Sequence[str]
) -> None:
    methods = eigen_methods(cap)
    methods = [methods[0]] + [m for m in methods[1:] if not only or any(o in m.name for o in only)]
    methods[0].run(w, 1, 1e-2, 0)  # warm-up: planner trials, allocator
    for k in ks:
        emit(f"\n{w.name}, top-{k} eigenvalues to {target:g} relative, {seeds} seeds")
        found: dict[str, float] = {}
        notes: dict[str, str] = {}
        for m in methods:
            tried = sweep(w, m, k, seeds, target)
            if tried and tried[-1][1].worst <= target:
                found[m.name] = tried[-1][0]
            elif tried:
                setting, t = min(tried, key=lambda st: st[1].worst)
                notes[m.name] = (
                    f"not reached; best {m.knob}={setting:g}: worst error {t.worst:.1e}, "
                    f"{products_cell(t)} products"
                )
        # Time the cheapest settings again, interleaved, so that load hits all alike.
        jobs = {}
        for m in methods:
            if m.name in found:
                setting = found[m.name]
                jobs[m.name] = (m.library, lambda s, m=m, k=k, v=setting: m.run(w, k, v, s))
        trials = interleaved(w, jobs, k, seeds)
        reference = trials.get(methods[0].name)
        rows = []
        for m in methods:
            if m.name not in trials:
                rows.append([w.name, k, m.name, notes.get(m.name, "skipped"), *[""] * 5])
                continue
            t = trials[m.name]
            RECORDS.append(
                {
                    "section": "e",
                    "workload": w.name,
                    "k": k,
                    "method": m.name,
                    m.knob: found[m.name],
                    "products": t.products,
                    "seconds": t.seconds,
                    "errors": t.errors,
                    "search": t.search,
                }
            )
            ratio_p = ratio_t = ""
            if reference is not None:
                ratio_p = f"{median(t.products) / median(reference.products):.2f}"
                ratio_t = f"{median(t.seconds) / median(reference.seconds):.2f}"
            rows.append(
                [
                    w.name,
                    k,
                    m.name,
                    f"{m.knob}={found[m.name]:g}",
                    products_cell(t),
                    fmt_time(median(t.seconds)),
                    f"{t.worst:.1e}",
                    ratio_p,
                    ratio_t,
                ]
            )
        emit(
            table(
                [
                    "workload",
                    "k",
                    "method",
                    "cheapest setting",
                    "products",
                    "CPU time",
                    "worst error",
                    "products / ours",
                    "time / ours",
                ],
                rows,
            )
        )
        defaults = {
            m.name: (m.library, lambda s, fn=m.defaults[1], k=k: fn(w, k, s))
            for m in methods
            if m.defaults is not None
        }
        trials = interleaved(w, defaults, k, seeds)
        rows = []
        for m in methods:
            if m.name not in trials:
                continue
            t = trials[m.name]
            RECORDS.append(
                {
                    "section": "e-defaults",
                    "workload": w.name,
                    "k": k,
                    "method": m.name,
                    "setting": m.defaults[0],
                    "products": t.products,
                    "seconds": t.seconds,
                    "errors": t.errors,
                    "search": t.search,
                }
            )
            rows.append(
                [
                    w.name,
                    k,
                    m.name,
                    m.defaults[0],
                    products_cell(t),
                    fmt_time(median(t.seconds)),
                    f"{t.worst:.1e}",
                    "yes" if t.worst <= target else "no",
                ]
            )
        emit(f"\n{w.name}, top-{k}: each method at its defaults")
        emit(
            table(
                [
                    "workload",
                    "k",
                    "method",
                    "defaults",
                    "products",
                    "CPU time",
                    "worst error",
                    f"<= {target:g}",
                ],
                rows,
            )
        )


# ----------------------------------------------------------------------------- (t) trace
def trace_methods(w: Workload) -> dict[str, tuple[str, Callable[[int, int], float]]]:
    def ours(method: str) -> Callable[[int, int], float]:
        def run(m: int, seed: int) -> float:
            gen = torch.Generator().manual_seed(seed)
            op = w.op("torch_secorder")
            est = ts.hessian_trace(op, method=method, num_matvecs=m, generator=gen)
            return float(est.value)

        return run

    methods: dict[str, tuple[str, Callable[[int, int], float]]] = {
        "torch_secorder hutchinson": ("torch_secorder", ours("hutchinson")),
        "torch_secorder hutch++": ("torch_secorder", ours("hutch++")),
        "torch_secorder xtrace": ("torch_secorder", ours("xtrace")),
    }
    if curvlinops is not None:

        def peer(fn: Callable[..., Tensor]) -> Callable[[int, int], float]:
            def run(m: int, seed: int) -> float:
                torch.manual_seed(seed)  # curvlinops draws from the global RNG
                return float(fn(w.op("curvlinops"), m))

            return run

        methods["curvlinops hutchinson_trace"] = ("curvlinops", peer(curvlinops.hutchinson_trace))
        methods["curvlinops hutchpp_trace"] = ("curvlinops", peer(curvlinops.hutchpp_trace))
        methods["curvlinops xtrace"] = ("curvlinops", peer(curvlinops.xtrace))
    if he is not None:

        def he_trace(method: str) -> Callable[[int, int], float]:
            def run(m: int, seed: int) -> float:
                op = w.op("hessian-eigenthings")
                return he.trace(op, num_matvecs=m, method=method, seed=seed).estimate

            return run

        methods["hessian-eigenthings hutchinson"] = ("hessian-eigenthings", he_trace("hutchinson"))
        methods["hessian-eigenthings hutch++"] = ("hessian-eigenthings", he_trace("hutch++"))
    if pyhessian is not None:

        def pyhessian_trace(m: int, seed: int) -> float:
            torch.manual_seed(seed)
            with default_dtype(w.dtype):
                samples = w.op("PyHessian").trace(maxIter=m, tol=0.0)  # tol=0: all m probes
            return float(np.mean(samples))

        methods["PyHessian trace (Hutchinson)"] = ("PyHessian", pyhessian_trace)
    return methods


def bench_trace(w: Workload, budgets: Sequence[int], seeds: int) -> None:
    truth = w.truth["trace"]
    methods = trace_methods(w)
    methods["torch_secorder hutch++"][1](budgets[0], 0)  # warm-up
    errors: dict[str, dict[int, float]] = {name: {} for name in methods}
    used: dict[str, dict[int, float]] = {name: {} for name in methods}
    seconds: dict[str, dict[int, float]] = {name: {} for name in methods}
    names = list(methods)
    for m in budgets:
        values: dict[str, list[float]] = {name: [] for name in names}
        products: dict[str, list[int]] = {name: [] for name in names}
        times: dict[str, list[float]] = {name: [] for name in names}
        for seed in range(seeds):  # methods interleaved, order rotating from seed to seed
            for name in names[seed % len(names) :] + names[: seed % len(names)]:
                library, fn = methods[name]
                value, count, t = timed(w, library, lambda fn=fn, seed=seed, m=m: fn(m, seed))
                values[name].append(value)
                products[name].append(count)
                times[name].append(t)
        for name in names:
            rms = math.sqrt(statistics.fmean((v - truth) ** 2 for v in values[name])) / abs(truth)
            errors[name][m], used[name][m] = rms, median(products[name])
            seconds[name][m] = median(times[name])
            RECORDS.append(
                {
                    "section": "t",
                    "workload": w.name,
                    "method": name,
                    "budget": m,
                    "values": values[name],
                    "products": products[name],
                    "seconds": times[name],
                    "truth": truth,
                }
            )
            print(f"    m={m:<4} {name:34} rel. RMS error {rms:.2e}", flush=True)
    emit(f"\n{w.name}: trace {truth:.6g}; relative RMS error over {seeds} seeds")
    header = ["workload", "method", *[f"m={m}" for m in budgets]]
    rows = []
    for name in methods:
        cells = []
        for m in budgets:
            cell = f"{errors[name][m]:.2e}"
            if used[name][m] != m:
                cell += f" ({used[name][m]:g} used)"
            cells.append(cell)
        rows.append([w.name, name, *cells])
    emit(table(header, rows))
    m = budgets[-1]
    emit(f"\n{w.name}: CPU time of one estimate with m={m} products (median over seeds)")
    base = seconds["torch_secorder hutch++"][m]
    rows = [
        [w.name, name, fmt_time(seconds[name][m]), f"{seconds[name][m] / base:.2f}x"]
        for name in methods
    ]
    emit(table(["workload", "method", "CPU time", "/ torch_secorder hutch++"], rows))


class DenseOperator:
    """A dense symmetric matrix behind our operator protocol (``matmat``, ...)."""

    def __init__(self, A: Tensor) -> None:
        self.A, self.shape, self.dtype, self.device = A, tuple(A.shape), A.dtype, A.device

    def matmat(self, V: Tensor) -> Tensor:
        return self.A @ V


def dense_hessian(w: Workload) -> Tensor:
    """The data-set Hessian as a dense matrix (equal batches: the mean over all samples)."""
    x = torch.cat([b[0] for b in w.data])
    y = torch.cat([b[1] for b in w.data])
    H = ts.hessian_matrix(lambda: w.loss_fn(w.model(x), y), w.params)
    return (H + H.T) / 2


def bench_trace_dense(w: Workload, budgets: Sequence[int], seeds: int) -> None:
    """Estimator accuracy and stderr calibration over many seeds, on the dense Hessian.

    The estimators only see products, so their errors are those on the model; the dense matrix
    makes many seeds cheap. ``stderr / error`` is the root mean square of the reported standard
    errors over the RMS error: about 1 when the standard errors are honest. hessian-eigenthings
    is left out: its Hutchinson and Hutch++ draw the same probes as ours (the same results in
    the tables over the real operators) and run one product at a time.
    """
    A = dense_hessian(w)
    truth = float(A.trace())
    op = DenseOperator(A)

    def ours(method: str) -> Callable[[int, int], tuple[float, float]]:
        def run(m: int, seed: int) -> tuple[float, float]:
            gen = torch.Generator().manual_seed(seed)
            est = ts.hessian_trace(op, method=method, num_matvecs=m, generator=gen)
            return float(est.value), float(est.stderr)

        return run

    methods: dict[str, Callable[[int, int], tuple[float, float]]] = {
        "torch_secorder hutchinson": ours("hutchinson"),
        "torch_secorder hutch++": ours("hutch++"),
        "torch_secorder xtrace": ours("xtrace"),
    }
    if curvlinops is not None:

        def peer(fn: Callable[..., Tensor]) -> Callable[[int, int], tuple[float, float]]:
            def run(m: int, seed: int) -> tuple[float, float]:
                torch.manual_seed(seed)
                return float(fn(A, m)), math.nan

            return run

        methods["curvlinops hutchinson_trace"] = peer(curvlinops.hutchinson_trace)
        methods["curvlinops hutchpp_trace"] = peer(curvlinops.hutchpp_trace)
        methods["curvlinops xtrace"] = peer(curvlinops.xtrace)
    header = ["workload", "method"]
    for m in budgets:
        header += [f"m={m} error", "stderr / error"]
    rows = []
    for name, fn in methods.items():
        cells = []
        for m in budgets:
            runs = [fn(m, seed) for seed in range(seeds)]
            rms = math.sqrt(statistics.fmean((v - truth) ** 2 for v, _ in runs))
            reported = math.sqrt(statistics.fmean(e**2 for _, e in runs))
            cells += [
                f"{rms / abs(truth):.2e}",
                f"{reported / rms:.2f}" if reported == reported else "",
            ]
            RECORDS.append(
                {
                    "section": "t-dense",
                    "workload": w.name,
                    "method": name,
                    "budget": m,
                    "values": [v for v, _ in runs],
                    "stderr": [e for _, e in runs],
                    "truth": truth,
                }
            )
        rows.append([w.name, name, *cells])
    emit(
        f"\n{w.name}: trace on the dense Hessian, relative RMS error over {seeds} seeds, and "
        "RMS reported stderr / RMS error"
    )
    emit(table(header, rows))


# ----------------------------------------------------------------------------- (d) density
def wasserstein(nodes: Tensor, weights: Tensor, spectrum: Sequence[float]) -> float:
    """W1 distance between the pooled quadrature measure and the true eigenvalue measure."""
    nodes = nodes.reshape(-1).double()
    weights = weights.reshape(-1).double()
    weights = weights / weights.sum()
    truth = torch.tensor(spectrum, dtype=torch.float64)
    points = torch.cat([nodes, truth])
    masses = torch.cat([weights, -torch.full_like(truth, 1 / truth.numel())])
    order = torch.argsort(points)
    points, cdf = points[order], torch.cumsum(masses[order], 0)
    return float((cdf[:-1].abs() * points.diff()).sum())


def bench_density(w: Workload, probes: int, steps: int, repeats: int) -> None:
    budget = probes * steps

    def ours() -> tuple[Tensor, Tensor]:
        r = ts.spectral_density(w.op("torch_secorder"), num_matvecs=budget, num_probes=probes)
        return r.nodes, r.weights

    def ours_loop() -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(0)
        parts = [
            ts.spectral_density(
                w.op("torch_secorder"), num_matvecs=steps, num_probes=1, generator=gen
            )
            for _ in range(probes)
        ]
        return torch.cat([r.nodes for r in parts]), torch.cat([r.weights for r in parts])

    methods: dict[str, tuple[str, Callable[[], Any]]] = {
        f"torch_secorder spectral_density ({probes} probes batched)": ("torch_secorder", ours),
        f"torch_secorder, loop of {probes} single-probe calls": ("torch_secorder", ours_loop),
    }
    if pyhessian is not None:

        def pyh() -> tuple[Tensor, Tensor]:
            torch.manual_seed(0)
            with default_dtype(w.dtype), eig_shim():
                nodes, weights = w.op("PyHessian").density(iter=steps, n_v=probes)
            return torch.from_numpy(np.array(nodes)), torch.from_numpy(np.array(weights))

        methods["PyHessian density (torch.eig shim)"] = ("PyHessian", pyh)
    if he is not None:

        def he_density() -> tuple[Tensor, Tensor]:
            op = w.op("hessian-eigenthings")
            r = he.spectral_density(op, num_runs=probes, lanczos_steps=steps, seed=0)
            keep = ~torch.isnan(r.raw_eigenvalues)
            return r.raw_eigenvalues[keep], r.raw_weights[keep]

        methods["hessian-eigenthings spectral_density"] = ("hessian-eigenthings", he_density)
    if curvlinops is not None:

        def curv() -> None:
            torch.manual_seed(0)
            curvlinops.lanczos_approximate_spectrum(w.op("curvlinops"), steps, num_repeats=probes)

        methods["curvlinops lanczos_approximate_spectrum (no reorth.)"] = ("curvlinops", curv)
    times: dict[str, list[float]] = {name: [] for name in methods}
    counts: dict[str, int] = {}
    outputs: dict[str, Any] = {}
    names = list(methods)
    for r in range(repeats + 1):  # round 0 warms up and is not kept
        for name in names[r % len(names) :] + names[: r % len(names)]:
            library, fn = methods[name]
            out, count, t = timed(w, library, fn)
            if r:
                times[name].append(t)
            counts[name], outputs[name] = count, out
    base = median(times[names[0]])
    rows = []
    for name in names:
        t = median(times[name])
        distance = ""
        if w.truth.get("spectrum") is not None and outputs[name] is not None:
            distance = f"{wasserstein(*outputs[name], w.truth['spectrum']):.2e}"
        rows.append([w.name, name, counts[name], fmt_time(t), f"{t / base:.2f}x", distance])
        RECORDS.append(
            {
                "section": "d",
                "workload": w.name,
                "method": name,
                "products": counts[name],
                "seconds": times[name],
                "w1": distance,
            }
        )
    emit(f"\n{w.name}: spectral density, {probes} probes x {steps} Lanczos steps")
    emit(
        table(
            ["workload", "method", "products", "CPU time", "/ batched", "W1 to the spectrum"],
            rows,
        )
    )


# ----------------------------------------------------------------------------- main
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} ({len(names)} logical CPUs)"
    load = ""
    with contextlib.suppress(OSError):
        load = ", load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    return cpu + load


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 seeds: smoke")
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    parser.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="cpu: process CPU time (steadier on a loaded machine); auto: cpu with one "
        "thread, else wall",
    )
    parser.add_argument("--sections", default="oetd", help="o, e, t, d (default all)")
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=["small", "large", "repeated"],
        choices=["small", "large", "repeated"],
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds per eigen setting")
    parser.add_argument(
        "--trace-seeds", type=int, default=10, help="(t) seeds with the real operators (0: skip)"
    )
    parser.add_argument(
        "--dense-seeds", type=int, default=100, help="(t) seeds on the dense small Hessian"
    )
    parser.add_argument("--dense-budgets", type=int, nargs="+", default=[12, 48, 192])
    parser.add_argument("--repeats", type=int, default=5, help="repeats of (o) and (d)")
    parser.add_argument("--target", type=float, default=1e-3, help="eigenvalue rel. error")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeated-k", type=int, nargs="+", default=[5])
    parser.add_argument(
        "--methods", nargs="*", default=[], help="(e) only eigen methods containing one of these"
    )
    parser.add_argument("--power-cap", type=int, default=3000, help="power steps per pair")
    parser.add_argument("--budgets", type=int, nargs="+", default=[12, 24, 48, 96, 192])
    parser.add_argument("--large-budgets", type=int, nargs="+", default=[24, 96])
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100, help="Lanczos steps per probe")
    parser.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "torch_secorder_bench"),
        help="directory for ground truths ('' for none)",
    )
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    specs = {
        "small": Spec(60, 2, torch.float64, 1024, 4, 400),
        "large": Spec(128, 3, torch.float32, 1024, 4, 400),
        "repeated": Spec(128, 1, torch.float64, 1024, 4, 0, True, True, inputs=32),
    }
    if args.quick:
        specs = {
            "small": Spec(12, 2, torch.float64, 256, 4, 200),
            "large": Spec(24, 3, torch.float32, 256, 4, 200),
            "repeated": Spec(32, 1, torch.float64, 256, 4, 0, True, True, inputs=16),
        }
        args.seeds, args.trace_seeds, args.repeats, args.dense_seeds = 2, 3, 1, 20
        args.budgets = args.large_budgets = args.dense_budgets = [12, 48]
        args.steps, args.power_cap = 20, 500

    global clock
    if args.clock == "auto":
        args.clock = "cpu" if args.threads == 1 else "wall"
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    # PyHessian's products call backward(create_graph=True); we drop the .grad it leaves.
    warnings.filterwarnings("ignore", "Using backward.. with create_graph=True")
    cache = Path(args.cache) if args.cache else None

    versions = ", ".join(
        f"{name} {version(dist)}"
        for name, dist in [
            ("torch_secorder", "torch-secorder"),
            ("torch", "torch"),
            ("numpy", "numpy"),
            ("scipy", "scipy"),
            ("curvlinops", "curvlinops-for-pytorch"),
            ("hessian-eigenthings", "hessian-eigenthings"),
            ("PyHessian", "pyhessian"),
        ]
    )
    emit(f"{versions}; Python {platform.python_version()}")
    emit(f"{machine()}; {torch.get_num_threads()} thread(s), flush_denormal on, {args.clock} clock")
    emit(f"command: {' '.join(sys.argv)}")
    for name in args.workloads:
        tic = time.perf_counter()
        w = make_workload(name, specs[name], cache)
        w.build_operators()
        emit(
            f"{w.describe()}, train accuracy {w.truth['accuracy']:.3f}; truth: "
            f"{w.truth['method']}; top eigenvalues "
            + ", ".join(f"{v:.5g}" for v in w.truth["top"][:6])
            + f"; trace {w.truth['trace']:.6g} (set-up {time.perf_counter() - tic:.0f} s)"
        )
        if name == "repeated":  # only the eigen-solvers: do they find every copy?
            if "e" in args.sections:
                bench_eigen(
                    w, args.repeated_k, args.seeds, args.target, args.power_cap, args.methods
                )
            emit()
            continue
        if "o" in args.sections:
            emit(f"\n{w.name}: cost of one product")
            bench_products(w, args.repeats, 16)
        if "e" in args.sections:
            bench_eigen(w, args.k, args.seeds, args.target, args.power_cap, args.methods)
        if "t" in args.sections:
            budgets = args.budgets if name == "small" else args.large_budgets
            if args.trace_seeds:
                bench_trace(w, budgets, args.trace_seeds)
            if w.truth.get("spectrum") is not None and args.dense_seeds:
                bench_trace_dense(w, args.dense_budgets, args.dense_seeds)
        if "d" in args.sections:
            bench_density(w, args.probes, args.steps, args.repeats)
        emit()
    emit(f"machine at the end: {machine()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"output": OUTPUT, "records": RECORDS}, f, indent=1)


if __name__ == "__main__":
    main()
