"""The contract every public analysis keeps: bad options and asymmetric operators are refused.

Each analysis is called in each form it has: an operator, a loss closure with its params, and a
model with data (the ``model_*`` functions) or with inputs (``output_sharpness``). A bad option
raises the error and the whole message pinned here, prefixed with the function's name, before
any product, closure call or forward pass. An operator that is not symmetric is refused by the
analyses' symmetry check, whichever form it comes in. Checks of one function's own options (a
density's ``grid_size``, an eigen-solver's ``k``) sit in the table under that function's family.
"""

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import torch_secorder as ts
from tests.analysis.operators import (
    DTYPE,
    DenseOperator,
    dominant,
    generator,
    tanh_mlp,
    with_spectrum,
)

SIZE = 30  # P of the operator and closure forms
MODEL_SIZE = 54  # P of tanh_mlp(): 3 * 5 + 5 + 5 * 4 + 4 + 4 * 2 + 2
MODEL_PARAMS = "0.weight, 0.bias, 2.weight, 2.bias, 4.weight, 4.bias"


@dataclass(frozen=True)
class Form:
    """A public analysis in one calling form.

    Attributes:
        fname: The public name, which starts every message.
        kind: ``"operator"``, ``"closure"`` (a loss closure and its params), ``"model"``
            (model, loss and data) or ``"outputs"`` (model and inputs).
        family: Which options it takes: ``"trace"``, ``"diagonal"``, ``"eigen"``,
            ``"density"`` or ``"sharpness"``.
    """

    fname: str
    kind: str
    family: str

    @property
    def id(self) -> str:
        return f"{self.fname}-{self.kind}" if self.kind in ("operator", "closure") else self.fname


FAMILIES = {
    "trace": "hessian_trace",
    "diagonal": "hessian_diagonal_estimate",
    "eigen": "top_eigenvalues",
    "density": "spectral_density",
}
FORMS = [
    *(
        Form(fname, kind, family)
        for family, fname in FAMILIES.items()
        for kind in ("operator", "closure")
    ),
    *(Form(f"model_{fname}", "model", family) for family, fname in FAMILIES.items()),
    Form("model_sharpness", "model", "sharpness"),
    Form("output_sharpness", "outputs", "sharpness"),
]
FORM_IDS = [form.id for form in FORMS]


def test_the_contract_covers_every_analysis():
    public = {
        name
        for name in ts.analysis.__all__
        if inspect.isfunction(getattr(ts.analysis, name)) and name != "plot_spectral_density"
    }
    assert {form.fname for form in FORMS} == public


# ----------------------------------------------------------------------------- arguments


def arguments(form: Form) -> tuple[dict[str, Any], Callable[[], int]]:
    """Valid positional arguments of ``form``, by name, and a count of the work done on them.

    The count is the operator's products, the closure's calls or the model's forward passes.
    """
    if form.kind == "operator":
        operator = DenseOperator(with_spectrum(dominant(SIZE)))
        return {"func_or_operator": operator}, lambda: operator.num_matvecs
    if form.kind == "closure":
        A = with_spectrum(dominant(SIZE))
        x = torch.zeros(SIZE, dtype=DTYPE, requires_grad=True)
        calls: list[int] = []

        def func() -> torch.Tensor:
            calls.append(1)
            return 0.5 * x @ A @ x

        return {"func_or_operator": func, "params": [x]}, lambda: len(calls)
    model, loss_fn, inputs, targets = tanh_mlp()
    forwards: list[int] = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    if form.kind == "outputs":
        return {"model": model, "inputs": inputs}, lambda: len(forwards)
    return {"model": model, "loss_fn": loss_fn, "data": (inputs, targets)}, lambda: len(forwards)


def invoke(form: Form, args: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """Call ``form``'s function with ``args`` positionally and ``overrides`` on top of them."""
    positional = [overrides.get(name, value) for name, value in args.items()]
    options = {name: value for name, value in overrides.items() if name not in args}
    return getattr(ts, form.fname)(*positional, **options)


# ----------------------------------------------------------------------------- bad options

CHOICES = {
    "trace": "'auto', 'hutch++', 'hutchinson', 'xtrace', 'exact'",
    "diagonal": "'auto', 'xdiag', 'hutchinson'",
    "eigen": "'lanczos', 'power'",
}
UNKNOWN_METHODS = {
    "trace": ["hutch", "power"],
    "diagonal": ["diag++", "xtrace"],
    "eigen": ["arnoldi", "hutch++"],
}
WHICH = "'largest', 'smallest', 'magnitude'"
MIXED_PARAMS = [torch.zeros(2, dtype=DTYPE), torch.zeros(2, dtype=torch.float32)]
NOT_A_SCALAR = torch.ones(3, dtype=DTYPE)


def bad_options(form: Form) -> list[tuple[str, dict[str, Any], type[Exception], str]]:
    """``(id, overrides, error, message)`` for each bad option of ``form``.

    The message is the whole text after ``"<fname>: "``.
    """
    family, kind = form.family, form.kind
    size = MODEL_SIZE if kind == "model" else SIZE
    cases: list[tuple[str, dict[str, Any], type[Exception], str]] = [
        (
            "generator-int",
            {"generator": 0},
            TypeError,
            "generator must be None or a torch.Generator; got int.",
        ),
        (
            "generator-str",
            {"generator": "seed"},
            TypeError,
            "generator must be None or a torch.Generator; got str.",
        ),
    ]
    if family in CHOICES:
        choices = CHOICES[family]
        cases.append(
            (
                "method-int",
                {"method": 3},
                TypeError,
                f"method must be a str, one of {choices}; got int.",
            )
        )
        cases += [
            (
                f"method-{name}",
                {"method": name},
                ValueError,
                f"method must be one of {choices}; got {name!r}.",
            )
            for name in UNKNOWN_METHODS[family]
        ]
    if family in ("trace", "diagonal", "density"):
        cases += [
            (
                f"num_matvecs-{type(value).__name__}",
                {"num_matvecs": value},
                TypeError,
                f"num_matvecs must be an int; got {type(value).__name__}.",
            )
            for value in (10.0, True) + (() if family == "density" else (None,))
        ]
    if family in ("trace", "diagonal"):  # the Hutchinson estimators
        cases.append(
            (
                "num_matvecs-hutchinson",
                {"method": "hutchinson", "num_matvecs": 0},
                ValueError,
                "num_matvecs must be at least 1 (method='hutchinson' needs one probe); got 0.",
            )
        )
    if family in ("eigen", "sharpness"):
        cases += [
            (
                f"max_matvecs-{type(value).__name__}",
                {"max_matvecs": value},
                TypeError,
                f"max_matvecs must be an int; got {type(value).__name__}.",
            )
            for value in (2.0, True)
        ]
        cases += [
            (
                f"tol-{value}",
                {"tol": value},
                ValueError,
                f"tol must be a finite positive number; got {value}.",
            )
            for value in (0, 0.0, -1.0, math.inf)
        ]
        cases.append(
            ("tol-str", {"tol": "1e-3"}, TypeError, "tol must be a positive number; got str.")
        )
    if family == "trace":
        cases += [
            (
                "num_matvecs-hutch++",
                {"method": "hutch++", "num_matvecs": 2},
                ValueError,
                "num_matvecs must be at least 3 (method='hutch++' needs a sketch, its projection "
                "and a Hutchinson probe); got 2.",
            ),
            (
                "num_matvecs-xtrace",
                {"method": "xtrace", "num_matvecs": 1},
                ValueError,
                "num_matvecs must be at least 2 (method='xtrace' needs one probe and its "
                "projection); got 1.",
            ),
        ]
    if family == "diagonal":
        cases.append(
            (
                "num_matvecs-xdiag",
                {"method": "xdiag", "num_matvecs": 1},
                ValueError,
                "num_matvecs must be at least 2 (method='xdiag' needs one probe and its "
                "projection); got 1.",
            )
        )
    if family == "density":
        cases += [
            (
                "num_probes-0",
                {"num_probes": 0},
                ValueError,
                "num_probes must be at least 1; got 0.",
            ),
            (
                "num_probes-float",
                {"num_probes": 2.5},
                TypeError,
                "num_probes must be an int; got float.",
            ),
            (
                "num_matvecs-0",
                {"num_matvecs": 0},
                ValueError,
                "num_matvecs must be at least 1; got 0.",
            ),
            (
                "num_matvecs-per-probe",
                {"num_matvecs": 3, "num_probes": 4},
                ValueError,
                "num_matvecs must be at least 4 (one Lanczos step for each of num_probes=4); "
                "got 3.",
            ),
            ("grid_size-1", {"grid_size": 1}, ValueError, "grid_size must be at least 2; got 1."),
            (
                "sigma-negative",
                {"sigma": -1.0},
                ValueError,
                "sigma must be a finite positive number; got -1.0.",
            ),
            (
                "sigma-str",
                {"sigma": "wide"},
                TypeError,
                "sigma must be a positive number; got str.",
            ),
        ]
    if family == "eigen":
        cases += [
            ("k-0", {"k": 0}, ValueError, "k must be at least 1; got 0."),
            (
                "k-above-P",
                {"k": size + 1},
                ValueError,
                f"k must be at most P={size}; got k={size + 1}.",
            ),
            ("k-float", {"k": 2.0}, TypeError, "k must be an int; got float."),
            (
                "which-top",
                {"which": "top"},
                ValueError,
                f"which must be one of {WHICH}; got 'top'.",
            ),
            (
                "which-int",
                {"which": 3},
                TypeError,
                f"which must be a str, one of {WHICH}; got int.",
            ),
            (
                "max_matvecs-lanczos",
                {"k": 3, "max_matvecs": 2},
                ValueError,
                "max_matvecs must be at least 3 (Lanczos needs k=3 products); got 2.",
            ),
            (
                "max_matvecs-power",
                {"k": 2, "method": "power", "max_matvecs": 5},
                ValueError,
                "max_matvecs must be at least 6 (power iteration needs 2 per run, 3 runs); got 5.",
            ),
        ]
        if kind == "model":
            cases.append(
                (
                    "k-above-a-group",
                    {"groups": "parameter", "k": 3},
                    ValueError,
                    "k must be at most the size of group '4.bias'=2; got k=3.",
                )
            )
    if family == "sharpness":
        cases.append(
            (
                "max_matvecs-0",
                {"max_matvecs": 0},
                ValueError,
                "max_matvecs must be at least 1; got 0.",
            )
        )
    if kind == "outputs":
        cases.append(
            ("batched-str", {"batched": "no"}, TypeError, "batched must be a bool; got str.")
        )
    if kind in ("model", "outputs"):
        cases += [
            ("model-int", {"model": 3}, TypeError, "model must be a torch.nn.Module; got int."),
            (
                "model-str",
                {"model": "model"},
                TypeError,
                "model must be a torch.nn.Module; got str.",
            ),
        ]
        cases += [
            (
                f"params-{entry}",
                {"params": entry},
                ValueError,
                f"params entry {entry!r} matches no parameter of the model; its parameters are: "
                f"{MODEL_PARAMS}.",
            )
            for entry in ("nope", "body.1.*")
        ]
    if kind == "model":
        cases += [
            (
                "groups-layer",
                {"groups": "layer"},
                ValueError,
                "groups must be None, 'module', 'parameter' or a dict of name -> parameter names "
                "or patterns; got 'layer'.",
            ),
            (
                "data-empty",
                {"data": []},
                ValueError,
                "data is empty; expected at least one (inputs, targets) batch.",
            ),
            ("seed-float", {"seed": 1.5}, TypeError, "seed must be an int; got float."),
            ("progress-str", {"progress": "yes"}, TypeError, "progress must be a bool; got str."),
        ]
    if kind == "closure":
        cases += [
            (
                "params-mixed-dtypes",
                {"params": MIXED_PARAMS},
                ValueError,
                "params must share one dtype and device, but params[0] is torch.float64 on cpu "
                "and params[1] is torch.float32 on cpu.",
            ),
            (  # the closure runs once here: its loss is what is wrong
                "func-not-scalar",
                {"func_or_operator": lambda: NOT_A_SCALAR * 2},
                ValueError,
                "func must return a scalar loss; got a tensor of shape (3,). Reduce it, e.g. "
                "with .mean() or .sum().",
            ),
        ]
    return cases


BAD_OPTIONS = [
    pytest.param(form, overrides, error, message, id=f"{form.id}-{case_id}")
    for form in FORMS
    for case_id, overrides, error, message in bad_options(form)
]


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_valid_arguments_do_work_that_is_counted(form):
    # the counters the test below reads see the work of a valid call
    args, work = arguments(form)
    invoke(form, args, {})
    assert work() > 0


@pytest.mark.parametrize(("form", "overrides", "error", "message"), BAD_OPTIONS)
def test_bad_options_raise_before_any_work(form, overrides, error, message):
    args, work = arguments(form)
    with pytest.raises(error, match=f"^{re.escape(f'{form.fname}: {message}')}$"):
        invoke(form, args, overrides)
    assert work() == 0


# ----------------------------------------------------------------------------- NumPy scalars

NUMERIC_OPTIONS = {  # each family's numeric options, as Python numbers
    "trace": {"num_matvecs": 12, "max_bytes": 2**30},
    "diagonal": {"num_matvecs": 9, "max_bytes": 2**30},
    "eigen": {"k": 2, "tol": 1e-6, "max_matvecs": 60, "max_bytes": 2**30},
    "density": {"num_probes": 2, "num_matvecs": 20, "grid_size": 50, "sigma": 0.25},
    "sharpness": {"tol": 1e-6, "max_matvecs": 40},
}


def same(a: Any, b: Any) -> bool:
    """Bitwise equal tensors, equal numbers of the same type, in equal structures."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return all(same(getattr(a, name), getattr(b, name)) for name in a.__dataclass_fields__)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_numpy_scalars_work_as_python_numbers(form):
    # (a sweep over np.arange(...) of budgets, say): the same result, Python numbers in it
    np = pytest.importorskip("numpy")
    options = NUMERIC_OPTIONS[form.family]
    as_numpy = {
        name: np.int64(value) if isinstance(value, int) else np.float64(value)
        for name, value in options.items()
    }
    results = []
    for overrides in (options, as_numpy):
        args, _ = arguments(form)
        results.append(invoke(form, args, {"generator": generator(0), **overrides}))
    assert same(*results)


# ----------------------------------------------------------------------------- symmetry


class SkewGradient(torch.autograd.Function):
    r"""The loss :math:`\frac12 w^\top S w` with the gradient :math:`Aw` instead of :math:`Sw`.

    ``A`` is not symmetric and ``S`` is its symmetric part. Hessian-vector products
    differentiate the backward, :math:`\nabla_w (v^\top A w) = A^\top v`, so they multiply
    with the asymmetric :math:`A^\top`.
    """

    @staticmethod
    def forward(ctx, w, A):
        ctx.save_for_backward(w, A)
        return 0.5 * w @ (0.5 * (A + A.T)) @ w

    @staticmethod
    def backward(ctx, grad):
        w, A = ctx.saved_tensors
        return grad * (A @ w), None


class Skewed(nn.Module):
    """A model whose loss Hessian and output Hessians are not symmetric (see SkewGradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, generator=generator(1), dtype=DTYPE))
        self.register_buffer("A", torch.randn(6, 6, generator=generator(2), dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SkewGradient.apply(self.w, self.A) * x.sum(dim=1)


def asymmetric_arguments(form: Form) -> dict[str, Any]:
    """Positional arguments of ``form`` whose Hessian is not symmetric."""
    if form.kind == "operator":
        return {
            "func_or_operator": DenseOperator(
                torch.randn(SIZE, SIZE, generator=generator(0), dtype=DTYPE)
            )
        }
    if form.kind == "closure":
        A = torch.randn(SIZE, SIZE, generator=generator(0), dtype=DTYPE)
        w = torch.randn(SIZE, generator=generator(1), dtype=DTYPE, requires_grad=True)
        return {"func_or_operator": lambda: SkewGradient.apply(w, A), "params": [w]}
    inputs = torch.randn(4, 3, generator=generator(3), dtype=DTYPE)
    if form.kind == "outputs":
        return {"model": Skewed(), "inputs": inputs}
    targets = torch.randn(4, generator=generator(4), dtype=DTYPE)
    return {"model": Skewed(), "loss_fn": nn.MSELoss(), "data": (inputs, targets)}


def test_skew_gradient_products_multiply_with_the_transpose():
    A = torch.randn(5, 5, generator=generator(0), dtype=DTYPE)
    w = torch.randn(5, generator=generator(1), dtype=DTYPE, requires_grad=True)
    v = torch.randn(5, generator=generator(2), dtype=DTYPE)
    torch.testing.assert_close(ts.hvp(lambda: SkewGradient.apply(w, A), [w], v), A.T @ v)
    assert not torch.allclose(A.T @ v, A @ v)


ESTIMATORS = {"trace": {"method": "hutch++"}, "diagonal": {"method": "xdiag"}}
"""Methods that multiply with random vectors (``"auto"`` may take the exact diagonal, which
multiplies with unit vectors only and, like ``method="exact"``, does not see asymmetry)."""


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_asymmetric_operators_are_refused(form):
    with pytest.raises(
        ValueError,
        match=rf"^{form.fname}: the operator is not symmetric: u\^T \(A v\) = \S+ but "
        r"v\^T \(A u\) = \S+ for two of its product vectors; expected a symmetric operator "
        r"such as a Hessian\.$",
    ):
        invoke(form, asymmetric_arguments(form), ESTIMATORS.get(form.family, {}))
